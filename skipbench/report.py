"""Per-cell figures computed from the raw per-prompt records (see METRICS.md for each definition)."""

from __future__ import annotations

import numpy as np
import pandas as pd

CELL_COLUMNS = ["cell_key", "cell_label", "strategy", "backend", "exit_layer", "num_speculations", "draft_model"]


def accept_by_position(group: pd.DataFrame) -> list[float]:
    """For draft position i: the fraction of steps that drafted >= i+1 tokens and kept the first i+1."""
    drafted = np.concatenate([np.asarray(v, dtype=int) for v in group["step_drafted"]]) if len(group) else []
    accepted = np.concatenate([np.asarray(v, dtype=int) for v in group["step_accepted"]]) if len(group) else []
    drafted, accepted = np.asarray(drafted), np.asarray(accepted)
    if drafted.size == 0 or drafted.max(initial=0) == 0:
        return []
    return [float((accepted[drafted > i] > i).mean()) for i in range(int(drafted.max()))]


def first_difference(tokens: list[int], reference: list[int]) -> int:
    """Index of the first differing token; -1 when equal."""
    for index, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return index
    return -1 if len(tokens) == len(reference) else min(len(tokens), len(reference))


def baseline_tokens(frame: pd.DataFrame, backend: str) -> dict[int, list[int]]:
    """The autoregressive tokens per prompt: the same backend's baseline, else any baseline."""
    ar = frame[frame["strategy"] == "autoregressive"]
    same = ar[ar["backend"] == backend]
    chosen = same if len(same) else ar
    return {int(row.prompt_index): list(row.tokens) for row in chosen.itertuples()}


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: speed, acceptance, speedup and losslessness versus autoregressive, quality."""
    if frame.empty:
        return pd.DataFrame()
    quality = [c for c in frame.columns if c.startswith("quality_")]
    rows = []
    for key, group in frame.groupby("cell_key", sort=False):
        first = group.iloc[0]
        row = {column: first[column] for column in CELL_COLUMNS}
        row["exit_layer"] = None if pd.isna(row["exit_layer"]) else int(row["exit_layer"])
        row["num_speculations"] = None if pd.isna(row["num_speculations"]) else int(row["num_speculations"])
        new_tokens, time_s = group["new_tokens"].sum(), group["time_s"].sum()
        drafted, accepted, steps = group["drafted"].sum(), group["accepted"].sum(), group["verify_steps"].sum()
        per_sample = (group["accepted"] / group["drafted"]).where(group["drafted"] > 0)
        row |= {
            "prompts": len(group),
            "new_tokens": int(new_tokens),
            "tokens_per_s": new_tokens / time_s if time_s else float("nan"),
            "time_per_token_s": time_s / new_tokens if new_tokens else float("nan"),
            "time_per_input_s": time_s / len(group),
            "prefill_s": group["prefill_s"].mean(),
            "drafted": int(drafted),
            "accepted": int(accepted),
            "acceptance_rate": accepted / drafted if drafted else float("nan"),
            "acceptance_rate_per_sample": per_sample.mean(),
            "verify_steps": int(steps),
            "tokens_per_step": new_tokens / steps if steps else float("nan"),
            "accept_by_position": accept_by_position(group),
            "peak_mem_bytes": group["peak_mem_bytes"].max() if "peak_mem_bytes" in group else None,
        }
        row |= {column: group[column].mean() for column in quality}
        rows.append(row)
    summary = pd.DataFrame(rows)

    # Speedup and losslessness against the autoregressive baseline on the same prompts of the same run.
    speedups, lossless = [], []
    for row in summary.itertuples():
        ar = summary[(summary["strategy"] == "autoregressive") & (summary["backend"] == row.backend)]
        ar = ar if len(ar) else summary[summary["strategy"] == "autoregressive"]
        speedups.append(ar["time_per_input_s"].iloc[0] / row.time_per_input_s if len(ar) else float("nan"))
        reference = baseline_tokens(frame, row.backend)
        group = frame[frame["cell_key"] == row.cell_key]
        same = [first_difference(list(t), reference[int(i)]) == -1
                for i, t in zip(group["prompt_index"], group["tokens"]) if int(i) in reference]
        lossless.append(sum(same) / len(same) if same else float("nan"))
    summary["speedup"] = speedups
    summary["lossless"] = lossless
    return summary
