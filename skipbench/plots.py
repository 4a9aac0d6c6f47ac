"""Plots of a run's summary (and overlays of several runs), each written as PNG and PDF.

Plots take the summary they are given (`summary.load_summary`), with its intervals as error bars.
Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through
``pyplot``, so no display and no global backend state are involved. A plot with nothing to show (e.g. no
self-speculative cells) is skipped, not written empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from skipbench import methods
from skipbench.summary import load_summary
from skipbench.tables import draft_or_exit, exit_cells

FORMATS = ("png", "pdf")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINES = ("-", "--", "-.", ":")


def _figure(width: float = 6.4, height: float = 4.2) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, stem: Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf``; return both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in FORMATS:
        path = stem.parent / f"{stem.name}.{ext}"
        figure.savefig(path, dpi=150)
        paths.append(path)
    return paths


def _title(manifest: dict | None, what: str) -> str:
    manifest = manifest or {}
    target = (manifest.get("models") or {}).get("target") or {}
    name = target.get("name") or (manifest.get("setup") or {}).get("model") or ""
    synthetic = " [SYNTHETIC]" if target.get("synthetic") else ""
    return f"{what}\n{name}{synthetic}"


def _error(frame: pd.DataFrame, metric: str) -> np.ndarray | None:
    """Asymmetric error bars from the interval columns; None when there are none."""
    if f"{metric}_low" not in frame or frame[f"{metric}_low"].isna().all():
        return None
    low = (frame[metric] - frame[f"{metric}_low"]).clip(lower=0).fillna(0)
    high = (frame[f"{metric}_high"] - frame[metric]).clip(lower=0).fillna(0)
    return np.vstack([low.to_numpy(float), high.to_numpy(float)])


def _offsets(count: int, width: float = 0.15) -> list[float]:
    """Small x offsets so that lines with equal values stay visible side by side."""
    return [0.0] if count < 2 else list(np.linspace(-width, width, count))


def tokens_per_s_vs_exit(summary: pd.DataFrame, manifest: dict, stem: Path) -> list[Path]:
    """Tokens/s against exit layer, one line per (backend, K) with error bars; the baselines (with their
    intervals as bands) and the two-model cells as horizontal lines. A/A controls are left out."""
    cells = exit_cells(summary)
    if cells.empty:
        return []
    figure = _figure(9.0, 4.6)
    axes = figure.add_subplot()
    lines = list(cells.groupby(["backend", "num_speculations"], sort=False))
    for number, ((backend, k), line) in enumerate(lines):
        line = line.sort_values("exit_layer")
        x = line["exit_layer"].to_numpy(float) + _offsets(len(lines))[number]
        label = f"K={int(k)}" + (f" ({backend})" if cells["backend"].nunique() > 1 else "")
        axes.errorbar(x, line["tokens_per_s"], yerr=_error(line, "tokens_per_s"), linestyle=LINES[number % 4],
                      marker=MARKERS[number % len(MARKERS)], capsize=3, label=label)
    flat = summary[summary["exit_layer"].isna() & (summary["replica"] == 0)]
    for number, row in enumerate(flat.to_dict("records")):
        speculates = methods.method_for(row["strategy"], row["backend"]).speculates
        color = f"C{(len(lines) + number) % 10}" if speculates else "black"
        axes.axhline(row["tokens_per_s"], color=color, linestyle=LINES[number % 4], linewidth=1,
                     label=row["cell_label"])
        if not speculates and not pd.isna(row["tokens_per_s_low"]):
            axes.axhspan(row["tokens_per_s_low"], row["tokens_per_s_high"], color=color, alpha=0.08)
    axes.set_xlabel("exit layer")
    axes.set_ylabel("tokens / s (95% interval)")
    axes.set_xticks(sorted({int(e) for e in cells["exit_layer"]}))
    axes.grid(alpha=0.3)
    # Outside the axes: a legend inside would hide the lines it names.
    axes.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.set_title(_title(manifest, "throughput vs exit layer"), fontsize="medium")
    return save(figure, stem)


def heatmap(cells: pd.DataFrame, metric: str, manifest: dict, stem: Path, label: str) -> list[Path]:
    """``metric`` over (exit layer, K), values written in; speedup on a diverging scale centred on 1.0,
    so that slower (red) and faster (blue) than autoregressive read apart at a glance."""
    cells = exit_cells(cells)
    if cells.empty or cells[metric].isna().all():
        return []
    grid = cells.pivot_table(index="exit_layer", columns="num_speculations", values=metric, aggfunc="mean")
    grid = grid.sort_index().sort_index(axis=1)
    values = grid.to_numpy(dtype=float)
    figure = _figure(max(3.5, 1.2 + 0.9 * values.shape[1]), max(3.0, 1.4 + 0.45 * values.shape[0]))
    axes = figure.add_subplot()
    if metric == "speedup":
        low, high = min(np.nanmin(values), 0.99), max(np.nanmax(values), 1.01)
        image = axes.imshow(values, aspect="auto", cmap="RdBu", origin="lower",
                            norm=TwoSlopeNorm(vcenter=1.0, vmin=low, vmax=high))
    else:
        image = axes.imshow(values, aspect="auto", cmap="viridis", origin="lower", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, label=label)
    axes.set_xticks(range(values.shape[1]), [str(int(k)) for k in grid.columns])
    axes.set_yticks(range(values.shape[0]), [str(int(e)) for e in grid.index])
    axes.set_xlabel("K (draft tokens per step)")
    axes.set_ylabel("exit layer")
    for (i, j), value in np.ndenumerate(values):
        if np.isnan(value):
            continue
        shade = image.norm(value)
        color = "white" if shade < 0.2 or shade > 0.8 or (metric != "speedup" and shade < 0.6) else "black"
        axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small", color=color)
    axes.set_title(_title(manifest, label), fontsize="medium")
    return save(figure, stem)


def speedup_by_cell(summary: pd.DataFrame, manifest: dict, stem: Path) -> list[Path]:
    """Every cell's speedup with its interval, one bar each: two-model and hf rows included."""
    cells = summary[summary["speedup"].notna()]
    if len(cells) < 2:
        return []
    figure = _figure(6.4, max(2.5, 0.6 + 0.28 * len(cells)))
    axes = figure.add_subplot()
    y = np.arange(len(cells))[::-1]
    strategies = methods.strategies()
    colors = [f"C{strategies.index(name)}" for name in cells["strategy"]]
    axes.barh(y, cells["speedup"], xerr=_error(cells, "speedup"), color=colors, capsize=3)
    axes.set_yticks(y, list(cells["cell_label"]), fontsize="x-small")
    axes.axvline(1.0, color="black", linewidth=1)
    axes.set_xlabel("speedup vs autoregressive (95% interval)")
    axes.grid(alpha=0.3, axis="x")
    axes.set_title(_title(manifest, "speedup of every cell"), fontsize="medium")
    return save(figure, stem)


