"""Start a remote launch: Ray actors or Slurm array tasks measure a sweep's groups (the local launcher is
`launch.local`, which the CLI runs with its own progress bar)."""

from __future__ import annotations

from pathlib import Path

from skipbench.launch import ray, slurm
from skipbench.launch.plan import Launched
from skipbench.launch.progress import Board
from skipbench.launch_options import LaunchError, LaunchOptions
from skipbench.spec import Cell, Setup


def run(options: LaunchOptions, setup: Setup, cells: list[Cell], out_dir: Path | str, *, force: bool,
        board=None) -> Launched:
    """Measure `cells` on `setup` into `out_dir` with a remote launcher (ray or slurm); `board` shows progress
    (`launch.progress.Board`). The local launcher is `launch.local.run`, with the CLI's progress bar."""
    board = board or Board()
    if options.launcher == "ray":
        launcher = ray
    elif options.launcher == "slurm":
        launcher = slurm
    else:
        raise LaunchError(f"launch.run starts remote launchers; {options.launcher!r} runs through launch.local")
    return launcher.run(options, setup, cells, Path(out_dir), force=force, board=board)
