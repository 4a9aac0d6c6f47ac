"""What the commands print: a sweep's progress, a run's summary table, training with its bar and agreement table."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichBar
from rich.table import Table

from skipbench.bars import ConsoleBar
from skipbench.cli.core import console, out

if TYPE_CHECKING:
    from skipbench.spec import Cell
    from skipbench.store import RunStore
    from skipbench.train.loop import TrainConfig

# --------------------------------------------------------------------------- progress


class RichProgress(ConsoleBar):
    """One bar over the generations of a sweep, with the current cell's running tokens/s and acceptance.

    When the output is not a terminal (a CI log, a file), plain lines instead: one per finished round,
    at most one every 20 s in between, and one per finished or failed cell."""

    def __init__(self) -> None:
        super().__init__(console)
        self.task = None
        self.totals: dict = {}
        self.done = self.total = 0
        self.began = self.last_line = time.perf_counter()

    def plan(self, cells: list[Cell], generations: int, rounds: int) -> None:
        self.total, self.done = generations, 0
        self.note(f"measuring {len(cells)} cells: {generations} generations in {rounds} interleaved round(s)")
        if self.live:
            self.task = self.bar.add_task("generations", total=generations, stats="")

    def warming_up(self, cell: Cell) -> None:
        if self.live and self.task is not None:
            self.bar.update(self.task, stats=f"warming up {escape(cell.label())}")
        elif not self.live:  # warming up (and compiling) can take minutes: say what is going on
            self._line(f"warming up {cell.label()}")

    def generation_done(self, cell: Cell, row: dict) -> None:
        tokens, seconds, drafted, accepted = self.totals.get(cell, (0, 0.0, 0, 0))
        self.totals[cell] = (tokens + row["new_tokens"], seconds + row["time_s"], drafted + row["drafted"],
                             accepted + row["accepted"])
        tokens, seconds, drafted, accepted = self.totals[cell]
        self.done += 1
        stats = f"{escape(short_label(cell))}: {tokens / seconds:.1f} tok/s" if seconds else ""
        if drafted:
            stats += f", accept {accepted / drafted:.2f}"
        if self.live:
            self.bar.update(self.task, advance=1, stats=stats)
        elif time.perf_counter() - self.last_line > 20:
            self._line(f"{self.done}/{self.total} generations ({stats})")

    def round_done(self, index: int, rounds: int) -> None:
        if not self.live:
            self._line(f"round {index + 1}/{rounds} done: {self.done}/{self.total} generations")

    def cell_done(self, cell: Cell, status: str) -> None:
        if status != "done" or not self.live:
            self.note(f"  {cell.label()}: {status}")

    def note(self, text: str) -> None:
        self.print(text)

    def _line(self, text: str) -> None:
        self.last_line = time.perf_counter()
        self.print(f"[{time.perf_counter() - self.began:6.0f} s] {text}")


# --------------------------------------------------------------------------- printing a run


def short_label(cell: Cell) -> str:
    """A cell's name in a few characters, for narrow terminals: `self E=8 K=4`, `2-model K=4 hf`."""
    return cell.short_label()