def acceptance_by_position(summary: pd.DataFrame, manifest: dict, stem: Path) -> list[Path]:
    """P(first i+1 drafts kept) against draft position: one panel per K, one line per exit / draft."""
    if summary.empty:
        return []
    cells = summary[summary["accept_by_position"].map(lambda v: len(v) > 0)]
    if cells.empty:
        return []
    ks = sorted({int(k) for k in cells["num_speculations"]})
    figure = _figure(max(4.5, 3.6 * len(ks)), 3.8)
    panels = figure.subplots(1, len(ks), squeeze=False, sharey=True)[0]
    for axes, k in zip(panels, ks, strict=True):
        part = cells[cells["num_speculations"] == k]
        colors = _colors(len(part))
        for number, (color, row) in enumerate(zip(colors, part.to_dict("records"), strict=True)):
            values = list(row["accept_by_position"])
            label = draft_or_exit(row) + ("" if row["backend"] == "native" else f" ({row['backend']})")
            # Lines often coincide (every draft kept): markers, dashes and offsets keep each visible.
            x = np.arange(1, len(values) + 1) + _offsets(len(part), 0.1)[number]
            axes.plot(x, values, marker=MARKERS[number % len(MARKERS)], color=color,
                      linestyle=LINES[number % 4], markersize=8 - 1.5 * (number % 4), label=label)
        axes.set_title(f"K={k}", fontsize="medium")
        axes.set_xlabel("draft position")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylim(-0.02, 1.02)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small")
    panels[0].set_ylabel("fraction of steps keeping drafts 1..i")
    figure.suptitle(_title(manifest, "acceptance by draft position"), fontsize="medium")
    return save(figure, stem)


