"""What a summary row's figures say, in words: its warnings (impossible, too few units, timing noise or prompt
spread where the interval holds 1.00, busy), each grid's best cell, and whether any cell beats its baseline."""

from __future__ import annotations

import numpy as np
import pandas as pd

from skipbench import machine
from skipbench.intervals import MIN_UNITS
from skipbench.ranking import grid_keys


def _percent(width: float) -> str:
    return f"+-{width:.0%}" if width == width else "unmeasured"


def _needs(prompts: int, rounds: int) -> str:
    """What brings a cell to MIN_UNITS paired units: more prompts at its rounds, or more rounds."""
    more_prompts = -(-MIN_UNITS // max(rounds, 1)) - prompts
    repeats = -(-MIN_UNITS // max(prompts, 1))
    return f"{more_prompts} more prompt(s) or --repeats {repeats}"


def row_warnings(record: dict) -> list[str]:
    """The warnings of one summary row (a dict of its columns)."""
    found = []
    speedup, steps = record["speedup"], record["tokens_per_step"]
    low, high = record["speedup_low"], record["speedup_high"]
    # Impossible only when noise cannot explain it (the whole interval lies above the tokens per step: an
    # autoregressive control at 1.02x [0.97, 1.07] is noise), and only against the same implementation: each
    # step runs that implementation's full model at least once, while another backend's autoregressive
    # decoding may legitimately be faster than the native engine's.
    floor = low if low == low else speedup
    if record.get("same_backend_baseline") and floor == floor and steps == steps and floor > steps * 1.0001:
        found.append(f"impossible: speedup {speedup:.2f}x [{low:.2f}, {high:.2f}] exceeds its {steps:.2f} tokens "
                     f"per step (each step runs the full model of the same implementation at least once): the "
                     f"baseline was timed under other load")
    paired_units = record.get("speedup_units", 0)
    if not record.get("is_baseline") and 0 < paired_units < MIN_UNITS:
        prompts, rounds = record["speedup_prompts"], record["speedup_rounds"]
        found.append(f"too few units: {paired_units} paired (prompt, round) units ({prompts} prompt(s) x {rounds} "
                     f"round(s)), under the {MIN_UNITS} a bootstrap interval needs: no interval given; measure "
                     f"{_needs(prompts, rounds)}")
    found += _undecided(record)
    if record.get("preempted_rows"):
        found.append(f"busy: {record['preempted_rows']} of {record['rows']} generations got under "
                     f"{machine.PREEMPTED:.0%} of the CPU time their thread(s) could use (other work preempted "
                     f"them): their times are inflated; rerun on a quieter machine")
    return found


def _undecided(record: dict) -> list[str]:
    """Where a cell's speedup interval holds 1.00 (not shown faster or slower than its baseline), the source of
    width that stops the reading: each whose width alone reaches from the point to 1.00, else the wider one.
    Timing noise (rounds on the same prompts) calls for more rounds or a quieter machine; the prompts' spread
    is the workload itself, which only more prompts pin down. A cell whose interval clears 1.00 is read as it
    stands, however wide: nothing is flagged."""
    speedup, low, high = record["speedup"], record["speedup_low"], record["speedup_high"]
    if record.get("is_baseline") or record.get("control") or not low == low or not low <= 1.0 <= high:
        return []
    over_prompts, over_rounds = record.get("speedup_width_prompts", np.nan), record.get("speedup_width_rounds", np.nan)
    distance = abs(speedup - 1.0) / speedup
    reaching = [name for name, width in (("prompts", over_prompts), ("rounds", over_rounds))
                if width == width and width >= distance]
    if not reaching:
        widths = {"prompts": np.nan_to_num(over_prompts, nan=-1.0), "rounds": np.nan_to_num(over_rounds, nan=-1.0)}
        reaching = [max(widths, key=widths.get)]
    shown = (f"{speedup:.2f}x [{low:.2f}, {high:.2f}] holds 1.00 (not shown faster or slower than "
             f"{record.get('baseline_label') or 'the baseline'})")
    found = []
    if "rounds" in reaching:
        found.append(f"timing noise: {shown}; the same prompts timed in different rounds alone spread it by "
                     f"{_percent(over_rounds)}, against {distance:.0%} from 1.00: add --repeats, or measure on a "
                     f"quieter machine")
    if "prompts" in reaching:
        found.append(f"prompt spread: {shown}; the prompts alone spread it by {_percent(over_prompts)}, against "
                     f"{distance:.0%} from 1.00: its speedup depends on the prompt; add prompts to pin down the "
                     f"mean (more --repeats will not)")
    return found


def kind(warning: str) -> str:
    return warning.split(":", 1)[0]


ADVICE = {
    "too few units": f"no interval is given below {MIN_UNITS} paired (prompt, round) units: add prompts or --repeats",
    "timing noise": "speedup interval holds 1.00 and round-to-round timing noise alone reaches 1.00: add --repeats, "
                    "or measure on a quieter machine",
    "prompt spread": "speedup interval holds 1.00 and the prompts' spread alone reaches 1.00: add prompts",
    "busy": f"generations got under {machine.PREEMPTED:.0%} of the CPU time their thread(s) could use: other work "
            f"preempted them; rerun on a quieter machine",
}


def best_lines(summary: pd.DataFrame) -> list[str]:
    """One line per backend's exit x K grid: the best cell by the paired ranking (or the tie), and plainly
    whether any cell of the grid beats its baseline."""
    lines = []
    for backend, positions in grid_keys(summary).items():
        grid = summary.loc[positions]
        if grid.empty or (grid["best"] == "").all():
            continue
        baseline = grid["baseline_label"].dropna().iloc[0] if grid["baseline_label"].notna().any() else "the baseline"
        if (grid["best"] == "unranked").any():
            lines.append(f"the {backend} grid ({len(grid)} cells) is not ranked: too few prompts and rounds shared "
                         f"(fewer than {MIN_UNITS} units) for a paired comparison; add prompts or --repeats; "
                         f"{beats_verdict(grid, baseline)}")
            continue
        top = grid[grid["best"] != ""]
        leader = top.loc[top["speedup"].fillna(-np.inf).idxmax()]
        shown = f"{leader['cell_label']} {_speedup_text(leader)}"
        where = f"{backend} grid ({len(grid)} cells)"
        if len(top) == 1:
            line = f"best of the {where}: {shown}, faster than every other cell on the same prompts and rounds"
        else:
            line = (f"no single best in the {where}: {len(top)} cells are not shown slower than the fastest, "
                    f"{shown}, on the same prompts and rounds")
        lines.append(f"{line}; {beats_verdict(grid, baseline)}")
    return lines


def beats_verdict(cells: pd.DataFrame, baseline: str) -> str:
    """How many cells beat the baseline (their speedup interval above 1.00), said plainly, and how many cannot
    tell for want of an interval (too few units)."""
    beats = int((cells["speedup_low"] > 1.0).sum())
    unknown = int((cells["speedup_low"].isna() & cells["speedup"].notna()).sum())
    verdict = f"{beats} of {len(cells)} cells beat {baseline} (interval above 1.00)" if beats else \
        f"no cell beats {baseline}"
    if unknown and not beats:
        verdict = f"no cell is shown to beat {baseline}"
    if unknown:
        verdict += f" ({unknown} without an interval: too few units)"
    return verdict



def _speedup_text(row) -> str:
    point, low, high = row["speedup"], row["speedup_low"], row["speedup_high"]
    if point != point:
        return "-"
    if low != low:
        return f"{point:.2f}x [n={int(row.get('speedup_units') or 0)}]"
    return f"{point:.2f}x [{low:.2f}, {high:.2f}]"


def report_lines(summary: pd.DataFrame, collapse: int = 4, where: str = "tables/efficiency.md") -> list[str]:
    """What to print under a run's table: the best-cell lines, then the warnings, a kind that `collapse` or
    more cells share in one line (which cells: `where`, the table that lists them), the others one per cell."""
    lines = best_lines(summary)
    records = summary.to_dict("records") if not summary.empty else []
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for row in records:
        for warning in row["warnings"]:
            by_kind.setdefault(kind(warning), []).append((row["cell_label"], warning))
    for name, found in by_kind.items():
        if len(found) >= collapse and name in ADVICE:
            extra = ""
            if name == "busy":
                rows = int(summary["preempted_rows"].sum())
                extra = f" ({rows} of {int(summary['rows'].sum())} generations)"
            lines.append(f"warning: {name}: {len(found)} of {len(records)} cells{extra} ({where} lists them): "
                         f"{ADVICE[name]}")
        else:
            lines += [f"warning {label}: {warning}" for label, warning in found]
    return lines
