"""A run's rows paired for statistics: each prompt's first row (counts), the (prompt, round) units that pair a
cell's times with another cell's, and where two token sequences part.

Counts and tokens are the same in every repeat of a prompt (checked when measured), so they come from each
prompt's first row; times use every row, paired by prompt and round (`intervals`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from skipbench import intervals


def first_difference(tokens: list[int], reference: list[int]) -> int:
    """Index of the first differing token; -1 when equal."""
    for index, (a, b) in enumerate(zip(tokens, reference, strict=False)):
        if a != b:
            return index
    return -1 if len(tokens) == len(reference) else min(len(tokens), len(reference))


def accept_by_position(first_rows: pd.DataFrame) -> list[float]:
    """For draft position i: the fraction of steps that drafted >= i+1 tokens and kept the first i+1."""
    if first_rows.empty:
        return []
    drafted = np.concatenate([np.asarray(v, dtype=int) for v in first_rows["step_drafted"]])
    accepted = np.concatenate([np.asarray(v, dtype=int) for v in first_rows["step_accepted"]])
    if drafted.size == 0 or drafted.max(initial=0) == 0:
        return []
    return [float((accepted[drafted > i] > i).mean()) for i in range(int(drafted.max()))]


def rounds_of(*frames: pd.DataFrame) -> list[tuple[int, int]]:
    """The timed rounds of some cells' rows, as (group, round): rounds are numbered within each group."""
    return sorted({(int(g), int(r)) for frame in frames for g, r in zip(frame["group"], frame["round"], strict=True)})


def units(rows: pd.DataFrame, numerator: str, denominator: str, prompts: list[int],
          rounds: list[tuple[int, int]]) -> intervals.Units:
    """(prompt x round) tables of two columns; NaN where the cell has no row. Column r of two cells' tables
    holds what they measured in the same round of the same group: the unit a speedup pairs."""
    out = []
    for column in (numerator, denominator):
        table = np.full((len(prompts), len(rounds)), np.nan)
        where = {key: index for index, key in enumerate(rounds)}
        row_of = {prompt: index for index, prompt in enumerate(prompts)}
        for prompt, group, round_index, value in zip(rows["prompt_index"], rows["group"], rows["round"], rows[column],
                                                     strict=True):
            slot = where.get((int(group), int(round_index)))
            if slot is not None and int(prompt) in row_of:
                table[row_of[int(prompt)], slot] = value
        out.append(table)
    return intervals.Units(*out)


def first_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Each prompt's first row: its counts and tokens (the same in every repeat)."""
    return rows.sort_values(["prompt_index", "round"]).drop_duplicates("prompt_index")
