"""Draft policies against the grid: each dynamic cell of a run against the best static cell of the same run.

"Best static" is the static cell (same strategy and backend, any exit and K) with the highest speedup over
the baseline. The comparison pairs the two cells by prompt and round, as speedups do (`intervals.speedup`:
the ratio of sums of time per token with its bootstrap interval), so a ratio above 1 means the policy beat
the best cell the grid found. Alongside: the mean exit and draft length the policy chose per round, its
tokens per step and FLOPs per token against the static cell's (what its statistics cost), and a plot of the
exit and K it chose round by round for a few prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from skipbench import intervals
from skipbench.spec import Cell
from skipbench.store import RunStore
from skipbench.summary import first_rows, load_summary, rounds_of, units

COLUMNS = ["policy_cell", "static_cell", "ratio", "ratio_low", "ratio_high", "policy_speedup", "static_speedup",
           "mean_exit", "mean_k", "policy_tokens_per_step", "static_tokens_per_step", "policy_flops_per_token",
           "static_flops_per_token"]


def _choices(rows: pd.DataFrame) -> tuple[float, float]:
    """Mean exit and mean drafts per round, over every round of each prompt's first row."""
    first = first_rows(rows)
    drafted = np.concatenate([np.asarray(v, dtype=float) for v in first["step_drafted"]])
    if "step_exit" in first:
        exits = np.concatenate([np.asarray(v, dtype=float) for v in first["step_exit"]])
        exits = exits[exits >= 0]
    else:
        exits = np.array([])
    mean_exit = float(exits.mean()) if exits.size else float(first["exit_layer"].iloc[0])
    return mean_exit, float(drafted.mean()) if drafted.size else float("nan")


def versus_best_static(summary: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """One row per dynamic cell: its paired time-per-token ratio against the best static cell (see module)."""
    if summary.empty or "draft_policy" not in summary:
        return pd.DataFrame(columns=COLUMNS)
    records = []
    for _, row in summary[summary["draft_policy"] != "static"].iterrows():
        same = summary[(summary["draft_policy"] == "static") & (summary["strategy"] == row["strategy"])
                       & (summary["backend"] == row["backend"]) & summary["speedup"].notna()]
        if same.empty:
            continue
        best = same.loc[same["speedup"].idxmax()]
        mine, theirs = (frame[frame["cell_key"] == key] for key in (row["cell_key"], best["cell_key"]))
        prompts = sorted(int(i) for i in mine["prompt_index"].unique())
        rounds = rounds_of(mine, theirs)
        ratio, low, high = intervals.speedup(units(mine, "time_s", "new_tokens", prompts, rounds),
                                             units(theirs, "time_s", "new_tokens", prompts, rounds))
        mean_exit, mean_k = _choices(mine)
        records.append({"policy_cell": row["cell_label"], "static_cell": best["cell_label"], "ratio": ratio,
                        "ratio_low": low, "ratio_high": high, "policy_speedup": row["speedup"],
                        "static_speedup": best["speedup"], "mean_exit": mean_exit, "mean_k": mean_k,
                        "policy_tokens_per_step": row["tokens_per_step"],
                        "static_tokens_per_step": best["tokens_per_step"],
                        "policy_flops_per_token": row.get("flops_per_token", np.nan),
                        "static_flops_per_token": best.get("flops_per_token", np.nan)})
    return pd.DataFrame(records, columns=COLUMNS)


def markdown(table: pd.DataFrame) -> str:
    lines = ["| policy | best static cell | policy / best static (time per token) | speedups vs AR | mean E | "
             "mean K | tokens/step | GFLOP/token |", "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.policy_cell} | {r.static_cell} | {r.ratio:.2f}x [{r.ratio_low:.2f}, {r.ratio_high:.2f}] "
                     f"| {r.policy_speedup:.2f}x vs {r.static_speedup:.2f}x | {r.mean_exit:.1f} | {r.mean_k:.2f} | "
                     f"{r.policy_tokens_per_step:.2f} vs {r.static_tokens_per_step:.2f} | "
                     f"{r.policy_flops_per_token / 1e9:.3f} vs {r.static_flops_per_token / 1e9:.3f} |")
    return "\n".join(lines) + "\n"


def rounds_plot(frame: pd.DataFrame, stem: Path, prompts: int = 3) -> list[Path]:
    """Exit layer and K per round, for the first `prompts` prompts of each dynamic cell."""
    dynamic = [key for key, rows in frame.groupby("cell_key", sort=False)
               if Cell.from_record(rows.iloc[0]).draft_policy != "static"]
    if not dynamic:
        return []
    figure = Figure(figsize=(6.4, 2.2 * len(dynamic) + 0.6))
    FigureCanvasAgg(figure)
    for index, key in enumerate(dynamic):
        rows = first_rows(frame[frame["cell_key"] == key]).head(prompts)
        axis = figure.add_subplot(len(dynamic), 1, index + 1)
        for number, row in enumerate(rows.itertuples()):
            color = f"C{number}"
            axis.step(range(len(row.step_drafted)), row.step_drafted, where="post", color=color,
                      label=f"K, prompt {row.prompt_index}")
            exits = [value if value >= 0 else np.nan for value in getattr(row, "step_exit", [])]
            if exits and not all(np.isnan(exits)):
                axis.plot(range(len(exits)), exits, "o", color=color, markersize=3,
                          label=f"E, prompt {row.prompt_index}")
        axis.set_title(Cell.from_record(frame[frame["cell_key"] == key].iloc[0]).label(), fontsize=9)
        axis.set_xlabel("round")
        axis.set_ylabel("K (line), E (dots)")
        axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    stem.parent.mkdir(parents=True, exist_ok=True)
    path = stem.with_suffix(".png")
    figure.savefig(path, dpi=120)
    return [path]


def write_policy_report(run_dir: Path | str) -> tuple[pd.DataFrame, list[Path]]:
    """tables/policies.{md,csv} and plots/policy_rounds.png of a run; returns the table and the files."""
    run_dir = Path(run_dir)
    summary, _ = load_summary(run_dir)
    frame = RunStore(run_dir).read_cells()
    table = versus_best_static(summary, frame)
    (run_dir / "tables").mkdir(parents=True, exist_ok=True)
    files = [run_dir / "tables" / "policies.md", run_dir / "tables" / "policies.csv"]
    files[0].write_text(markdown(table))
    table.to_csv(files[1], index=False)
    return table, files + rounds_plot(frame, run_dir / "plots" / "policy_rounds")
