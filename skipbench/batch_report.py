"""Batches in a run's report: the latency table, speedup against batch size, throughput against TPOT p50.

- `latency.md`: per cell, TTFT, TPOT, ITL and E2E at p50 / p90 / p99 over its requests (p50 with its interval).
- `batch_speedup.md` and `plots/speedup_vs_batch.png`: one line per strategy / exit / K / draft / backend, its
  speedup against autoregressive at the same batch size, with intervals; the first batch size whose whole
  interval lies below 1.00 is marked as where speculation stops paying (only where the interval says so).
  Next to each measured speedup, the time model's (`predicted_speedup_time`: the passes the cell ran, timed
  per block size at its batch's rows, `calibrate`) and measured / predicted; dashed in the plot.
- `plots/throughput_vs_tpot.png`: tokens/s against TPOT p50, one point per batch size (the serving trade-off).
Nothing is written for a run without the latency columns (older runs) or, for the batch files, with one batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from skipbench.latency import MEASURES, PERCENTILES
from skipbench.spec import Cell
from skipbench.store import write_atomic

LINE = ("strategy", "exit_layer", "num_speculations", "draft_model", "backend", "draft_policy")


def _ms(value: float) -> str:
    return "-" if value != value else f"{value * 1000:.1f}"


def latency_table(summary: pd.DataFrame) -> str:
    """Markdown: one row per cell, milliseconds."""
    if "ttft_p50_s" not in summary:
        return ""
    head = ["cell", "B"] + [f"{name.upper()} p{q}" for name in MEASURES for q in PERCENTILES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary.to_dict("records"):
        values = []
        for name in MEASURES:
            for q in PERCENTILES:
                value = _ms(row.get(f"{name}_p{q}_s", np.nan))
                if q == 50 and value != "-":
                    value += f" [{_ms(row[f'{name}_p50_s_low'])}, {_ms(row[f'{name}_p50_s_high'])}]"
                values.append(value)
        lines.append("| " + " | ".join([row["cell_label"], str(int(row.get("batch_size", 1))), *values]) + " |")
    return "\n".join(["Latency per request in ms (p50 [95% interval]); ITL pools every gap between emitted tokens.",
                      "", *lines, ""])


def speedup_lines(summary: pd.DataFrame) -> list[dict]:
    """Per speculating configuration: batch sizes, speedups with intervals, and where speculation stops paying."""
    speculating = [Cell.from_record(row).method.speculates for row in summary.to_dict("records")]
    chosen = summary[np.asarray(speculating, dtype=bool) & summary["speedup"].notna()]
    found = []
    for _, part in chosen.groupby(list(LINE), dropna=False, sort=False):
        part = part.sort_values("batch_size")
        paid = part[part["speedup_low"] > 1.0]
        # Where it was shown to pay at a smaller batch, the first larger batch shown not to.
        below = part[(part["speedup_high"] < 1.0) & (part["batch_size"] > paid["batch_size"].min())] if len(paid) \
            else part.iloc[:0]
        label = part["cell_label"].iloc[0].replace(f" B={int(part['batch_size'].iloc[0])}", "")
        found.append({"label": label, "batch": part["batch_size"].astype(int).tolist(),
                      "speedup": part["speedup"].tolist(), "low": part["speedup_low"].tolist(),
                      "high": part["speedup_high"].tolist(),
                      "predicted": part.get("predicted_speedup_time", pd.Series(np.nan, index=part.index)).tolist(),
                      "stops_paying": int(below["batch_size"].iloc[0]) if len(below) else None})
    return found


def speedup_table(lines: list[dict]) -> str:
    sizes = sorted({size for line in lines for size in line["batch"]})
    head = ["cell", *[f"B={size}" for size in sizes], "stops paying at"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for line in lines:
        cells = []
        for size in sizes:
            if size in line["batch"]:
                i = line["batch"].index(size)
                cells.append(f"{line['speedup'][i]:.2f}x [{line['low'][i]:.2f}, {line['high'][i]:.2f}]")
            else:
                cells.append("-")
        stop = "-" if line["stops_paying"] is None else f"B={line['stops_paying']}"
        rows.append("| " + " | ".join([line["label"], *cells, stop]) + " |")
    text = ["Speedup against autoregressive at the same batch size [95% interval]; speculation stops paying at the "
            "first batch size whose interval lies below 1.00 after one whose interval lay above it (-: not shown).",
            "", *rows, ""]
    return "\n".join(text + predicted_table(lines))


def _times(value: float) -> str:
    return "-" if value != value else f"{value:.2f}x"


def predicted_table(lines: list[dict]) -> list[str]:
    """Measured against the time model, one row per configuration and batch size (nothing without a model)."""
    if not any(value == value for line in lines for value in line.get("predicted", [])):
        return []
    rows = ["| cell | B | measured [95% interval] | predicted | measured / predicted |", "|---|---|---|---|---|"]
    for line in lines:
        for size, speed, low, high, predicted in zip(line["batch"], line["speedup"], line["low"], line["high"],
                                                     line["predicted"], strict=True):
            ratio = speed / predicted if predicted == predicted and predicted else float("nan")
            rows.append(f"| {line['label']} | {size} | {_times(speed)} [{low:.2f}, {high:.2f}] | {_times(predicted)} "
                        f"| {'-' if ratio != ratio else f'{ratio:.2f}'} |")
    return ["Measured against predicted: the time model (`calibrate`) times a layer and the head per block size at "
            "each batch's rows; a cell's prediction sums its passes (each batched pass once), over the same for "
            "autoregressive at that batch size.", "", *rows, ""]


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_png(str(path))
    return path


def plot_speedup(lines: list[dict], path: Path) -> Path:
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    for line in lines:
        speed, low, high = (np.asarray(line[name], dtype=float) for name in ("speedup", "low", "high"))
        drawn = axes.errorbar(line["batch"], speed, yerr=[np.nan_to_num(speed - low), np.nan_to_num(high - speed)],
                              marker="o", capsize=3, label=line["label"])
        predicted = np.asarray(line.get("predicted", [np.nan] * len(speed)), dtype=float)
        if np.isfinite(predicted).any():
            axes.plot(line["batch"], predicted, linestyle="--", marker="x", color=drawn.lines[0].get_color(),
                      label=f"{line['label']} (predicted)")
        if line["stops_paying"] is not None:
            at = line["batch"].index(line["stops_paying"])
            axes.scatter([line["stops_paying"]], [speed[at]], s=160, facecolors="none", edgecolors="red")
    axes.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("batch size")
    axes.set_ylabel("speedup vs autoregressive (same batch size)")
    axes.legend(fontsize="small")
    axes.set_title("Speedup vs batch size (red ring: stops paying)")
    return _save(figure, path)


def plot_throughput(summary: pd.DataFrame, path: Path) -> Path:
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    for _, part in summary.groupby(list(LINE), dropna=False, sort=False):
        part = part.sort_values("batch_size")
        label = part["cell_label"].iloc[0].replace(f" B={int(part['batch_size'].iloc[0])}", "")
        axes.plot(part["tpot_p50_s"] * 1000, part["tokens_per_s"], marker="o", label=label)
        for _, row in part.iterrows():
            axes.annotate(f"B={int(row['batch_size'])}", (row["tpot_p50_s"] * 1000, row["tokens_per_s"]),
                          fontsize="x-small")
    axes.set_xlabel("TPOT p50 (ms)")
    axes.set_ylabel("throughput (tokens/s, all rows)")
    axes.legend(fontsize="small")
    axes.set_title("Throughput vs time per output token")
    return _save(figure, path)


def write_batch_report(summary: pd.DataFrame, tables: Path, plots: Path | None, notes: Sequence[str] = (),
                       tag: str | None = None) -> list[Path]:
    """The latency table, and with more than one batch size the speedup table and both plots; `notes` (the run's
    provenance) under each table, `tag` (a device) in each file name, as the other tables have them."""
    written = []
    suffix = f"_{tag}" if tag else ""
    under = "".join(f"\n_{note.replace('|', '/')}_  " for note in notes)
    text = latency_table(summary)
    if text:
        write_atomic(tables / f"latency{suffix}.md", (text + under + "\n").encode())
        written.append(tables / f"latency{suffix}.md")
    if "batch_size" not in summary or summary["batch_size"].nunique() < 2 or not text:
        return written
    lines = speedup_lines(summary)
    write_atomic(tables / f"batch_speedup{suffix}.md", (speedup_table(lines) + under + "\n").encode())
    written.append(tables / f"batch_speedup{suffix}.md")
    if plots is not None:
        written += [plot_speedup(lines, plots / "speedup_vs_batch.png"),
                    plot_throughput(summary, plots / "throughput_vs_tpot.png")]
    return written
