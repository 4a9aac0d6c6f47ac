"""The driver's side of a remote launch: it holds the run directory while workers measure.

The driver checks the plan without loading a model, holds the run's lock, refuses a directory of other
settings (as `sweep.execute` does), forms the groups that still need measuring, and writes what workers
send back through `measure.record`, the same code that writes a local run. A group lost with its worker
(killed, out of memory, a node gone) marks its unfinished cells as failed: their rows so far stay in the
group's journal and cell files, and a rerun retries them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from skipbench.errors import SpecError
from skipbench.launch.progress import Board
from skipbench.launch.worker import update_manifest
from skipbench.measure import Event, GroupRows, Progress, consolidate, record
from skipbench.models import num_layers_of
from skipbench.spec import Cell, Setup, cell_key
from skipbench.store import RunStore
from skipbench.sweep import refuse_other_settings


def check_plan(setup: Setup, cells: list[Cell]) -> None:
    """`sweep.check_plan` without resolving the device: the driver (a laptop, a login node) may have none."""
    setup.check()
    if not cells:
        raise SpecError("no cells to run")
    layers = num_layers_of(setup.model)
    for cell in cells:
        cell.check(layers)


@dataclass
class Group:
    """A group still to measure: its index, cells by key (baseline first), and the rows stored so far."""

    index: int
    cells: dict[str, Cell]
    stored: GroupRows

    def plain(self) -> list[dict]:
        return [asdict(cell) for cell in self.cells.values()]


def finished(rows: GroupRows, key: str, prompts: int, repeats: int) -> bool:
    return all(rows.count(key, index) >= repeats for index in range(prompts))


class Session:
    """One launch's hold on a run directory."""

    def __init__(self, setup: Setup, cells: list[Cell], out_dir: Path, *, launch: dict, force: bool, board: Board):
        self.setup, self.cells, self.force, self.board = setup, cells, force, board
        self.launch = launch  # what the manifest records of the launch (launcher, workers, groups)
        self.store = RunStore(out_dir)
        self._manifest = threading.Lock()  # record threads (one per Ray worker) report concurrently

    @contextmanager
    def open(self) -> Iterator[Session]:
        check_plan(self.setup, self.cells)
        with self.store.lock():
            refuse_other_settings(self.store, self.setup, self.force)
            if self.force:
                self.store.clear()
            if not self.store.manifest_path().is_file():
                # The setup and cells at once, so a rerun (or `report`) of a detached run knows what it is;
                # models, prompts and provenance come with the first worker's report.
                self.store.write_manifest({"setup": asdict(self.setup), "cells": [asdict(c) for c in self.cells],
                                           "launch": self.launch})
            yield self

    def prompts(self) -> int | None:
        """The number of prompts, once a worker has reported them (this session or an earlier one)."""
        return ((self.store.read_manifest().get("prompts") or {}).get("prompts")
                if self.store.manifest_path().is_file() else None)

    def pending(self, planned: dict[int, list[Cell]]) -> list[Group]:
        """The groups with work left, each with its stored rows (an interrupted session's journal merged).
        Where the prompt count is known, a group whose every cell is finished is skipped without a worker."""
        prompts, repeats = self.prompts(), self.setup.repeats
        groups = []
        for index, cells in planned.items():
            keyed = {cell_key(self.setup, cell): cell for cell in cells}
            stored = consolidate(self.store, keyed, index)
            if prompts and all(finished(stored, key, prompts, repeats) for key in keyed):
                for cell in cells:
                    if cell.method.speculates:
                        self.board.cell_done(f"g{index}", cell, "skipped")
                continue
            groups.append(Group(index, keyed, stored))
        return groups

    def report(self, group: int, report: dict) -> None:
        """A worker's "worker" event: its group's entry (and, the first time, models and prompts) in the manifest."""
        with self._manifest:
            update_manifest(self.store, group, report, self.launch)

    def record(self, group: Group, events: Iterator[Event], progress: Progress) -> set[str]:
        """Write a group's events into the run (`measure.record`); return the keys it settled (done, failed or
        skipped). An exception from the events (a worker lost) propagates, the journal kept."""
        settled: set[str] = set()

        def tapped() -> Iterator[Event]:
            for event in events:
                if event.kind == "worker":
                    self.report(group.index, event.row)
                    continue
                if event.kind == "note":
                    progress.note(event.text)
                    continue
                if event.kind in ("done", "failed", "skipped", "unsupported"):
                    settled.add(event.key)
                yield event

        record(tapped(), self.store, group.cells, group.stored, progress, group.index)
        return settled

    def lost(self, group: Group, message: str, worker: str) -> list[Cell]:
        """A group whose worker is gone: merge what it journaled, and mark each speculating cell it did not
        finish as failed (the baseline is every group's, so it gets no error record of its own)."""
        rows = consolidate(self.store, group.cells, group.index)
        prompts = self.prompts()
        failed = []
        for key, cell in group.cells.items():
            if cell.method.speculates and not (prompts and finished(rows, key, prompts, self.setup.repeats)):
                self.store.write_error(key, cell, message)
                self.board.cell_done(worker, cell, f"failed: {message}")
                failed.append(cell)
        return failed