def _colors(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.9, max(count, 1))]


def plot_run(summary: pd.DataFrame, manifest: dict, out: Path) -> list[Path]:
    """Every plot of one run's summary into ``out``; return the files written.

    ``tokens_per_s_vs_exit``, ``speedup_by_cell``, ``heatmap_speedup_<backend>``,
    ``heatmap_acceptance_<backend>`` and ``acceptance_by_position``, each ``.png`` and ``.pdf``.
    """
    if summary.empty:
        return []
    written = tokens_per_s_vs_exit(summary, manifest, out / "tokens_per_s_vs_exit")
    written += speedup_by_cell(summary, manifest, out / "speedup_by_cell")
    for backend, cells in summary.groupby("backend", sort=False):
        written += heatmap(cells, "speedup", manifest, out / f"heatmap_speedup_{backend}",
                           f"speedup vs autoregressive ({backend})")
        written += heatmap(cells, "acceptance_rate", manifest, out / f"heatmap_acceptance_{backend}",
                           f"acceptance rate ({backend})")
    written += acceptance_by_position(summary, manifest, out / "acceptance_by_position")
    return written


def overlay_runs(run_dirs: Sequence[Path | str], labels: Sequence[str], out_path: Path | str) -> list[Path]:
    """`overlay` of the runs stored in `run_dirs`."""
    return overlay([load_summary(run_dir)[0] for run_dir in run_dirs], labels, out_path)


def overlay(summaries: Sequence[pd.DataFrame], labels: Sequence[str], out_path: Path | str) -> list[Path]:
    """Two or more runs on shared axes: speedup (with intervals) and acceptance vs exit layer.

    Like the LayerSkip blog's "Normal vs LayerSkip" figures: one colour and marker per run, one line style
    per K, runs offset slightly on x so equal values stay visible (the native backend when a run has both).
    Writes ``out_path`` as PNG and PDF; nothing when no run has self-speculative cells.
    """
    if len(summaries) < 2:
        raise ValueError("overlay needs two or more runs")
    if len(labels) != len(summaries):
        raise ValueError(f"{len(summaries)} runs but {len(labels)} labels")
    runs = []
    for summary, label in zip(summaries, labels, strict=True):
        cells = exit_cells(summary)
        if not cells.empty:
            backend = "native" if (cells["backend"] == "native").any() else cells["backend"].iloc[0]
            runs.append((label, cells[cells["backend"] == backend]))
    if not runs:
        return []
    figure = _figure(10.0, 4.0)
    speed, accept = figure.subplots(1, 2)
    all_ks = sorted({int(k) for _, cells in runs for k in cells["num_speculations"]})
    offsets = _offsets(len(runs))
    for number, (label, cells) in enumerate(runs):
        for k, line in cells.groupby("num_speculations"):
            line = line.sort_values("exit_layer")
            x = line["exit_layer"].to_numpy(float) + offsets[number]
            style = dict(marker=MARKERS[number % len(MARKERS)], color=f"C{number}",
                         linestyle=LINES[all_ks.index(int(k)) % 4])
            name = f"{label}, K={int(k)}" if len(all_ks) > 1 else label
            speed.errorbar(x, line["speedup"], yerr=_error(line, "speedup"), capsize=3, label=name, **style)
            accept.plot(x, line["acceptance_rate"], label=name, **style)
    speed.axhline(1.0, color="black", linewidth=1, linestyle="--")
    speed.set_ylabel("speedup vs autoregressive (95% interval)")
    accept.set_ylabel("acceptance rate")
    accept.set_ylim(-0.02, 1.02)
    for axes in (speed, accept):
        axes.set_xlabel("exit layer")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(" vs ".join(labels), fontsize="medium")
    out_path = Path(out_path)
    if out_path.suffix.lower() in (".png", ".pdf"):
        out_path = out_path.with_suffix("")
    return save(figure, out_path)
