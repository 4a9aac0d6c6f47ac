"""The paired ranking of an exit x K grid: each cell against the fastest (or the most accepting) on the prompts
and rounds both measured, so that the prompts' shared spread cancels (METRICS: paired ranking)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from skipbench import intervals
from skipbench.intervals import MIN_UNITS
from skipbench.pairing import first_rows, rounds_of, units


def grid_keys(summary: pd.DataFrame) -> dict[str, list[int]]:
    """The positions of each backend's exit x K grid (the cells `tables.grid_table` lays out)."""
    if summary.empty:
        return {}
    grid = summary[summary["exit_layer"].notna() & summary["num_speculations"].notna() & (summary["replica"] == 0)]
    return {str(backend): list(part.index) for backend, part in grid.groupby("backend", sort=False)}


def _prompt_table(rows: pd.DataFrame, numerator: str, denominator: str, prompts: list[int]) -> intervals.Units:
    """One column per prompt's first row (counts are the same in every round): units of a per-prompt ratio."""
    first = first_rows(rows).set_index("prompt_index")
    pick = [int(p) for p in prompts]
    return intervals.Units(first[numerator].reindex(pick).to_numpy(float)[:, None],
                           first[denominator].reindex(pick).to_numpy(float)[:, None])


def paired_ranking(units_of: dict, merit: dict, *, cost: bool = True) -> dict:
    """Rank cells by a ratio measured on shared units, each cell paired with the leader (the highest `merit`):
    a cost (`cost`, lower is better: time per token on (prompt, round) units) or a rate (acceptance: accepted
    over drafted, on prompts).

    Returns key -> (mark, ratio, low, high): ratio = the cell's merit over the leader's on the units both
    measured, with its paired bootstrap interval (the shared units resampled the same way for both, so the
    prompts' spread cancels). The leader is "best" when every other cell's interval lies below 1 (each shown
    slower on the same units), else "tied", as is every cell whose interval reaches 1 or has too few units
    (fewer than MIN_UNITS shared) for one. Where some pair of cells shares too few units, every mark is
    "unranked": no claim is made."""
    keys = [key for key in units_of if merit.get(key) == merit.get(key) and merit.get(key) is not None]
    if len(keys) < 2:  # nothing to rank against
        return {}
    leader = max(keys, key=lambda key: merit[key])
    found, tied, few = {}, False, False
    for key in keys:
        if key == leader:
            continue
        # Paired.of(a, b) is b's ratio over a's: (leader's cost / cell's) or (cell's rate / leader's).
        pair = (units_of[key], units_of[leader]) if cost else (units_of[leader], units_of[key])
        paired = intervals.Paired.of(*pair)
        low = high = float("nan")
        if int(paired.counts.sum()) >= MIN_UNITS:
            low, high = intervals.bounds(paired.samples(intervals.draws(*paired.shape)))
        else:
            few = True
        undecided = not high < 1.0
        found[key] = ("tied" if undecided else "", paired.point(), low, high)
        tied |= undecided
    found[leader] = ("tied" if tied else "best", 1.0, float("nan"), float("nan"))
    if few:  # too few shared units to rank: no cell is marked (`tables.grid_note` says so)
        found = {key: ("unranked", *values) for key, (_, *values) in found.items()}
    return found


def rank_grid(summary: pd.DataFrame, groups: dict[str, pd.DataFrame]) -> dict[str, list]:
    """Columns of the paired ranking of each backend's exit x K grid: `best` ("best", "tied" or ""), and
    `speed_vs_best` [low, high] (the cell's tokens/s over the leader's, paired); the same for acceptance
    (`best_acceptance`, `acceptance_vs_best`), paired by prompt. Cells outside a grid get "" and NaN."""
    columns = {name: [""] * len(summary) if name.startswith("best") else [np.nan] * len(summary)
               for name in ("best", "speed_vs_best", "speed_vs_best_low", "speed_vs_best_high", "best_acceptance",
                            "acceptance_vs_best", "acceptance_vs_best_low", "acceptance_vs_best_high")}
    for positions in grid_keys(summary).values():
        keys = [summary.loc[i, "cell_key"] for i in positions]
        rows = {key: groups[key] for key in keys}
        prompts = sorted({int(p) for part in rows.values() for p in part["prompt_index"]})
        rounds = rounds_of(*rows.values())
        speed = {key: units(part, "time_s", "new_tokens", prompts, rounds) for key, part in rows.items()}
        merit = {key: summary.loc[i, "speedup"] if summary.loc[i, "speedup"] == summary.loc[i, "speedup"]
                 else summary.loc[i, "tokens_per_s"] for key, i in zip(keys, positions, strict=True)}
        rates = {key: _prompt_table(part, "accepted", "drafted", prompts) for key, part in rows.items()}
        accept = {key: summary.loc[i, "acceptance_rate"] for key, i in zip(keys, positions, strict=True)}
        rankings = (("speed", paired_ranking(speed, merit)), ("acceptance", paired_ranking(rates, accept, cost=False)))
        for prefix, ranked in rankings:
            mark = "best" if prefix == "speed" else "best_acceptance"
            for key, i in zip(keys, positions, strict=True):
                if key in ranked:
                    columns[mark][i], *values = ranked[key]
                    for suffix, value in zip(("", "_low", "_high"), values, strict=True):
                        columns[f"{prefix}_vs_best{suffix}"][i] = value
    return columns