def print_summary(store: RunStore, device: str | None = None, report: bool = False) -> None:
    """The run's cells in the order asked for; fits an 80-column terminal. Failed cells and warnings after.
    A run timed on several devices gets a table per device: times are never pooled across devices."""
    from skipbench.spec import Cell, baseline_of
    from skipbench.summary import load_summary, run_devices
    from skipbench.tables import number, speedup_text
    from skipbench.verdicts import report_lines

    devices = run_devices(store.root) if device is None else []
    if len(devices) > 1:
        out.print(escape(f"rows timed on {len(devices)} devices: one table per device"), soft_wrap=True)
        for name in devices:
            print_summary(store, name, report)
        for error in store.errors():
            out.print(f"{'' if error.get('unsupported') else '[red]failed[/] '}{escape(error['cell_label'])}: "
                  f"{escape(error['error'])}", soft_wrap=True)
        return
    summary, manifest = load_summary(store.root, device=device)
    target = (manifest.get("models") or {}).get("target") or {}
    title = f"{target.get('name')}{' (SYNTHETIC weights)' if target.get('synthetic') else ''}: {store.root}"
    title += f" on {device}" if device else ""
    table = Table(title=escape(title), title_justify="left", pad_edge=False)
    cells = [Cell.from_record(row) for row in summary.to_dict("records")]
    bases = [baseline_of(cell, cells) for cell in cells]
    # Which baseline each speedup divides by: the first (native) one unmarked, each other one with a mark.
    others = [base for base in dict.fromkeys(bases) if base is not None][1:]
    marks = {base: "*†‡§"[index] if index < 4 else f"({index + 1})" for index, base in enumerate(others)}
    for name in ("cell", "tok/s", "speedup [95% CI]", "accept", "tok/step", "lossless"):
        table.add_column(name, justify="left" if name == "cell" else "right", no_wrap=True)
    drafts = sorted({row["draft_model"] for row in summary.to_dict("records") if isinstance(row["draft_model"], str)})
    for row, cell, base in zip(summary.to_dict("records"), cells, bases, strict=True):
        label = short_label(cell) + (f" d{drafts.index(cell.draft_model) + 1}" if cell.draft_model else "")
        table.add_row(escape(label), number(row["tokens_per_s"], "{:.1f}"),
                      speedup_text(row) + marks.get(base, ""),
                      number(row["acceptance_rate"], "{:.2f}"), number(row["tokens_per_step"], "{:.2f}"),
                      number(row["lossless"], "{:.0%}"))
    out.print(table)
    if marks:
        first = next(base for base in bases if base is not None)
        out.print(escape(f"speedups divide by {short_label(first)}, " + ", ".join(
            f"{mark} by {short_label(base)}" for base, mark in marks.items())))
    for index, name in enumerate(drafts):
        out.print(escape(f"d{index + 1}: draft model {name}"), soft_wrap=True)
    where = "tables/efficiency.md" if report else f"skipbench report {store.root}"
    for line in report_lines(summary, where=where):
        out.print(escape(line))  # wrapped at the terminal's width, like the table above it
    for error in store.errors() if device is None else []:
        out.print(f"{'' if error.get('unsupported') else '[red]failed[/] '}{escape(error['cell_label'])}: "
                  f"{escape(error['error'])}", soft_wrap=True)


# --------------------------------------------------------------------------- training


def train_config(**options) -> TrainConfig:
    """A training configuration from the train command's options (or a sweep file's [[train]] entry)."""
    from skipbench.train import config_from

    return config_from(options)


def run_train(config: TrainConfig) -> None:
    """Train with a progress bar, then print the agreement table."""
    from skipbench.train import train as run_training

    bar = RichBar(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                  TimeElapsedColumn(), console=console)
    with bar:
        task = bar.add_task("train", total=config.steps, stats="")

        def progress(step: int, total: int | None, loss: float, tokens_per_s: float) -> None:
            bar.update(task, completed=step, total=total, stats=f"loss {loss:.3f}  {tokens_per_s:,.0f} tok/s")

        result = run_training(config, progress=progress)
    table = Table(title=escape(f"{config.recipe} recipe: held-out loss {result.held_out_loss:.3f} after "
                               f"{result.steps} steps ({result.seconds:.0f} s)"))
    for name in ("after layer", "top-1 agreement with the final layer", "held-out loss"):
        table.add_column(name, justify="right")
    for layer, agreement in result.agreement_by_layer.items():
        table.add_row(str(layer), f"{agreement:.3f}", f"{result.loss_by_layer[layer]:.3f}")
    out.print(table)
    out.print(escape(f"checkpoint: {result.out_dir} (use --model {result.out_dir})"), soft_wrap=True)
