"""The progress of a launch: a bar over the groups' cells, and one line per worker with what it is doing.

`Board` records and shows nothing (tests subclass it); `RichBoard` draws with rich on a terminal and
prints plain lines elsewhere (a CI log, a file): one per finished or failed cell, and the workers' state
at most every 20 s. Workers report from several threads (one per Ray worker), so every call is locked.
"""

from __future__ import annotations

import threading
import time

from rich.console import Console
from rich.markup import escape

from skipbench.bars import ConsoleBar
from skipbench.measure import Progress
from skipbench.spec import Cell


class Board:
    """What a launch reports; the base class ignores it all."""

    def start(self, cells: int, text: str) -> None: ...
    def state(self, worker: str, text: str, done: int | None = None, total: int | None = None) -> None: ...
    def cell_done(self, worker: str, cell: Cell, status: str) -> None: ...  # "done" | "skipped" | "failed: ..."
    def note(self, text: str) -> None: ...

    def for_group(self, worker: str, group: int) -> Progress:
        """A group's `measure.Progress`, reported as this worker's state."""
        return GroupProgress(self, worker, group)


class GroupProgress(Progress):
    """One group's measurement, as its worker's line on a board."""

    def __init__(self, board: Board, worker: str, group: int):
        self.board, self.worker, self.group = board, worker, group
        self.done = self.total = 0
        self.round, self.rounds = 0, 0

    def _state(self, text: str) -> None:
        self.board.state(self.worker, f"group {self.group}, round {self.round + 1}/{self.rounds}: {text}",
                         self.done, self.total)

    def plan(self, cells, generations: int, rounds: int) -> None:
        self.total, self.rounds = generations, rounds
        self._state(f"{len(cells)} cells")

    def warming_up(self, cell) -> None:
        self._state(f"warming up {cell.label()}")

    def generation_done(self, cell, row: dict) -> None:
        self.done += 1
        self._state(f"{cell.label()} {row['new_tokens'] / row['time_s']:.1f} tok/s" if row["time_s"] else cell.label())

    def round_done(self, round_index: int, rounds: int) -> None:
        self.round = min(round_index + 1, rounds - 1)

    def cell_done(self, cell, status: str) -> None:
        if cell.method.speculates:  # a baseline is every group's: the bar counts the grid's cells
            self.board.cell_done(self.worker, cell, status)

    def note(self, text: str) -> None:
        self.board.note(f"{self.worker}: {text}")


class RichBoard(ConsoleBar, Board):
    """The board on a console (stderr): a bar over cells and a bar per worker over its group's generations."""

    def __init__(self, console: Console):
        super().__init__(console)
        self.cells = None
        self.workers: dict[str, object] = {}
        self.states: dict[str, str] = {}
        self.lock = threading.RLock()
        self.last_line = time.perf_counter()

    def start(self, cells: int, text: str) -> None:
        with self.lock:
            self.note(text)
            if self.live:
                self.cells = self.bar.add_task("cells", total=cells, stats="")

    def state(self, worker: str, text: str, done: int | None = None, total: int | None = None) -> None:
        with self.lock:
            self.states[worker] = text
            if self.live:
                if worker not in self.workers:
                    self.workers[worker] = self.bar.add_task(escape(worker), total=None, stats="")
                self.bar.update(self.workers[worker], completed=done or 0, total=total or None, stats=escape(text))
            elif time.perf_counter() - self.last_line > 20:
                self.last_line = time.perf_counter()
                for name, line in sorted(self.states.items()):
                    self.console.print(escape(f"  {name}: {line}"), soft_wrap=True)

    def cell_done(self, worker: str, cell: Cell, status: str) -> None:
        with self.lock:
            if self.live and self.cells is not None:
                self.bar.update(self.cells, advance=1)
            if status != "done" or not self.live:
                self.note(f"  {cell.label()} ({worker}): {status}")

    def note(self, text: str) -> None:
        with self.lock:
            self.print(text)
