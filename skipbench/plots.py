"""Plots of a run (and overlays of several runs), each written as PNG and PDF.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never
through ``pyplot``, so no display and no global backend state are involved. A plot with
nothing to show (e.g. no self-speculative cells) is skipped, not written empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

FORMATS = ("png", "pdf")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _figure(width: float = 6.4, height: float = 4.2, **kwargs) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained", **kwargs)
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


def _self_speculative(summary: pd.DataFrame) -> pd.DataFrame:
    if summary.empty:
        return summary
    return summary[
        (summary["strategy"] == "self_speculative")
        & summary["exit_layer"].notna()
        & summary["num_speculations"].notna()
    ]


def _parts(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(file-name suffix, rows) per task of a multi-task run; one part otherwise."""
    if "dataset" not in summary or summary["dataset"].nunique() <= 1:
        return [("", summary)]
    return [
        ("_" + "".join(c if c.isalnum() or c in "-" else "-" for c in str(task)), part)
        for task, part in summary.groupby("dataset", sort=False)
    ]


def _title(manifest: dict | None, what: str, task: str = "") -> str:
    manifest = manifest or {}
    target = (manifest.get("models") or {}).get("target") or {}
    name = target.get("name") or (manifest.get("setup") or {}).get("model") or ""
    synthetic = " [SYNTHETIC]" if target.get("synthetic") else ""
    task = f", {task.lstrip('_')}" if task else ""
    return f"{what}\n{name}{synthetic}{task}"


def tokens_per_s_vs_exit(summary: pd.DataFrame, stem: Path, manifest: dict | None = None, task: str = "") -> list[Path]:
    """Tokens/s against exit layer, one line per (backend, K), the autoregressive baseline dashed."""
    cells = _self_speculative(summary)
    if cells.empty:
        return []
    figure = _figure()
    axes = figure.add_subplot()
    backends = list(dict.fromkeys(cells["backend"]))
    for b, backend in enumerate(backends):
        part = cells[cells["backend"] == backend]
        style = ["-", "--", ":"][b % 3]
        for k, line in part.groupby("num_speculations"):
            line = line.sort_values("exit_layer")
            label = f"K={int(k)}" + (f" ({backend})" if len(backends) > 1 else "")
            axes.plot(line["exit_layer"], line["tokens_per_s"], style, marker="o", label=label)
        ar = summary[(summary["strategy"] == "autoregressive") & (summary["backend"] == backend)]
        if len(ar):
            axes.axhline(
                float(ar["tokens_per_s"].iloc[0]),
                color="black",
                linestyle=style,
                linewidth=1,
                label="autoregressive" + (f" ({backend})" if len(backends) > 1 else ""),
            )
    axes.set_xlabel("exit layer")
    axes.set_ylabel("tokens / s")
    axes.set_xticks(sorted({int(e) for e in cells["exit_layer"]}))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    axes.set_title(_title(manifest, "throughput vs exit layer", task), fontsize="medium")
    return save(figure, stem)


def heatmap(
    summary: pd.DataFrame,
    metric: str,
    stem: Path,
    manifest: dict | None = None,
    label: str | None = None,
    task: str = "",
) -> list[Path]:
    """``metric`` over (exit layer, K) for one backend's self-speculative cells, values written in."""
    cells = _self_speculative(summary)
    if cells.empty or cells[metric].isna().all():
        return []
    grid = cells.pivot_table(index="exit_layer", columns="num_speculations", values=metric, aggfunc="mean")
    grid = grid.sort_index().sort_index(axis=1)
    values = grid.to_numpy(dtype=float)
    figure = _figure(max(3.5, 1.2 + 0.9 * values.shape[1]), max(3.0, 1.4 + 0.45 * values.shape[0]))
    axes = figure.add_subplot()
    image = axes.imshow(values, aspect="auto", cmap="viridis", origin="lower")
    figure.colorbar(image, ax=axes, label=label or metric)
    axes.set_xticks(range(values.shape[1]), [str(int(k)) for k in grid.columns])
    axes.set_yticks(range(values.shape[0]), [str(int(e)) for e in grid.index])
    axes.set_xlabel("K (draft tokens per step)")
    axes.set_ylabel("exit layer")
    best = np.nanmax(values)
    low, high = np.nanmin(values), best
    for (i, j), value in np.ndenumerate(values):
        if np.isnan(value):
            continue
        text = f"{value:.2f}"
        bright = high > low and (value - low) / (high - low) > 0.6
        axes.text(
            j,
            i,
            text,
            ha="center",
            va="center",
            fontsize="small",
            fontweight="bold" if np.isclose(value, best) else "normal",
            color="black" if bright else "white",
        )
    axes.set_title(_title(manifest, label or metric, task), fontsize="medium")
    return save(figure, stem)


