"""Where a sweep's cells run: in this process (local), on Ray workers, or as Slurm array tasks (submitit).

Every launcher measures GROUPS of cells. A group is measured by one worker on one device in interleaved
rounds and carries its own autoregressive baseline, so every speedup divides times taken on one device
in one round. `partition` spreads the grid's cells over the groups deterministically (a rerun with the
same options forms the same groups); `plan_groups` keeps a cell in the group that already holds rows of
it, so a rerun with another number of workers still skips finished cells and resumes partial ones.

The launchers themselves schedule nothing: Ray places the actors, Slurm runs the array tasks.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType

from skipbench.errors import SpecError, UserError
from skipbench.spec import Cell, Setup, cell_key
from skipbench.store import RunStore

LAUNCHERS = ("local", "ray", "slurm")
EXTRAS = {"ray": ("ray", "Ray"), "slurm": ("submitit", "submitit")}  # launcher: (module, what to install)


class LaunchError(UserError):
    """A launch that cannot start or go on; one line for the user."""


@dataclass(frozen=True)
class LaunchOptions:
    """How a sweep is launched (`--launcher` and its options, or a sweep file's [launch] table)."""

    launcher: str = "local"
    workers: int | None = None  # ray: actors (default: the cluster's GPUs, else 2); slurm: array tasks
    address: str | None = None  # ray: "auto" or HOST:PORT; None: a running cluster, else a new local one
    gpus_per_worker: int = 1  # ray and slurm, where the setup runs on GPUs
    partition: str | None = None  # slurm
    time_min: int | None = None  # slurm: each task's time limit
    max_parallel: int | None = None  # slurm: array tasks running at once
    detach: bool = False  # slurm: submit and return; a later sweep of the same run (or report) collects
    cluster: str | None = None  # slurm: submitit's cluster ("slurm"; "local" or "debug" to test without Slurm)


ONLY_FOR = {"address": "ray", "partition": "slurm", "time_min": "slurm", "max_parallel": "slurm", "detach": "slurm",
            "cluster": "slurm"}
_TYPES = {"launcher": str, "workers": int, "address": str, "gpus_per_worker": int, "partition": str,
          "time_min": int, "max_parallel": int, "detach": bool, "cluster": str}


def options_from(values: dict, origin: str | None = None) -> LaunchOptions:
    """LaunchOptions from a sweep file's [launch] table and/or the command line (None: not given), checked."""
    where = f"sweep file {origin}: [launch] " if origin else ""
    known = {field.name for field in fields(LaunchOptions)}
    unknown = set(values) - known
    if unknown:
        raise SpecError(f"{where}unknown launch key(s) {', '.join(sorted(unknown))}; known: "
                        f"{', '.join(sorted(known - {'cluster'}))}")
    given = {name: value for name, value in values.items() if value is not None}
    for name, value in given.items():
        kind = _TYPES[name]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)) or not isinstance(value, kind):
            raise SpecError(f"{where}{name} must be {'a whole number' if kind is int else kind.__name__} "
                            f"(got {value!r})")
    options = LaunchOptions(**given)
    if options.launcher not in LAUNCHERS:
        raise SpecError(f"{where}launcher must be one of {', '.join(LAUNCHERS)} (got {options.launcher!r})")
    for name in ("workers", "time_min", "max_parallel"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            raise SpecError(f"{where}{_flag(name)} must be >= 1 (got {getattr(options, name)})")
    if options.gpus_per_worker < 0:
        raise SpecError(f"{where}{_flag('gpus_per_worker')} must be >= 0 (got {options.gpus_per_worker})")
    for name, launcher in ONLY_FOR.items():
        if name in given and given[name] is not False and options.launcher != launcher:
            raise SpecError(f"{where}{_flag(name)} is an option of the {launcher} launcher, not of "
                            f"{options.launcher}; add --launcher {launcher}")
    if options.launcher == "local" and "workers" in given:
        raise SpecError(f"{where}{_flag('workers')} needs --launcher ray or slurm (local runs in this process)")
    return options


def merged(file_values: dict, **given) -> LaunchOptions:
    """The sweep file's [launch] table with the command line's options laid over it (None or False: not given).
    A launcher chosen on the command line drops the file's options of other launchers."""
    given = {name: value for name, value in given.items() if value is not None and value is not False}
    values = dict(file_values)
    if "launcher" in given:
        values = {name: value for name, value in values.items() if ONLY_FOR.get(name, given["launcher"]) ==
                  given["launcher"] and not (name == "workers" and given["launcher"] == "local")}
    return options_from(values | given)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def require(launcher: str) -> ModuleType:
    """The package a launcher needs, or one line naming the extra to install."""
    module, what = EXTRAS[launcher]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LaunchError(f"the {launcher} launcher needs {what}: pip install 'skipbench[{launcher}]'") from None


# --------------------------------------------------------------------------- groups


def _baselines_for(chunk: list[Cell], baselines: list[Cell]) -> list[Cell]:
    """The autoregressive cells a chunk's speedups divide by (and their A/A controls), in grid order."""
    from skipbench.spec import baseline_of

    chosen, more = set(), {baseline_of(cell, baselines) for cell in chunk} - {None}
    while more - chosen:  # a baseline may divide by another (an hf one by the native engine's)
        chosen |= more
        more = {baseline_of(cell, baselines) for cell in chosen} - {None}
    backends = {cell.backend for cell in chunk}  # the A/A controls of the chunk's own backends
    return [cell for cell in baselines if cell in chosen or (cell.replica and cell.backend in backends)]


def partition(cells: list[Cell], groups: int) -> list[list[Cell]]:
    """Spread the speculating cells over at most `groups` groups, round robin in grid order (neighbouring
    cells of a grid cost alike, so groups take about as long); each group gets the baseline(s) its cells
    need, first, so a baseline appears in every group."""
    baselines = [cell for cell in cells if not cell.method.speculates]
    rest = [cell for cell in cells if cell.method.speculates]
    if not rest:
        return [list(cells)]
    count = max(1, min(groups, len(rest)))
    chunks = [rest[index::count] for index in range(count)]
    return [[*_baselines_for(chunk, baselines), *chunk] for chunk in chunks]


_CELL_FILE = re.compile(r"^([0-9a-f]{16})(?:-g(\d+))?\.parquet$")


def stored_groups(store: RunStore) -> dict[str, set[int]]:
    """The groups that hold rows of each cell key: cell files (`key.parquet` is group 0, `key-gN.parquet`
    group N) and journals of interrupted sessions."""
    found: dict[str, set[int]] = {}
    if not store.cells_dir.is_dir():
        return found
    for path in store.cells_dir.glob("*.parquet"):
        match = _CELL_FILE.match(path.name)
        if match:
            found.setdefault(match[1], set()).add(int(match[2] or 0))
    for path in store.cells_dir.glob("journal-g*.jsonl"):
        group = int(path.stem.removeprefix("journal-g"))
        for row in store.read_journal(group):
            if row.get("cell_key"):
                found.setdefault(row["cell_key"], set()).add(group)
    return found


def plan_groups(store: RunStore, setup: Setup, cells: list[Cell], groups: int) -> dict[int, list[Cell]]:
    """Group index -> its cells (baselines first): `partition`, except that a cell with stored rows stays in
    (the lowest) group that holds them, so that its rounds continue beside that group's baseline."""
    chunks = partition(cells, groups)
    baselines = [cell for cell in cells if not cell.method.speculates]
    held = stored_groups(store)
    assigned: dict[Cell, int] = {}
    for index, chunk in enumerate(chunks):
        for cell in chunk:
            if cell.method.speculates:
                homes = held.get(cell_key(setup, cell))
                assigned[cell] = min(homes) if homes else index
    if not assigned:
        return {0: chunks[0]}
    planned = {}
    for index in sorted(set(assigned.values())):
        chunk = [cell for cell in cells if assigned.get(cell) == index]
        planned[index] = [*_baselines_for(chunk, baselines), *chunk]
    return planned


# --------------------------------------------------------------------------- launching


@dataclass
class Launched:
    """What a launch left: the run's store, and the tasks still running (a detached Slurm submission)."""

    store: RunStore
    running: int = 0
    note: str = ""


def run(options: LaunchOptions, setup: Setup, cells: list[Cell], out_dir: Path | str, *, force: bool,
        board=None) -> Launched:
    """Measure `cells` on `setup` into `out_dir` with a remote launcher (ray or slurm); `board` shows progress
    (`launch.progress.Board`). The local launcher is `launch.local.run`, with the CLI's progress bar."""
    from skipbench.launch.progress import Board

    board = board or Board()
    if options.launcher == "ray":
        from skipbench.launch import ray as launcher
    elif options.launcher == "slurm":
        from skipbench.launch import slurm as launcher
    else:
        raise LaunchError(f"launch.run starts remote launchers; {options.launcher!r} runs through launch.local")
    return launcher.run(options, setup, cells, Path(out_dir), force=force, board=board)
