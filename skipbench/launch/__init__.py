"""Where a sweep's cells run: in this process (local), on Ray workers, or as Slurm array tasks (submitit).

Every launcher measures GROUPS of cells. A group is measured by one worker on one device in interleaved
rounds and carries its own autoregressive baseline, so every speedup divides times taken on one device
in one round. `partition` spreads the grid's cells over the groups deterministically (a rerun with the
same options forms the same groups); `plan_groups` keeps a cell in the group that already holds rows of
it, so a rerun with another number of workers still skips finished cells and resumes partial ones.

The launchers themselves schedule nothing: Ray places the actors, Slurm runs the array tasks.
"""

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