def acceptance_by_position(
    summary: pd.DataFrame, stem: Path, manifest: dict | None = None, task: str = ""
) -> list[Path]:
    """P(first i+1 drafts kept) against draft position: one panel per K, one line per exit / draft."""
    if summary.empty:
        return []
    cells = summary[(summary["strategy"] != "autoregressive") & summary["accept_by_position"].map(lambda v: len(v) > 0)]
    if cells.empty:
        return []
    ks = sorted({int(k) for k in cells["num_speculations"]})
    figure = _figure(max(4.5, 3.6 * len(ks)), 3.8)
    panels = figure.subplots(1, len(ks), squeeze=False, sharey=True)[0]
    for axes, k in zip(panels, ks, strict=True):
        part = cells[cells["num_speculations"] == k]
        colors = _colors(len(part))
        for color, row in zip(colors, part.itertuples(), strict=True):
            values = list(row.accept_by_position)
            if row.strategy == "self_speculative":
                label = f"exit {int(row.exit_layer)}"
            else:
                label = f"draft {row.draft_model}"
            if row.backend != "native":
                label += f" ({row.backend})"
            # Lines often coincide (every draft kept): markers and dashes keep each visible.
            number = len(axes.get_lines())
            axes.plot(
                range(1, len(values) + 1),
                values,
                marker=MARKERS[number % len(MARKERS)],
                color=color,
                linestyle=["-", "--", "-.", ":"][number % 4],
                markersize=8 - 1.5 * (number % 4),
                label=label,
            )
        axes.set_title(f"K={k}", fontsize="medium")
        axes.set_xlabel("draft position")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylim(-0.02, 1.02)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small")
    panels[0].set_ylabel("fraction of steps keeping drafts 1..i")
    figure.suptitle(_title(manifest, "acceptance by draft position", task), fontsize="medium")
    return save(figure, stem)


def _colors(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.9, max(count, 1))]


def plot_run(
    run_dir: Path | str,
    *,
    out_dir: Path | str | None = None,
    summary: pd.DataFrame | None = None,
    manifest: dict | None = None,
) -> list[Path]:
    """Every plot of one run into ``RUN/plots`` (or ``out_dir``); return the files written.

    ``tokens_per_s_vs_exit``, ``heatmap_speedup_<backend>``, ``heatmap_acceptance_<backend>``
    (self-speculative cells) and ``acceptance_by_position`` (drafting cells), each ``.png`` and
    ``.pdf``, with a ``_<task>`` suffix per task in multi-task runs.
    """
    if summary is None or manifest is None:
        from skipbench.report import load_summary

        summary, manifest = load_summary(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    written: list[Path] = []
    if summary.empty:
        return written
    for task, part in _parts(summary):
        written += tokens_per_s_vs_exit(part, out / f"tokens_per_s_vs_exit{task}", manifest, task)
        for backend, cells in part.groupby("backend", sort=False):
            written += heatmap(
                cells,
                "speedup",
                out / f"heatmap_speedup_{backend}{task}",
                manifest,
                f"speedup vs autoregressive ({backend})",
                task,
            )
            written += heatmap(
                cells,
                "acceptance_rate",
                out / f"heatmap_acceptance_{backend}{task}",
                manifest,
                f"acceptance rate ({backend})",
                task,
            )
        written += acceptance_by_position(part, out / f"acceptance_by_position{task}", manifest, task)
    return written


def overlay(run_dirs: Sequence[Path | str], labels: Sequence[str] | None, out_path: Path | str) -> list[Path]:
    """Two or more runs on shared axes: speedup vs exit layer and acceptance vs exit layer.

    Like the LayerSkip blog's "Normal vs LayerSkip" figures: one colour per run, one marker
    per K (self-speculative cells; the native backend when a run has both). Writes
    ``out_path`` as PNG and PDF (a ``.png`` / ``.pdf`` suffix is dropped first) and returns
    both; nothing when no run has self-speculative cells.
    """
    from skipbench.report import load_summary

    if len(run_dirs) < 2:
        raise ValueError("overlay needs two or more runs")
    labels = list(labels) if labels else [Path(r).name for r in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(run_dirs)} runs but {len(labels)} labels")
    runs = []
    for run_dir, label in zip(run_dirs, labels, strict=True):
        summary, _ = load_summary(run_dir)
        cells = _self_speculative(summary)
        if not cells.empty:
            backend = "native" if (cells["backend"] == "native").any() else cells["backend"].iloc[0]
            runs.append((label, cells[cells["backend"] == backend]))
    if not runs:
        return []
    figure = _figure(10.0, 4.0)
    speed, accept = figure.subplots(1, 2)
    all_ks = sorted({int(k) for _, cells in runs for k in cells["num_speculations"]})
    colors = [f"C{i}" for i in range(len(runs))]
    for color, (label, cells) in zip(colors, runs, strict=True):
        for k, line in cells.groupby("num_speculations"):
            line = line.sort_values("exit_layer")
            marker = MARKERS[all_ks.index(int(k)) % len(MARKERS)]
            name = f"{label}, K={int(k)}" if len(all_ks) > 1 else label
            speed.plot(line["exit_layer"], line["speedup"], marker=marker, color=color, label=name)
            accept.plot(line["exit_layer"], line["acceptance_rate"], marker=marker, color=color, label=name)
    speed.axhline(1.0, color="black", linewidth=1, linestyle="--")
    speed.set_ylabel("speedup vs autoregressive")
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
