"""How a sweep's cells are grouped for its workers, and what a launch leaves.

Every launcher measures GROUPS of cells. A group is measured by one worker on one device in interleaved
rounds and carries its own autoregressive baseline, so every speedup divides times taken on one device
in one round. `partition` spreads the grid's cells over the groups deterministically (a rerun with the
same options forms the same groups); `plan_groups` keeps a cell in the group that already holds rows of
it, so a rerun with another number of workers still skips finished cells and resumes partial ones.

The launchers themselves schedule nothing: Ray places the actors, Slurm runs the array tasks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from skipbench.spec import Cell, Setup, baseline_of, cell_key
from skipbench.store import RunStore


def _baselines_for(chunk: list[Cell], baselines: list[Cell]) -> list[Cell]:
    """The autoregressive cells a chunk's speedups divide by (and their A/A controls), in grid order."""
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


@dataclass
class Launched:
    """What a launch left: the run's store, and the tasks still running (a detached Slurm submission)."""

    store: RunStore
    running: int = 0
    note: str = ""
