"""Where a sweep's cells run: in this process (`local`), on Ray workers (`ray`) or as Slurm array tasks
(`slurm`, through submitit), each measuring groups of cells (`plan`); `remote.run` starts the remote ones."""

from skipbench.launch.plan import Launched, partition, plan_groups, stored_groups
from skipbench.launch.remote import run
from skipbench.launch_options import (
    EXTRAS,
    LAUNCHERS,
    ONLY_FOR,
    LaunchError,
    LaunchOptions,
    merged,
    options_from,
    require,
)

__all__ = ["EXTRAS", "LAUNCHERS", "ONLY_FOR", "LaunchError", "LaunchOptions", "Launched", "merged", "options_from",
           "partition", "plan_groups", "require", "run", "stored_groups"]
