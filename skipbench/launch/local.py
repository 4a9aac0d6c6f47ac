"""The local launcher: today's path, every cell in one group measured in this process (`sweep.execute`).

A run directory that remote workers already filled holds cells in other groups: the local launcher skips
those they finished (whichever worker wrote them) and keeps the manifest's record of those groups. A
purely local run goes straight to `sweep.execute`, unchanged.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from skipbench.launch.plan import stored_groups
from skipbench.measure import Progress
from skipbench.spec import Cell, Setup, cell_key
from skipbench.store import RunStore
from skipbench.sweep import execute


def finished_elsewhere(store: RunStore, setup: Setup, cells: list[Cell]) -> list[Cell]:
    """The speculating cells finished in a group other than 0 (by a remote worker)."""
    if not store.manifest_path().is_file():
        return []
    prompts = (store.read_manifest().get("prompts") or {}).get("prompts")
    if not prompts:
        return []
    held = stored_groups(store)
    found = []
    for cell in cells:
        key = cell_key(setup, cell)
        for group in sorted(held.get(key, set()) - {0}):
            frame = store.read_cell(key, cell, group) if cell.method.speculates else None
            if frame is None:
                continue
            if frame.groupby("prompt_index").size().reindex(range(prompts), fill_value=0).min() >= setup.repeats:
                found.append(cell)
                break
    return found


def run(setup: Setup, cells: list[Cell], out_dir: Path | str, *, force: bool = False,
        progress: Progress | None = None) -> RunStore:
    progress = progress or Progress()
    store = RunStore(out_dir)
    if force or not store.manifest_path().is_file() or "groups" not in store.read_manifest():
        return execute(setup, cells, out_dir, force=force, progress=progress)
    before = store.read_manifest()
    done = finished_elsewhere(store, setup, cells)
    if done:
        progress.note(f"{len(done)} cell(s) already finished by other workers: skipped")
    store = execute(setup, [cell for cell in cells if cell not in done], out_dir, force=force, progress=progress)
    # execute wrote a manifest of this session's cells: the run still holds every cell and the other groups.
    after = store.read_manifest()
    after.pop("schema_version", None)
    store.write_manifest({**after, "cells": [asdict(cell) for cell in cells], "groups": before["groups"]})
    return store
