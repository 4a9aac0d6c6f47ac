"""Per-cell figures computed from the raw per-prompt records (see METRICS.md for each definition).

``summarize(frame)`` turns the per-prompt rows of a run into one row per cell; ``add_costs``
adds the analytical cost columns of :mod:`skipbench.flops`; ``write_report(run_dir)`` writes
the tables (Markdown, LaTeX, CSV) and the plots of a run directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from skipbench import flops
from skipbench.store import RunStore

CELL_COLUMNS = ["cell_key", "cell_label", "strategy", "backend", "exit_layer", "num_speculations", "draft_model"]
# How a cell is recognised across runs and tables (the cell_key also hashes the setup).
MATCH_COLUMNS = ["strategy", "exit_layer", "num_speculations", "draft_model", "backend"]

QUALITY_NAMES = {
    "quality_rouge1": "ROUGE-1 F",
    "quality_rouge2": "ROUGE-2 F",
    "quality_rougeL": "ROUGE-L F",
    "quality_exact_match": "exact match",
    "quality_pass@1": "pass@1",
}
SYNTHETIC_NOTE = "SYNTHETIC (random weights)"


# --------------------------------------------------------------------------- per-cell summary


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
    for index, (a, b) in enumerate(zip(tokens, reference, strict=False)):
        if a != b:
            return index
    return -1 if len(tokens) == len(reference) else min(len(tokens), len(reference))


def baseline_tokens(frame: pd.DataFrame, backend: str, dataset: str | None = None) -> dict[int, list[int]]:
    """The autoregressive tokens per prompt: the same backend's baseline, else any baseline.

    In a multi-task run (a ``dataset`` column) pass ``dataset`` to take that task's baseline.
    """
    ar = frame[frame["strategy"] == "autoregressive"]
    if dataset is not None and "dataset" in ar:
        ar = ar[ar["dataset"] == dataset]
    same = ar[ar["backend"] == backend]
    chosen = same if len(same) else ar
    return {int(row.prompt_index): list(row.tokens) for row in chosen.itertuples()}


def _int_or_none(value) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def _str_or_none(value) -> str | None:
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: speed, acceptance, speedup and losslessness versus autoregressive, quality.

    A ``dataset`` column (multi-task runs) splits cells per task, and each task's cells are
    compared with that task's autoregressive baseline.
    """
    if frame.empty:
        return pd.DataFrame()
    quality = [c for c in frame.columns if c.startswith("quality_")]
    by_task = "dataset" in frame.columns
    keys = ["dataset", "cell_key"] if by_task else "cell_key"
    rows = []
    for _, group in frame.groupby(keys, sort=False):
        first = group.iloc[0]
        row = {column: first[column] for column in CELL_COLUMNS}
        if by_task:
            row["dataset"] = first["dataset"]
        row["exit_layer"] = _int_or_none(row["exit_layer"])
        row["num_speculations"] = _int_or_none(row["num_speculations"])
        row["draft_model"] = _str_or_none(row["draft_model"])
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
        task = row.dataset if by_task else None
        pool = summary[summary["dataset"] == task] if by_task else summary
        ar = pool[(pool["strategy"] == "autoregressive") & (pool["backend"] == row.backend)]
        ar = ar if len(ar) else pool[pool["strategy"] == "autoregressive"]
        speedups.append(ar["time_per_input_s"].iloc[0] / row.time_per_input_s if len(ar) else float("nan"))
        reference = baseline_tokens(frame, row.backend, task)
        group = frame[frame["cell_key"] == row.cell_key]
        if by_task:
            group = group[group["dataset"] == task]
        same = [
            first_difference(list(t), reference[int(i)]) == -1
            for i, t in zip(group["prompt_index"], group["tokens"], strict=True)
            if int(i) in reference
        ]
        lossless.append(sum(same) / len(same) if same else float("nan"))
    summary["speedup"] = speedups
    summary["lossless"] = lossless
    return summary


def is_sampled(manifest: dict) -> bool:
    return bool((manifest.get("setup") or {}).get("sample", False))


def task_name(manifest: dict) -> str:
    """The run's task: the dataset of the setup or prompt set, else "prompts" (--prompt texts)."""
    setup, prompts = manifest.get("setup") or {}, manifest.get("prompts") or {}
    return str(setup.get("dataset") or prompts.get("dataset") or "prompts")


# --------------------------------------------------------------------------- analytical costs


def bytes_per_param(manifest: dict) -> int:
    """Bytes per weight of the run, from the dtype the models were loaded in (provenance)."""
    dtype = (manifest.get("provenance") or {}).get("dtype") or (manifest.get("setup") or {}).get("dtype")
    return flops.dtype_bytes(dtype if dtype not in (None, "auto") else None)


def model_shapes(manifest: dict) -> tuple[flops.ModelShape | None, dict[str, flops.ModelShape]]:
    """The target's shape and each draft model's, or None where a config is missing."""
    per_param = bytes_per_param(manifest)
    models = manifest.get("models") or {}

    def shape(info: dict | None) -> flops.ModelShape | None:
        config = (info or {}).get("config")
        if not config:
            return None
        try:
            return flops.ModelShape.from_config(config, bytes_per_param=per_param)
        except (TypeError, ValueError, KeyError):
            return None

    drafts = {name: s for name, info in (models.get("drafts") or {}).items() if (s := shape(info)) is not None}
    return shape(models.get("target")), drafts


def _steps(row) -> list[tuple[int, int, int]]:
    return list(
        zip(
            (int(v) for v in row.step_context),
            (int(v) for v in row.step_drafted),
            (int(v) for v in row.step_accepted),
            strict=True,
        )
    )


def prompt_costs(row, shape: flops.ModelShape, draft_shape: flops.ModelShape | None) -> flops.Costs | None:
    """The analytical costs of one per-prompt record (None when it has no steps)."""
    steps = _steps(row)
    if not steps:
        return None
    return flops.generation_costs(
        shape,
        strategy=row.strategy,
        prompt_tokens=int(row.prompt_tokens),
        steps=steps,
        exit_layer=_int_or_none(row.exit_layer),
        draft_shape=draft_shape,
        backend=row.backend,
        new_tokens=int(row.new_tokens),
        prefill_positions=steps[0][0],
    )


def _final_cache_tokens(row) -> int:
    """Positions in the target's KV cache after the last step: context + input + kept drafts."""
    steps = _steps(row)
    if not steps:
        return int(row.prompt_tokens)
    context, _, accepted = steps[-1]
    inputs = int(row.prompt_tokens) - context if len(steps) == 1 else 1
    return context + inputs + accepted


def _kv_bytes(row, shape: flops.ModelShape, draft_shape: flops.ModelShape | None) -> int:
    """KV-cache bytes at the end of one generation: the target's, plus a separate drafter's own cache."""
    tokens = _final_cache_tokens(row)
    total = flops.kv_cache_bytes(shape, tokens)
    if row.strategy == "speculative" and draft_shape is not None:
        total += flops.kv_cache_bytes(draft_shape, tokens)
    elif row.strategy == "self_speculative" and row.backend == "hf" and not pd.isna(row.exit_layer):
        total += flops.kv_cache_bytes(shape, tokens) * int(row.exit_layer) // shape.layers
    return total


def step_costs(
    shape: flops.ModelShape,
    *,
    strategy: str,
    k: int,
    context: int,
    exit_layer: int | None,
    draft_shape: flops.ModelShape | None,
    backend: str,
    unit: str = "bytes",
) -> tuple[float, float, float]:
    """(cost of one draft pass, cost of the verify of k drafts, cost of one autoregressive step).

    Taken from the passes :func:`flops.generation_passes` lists for one step of k drafts at
    ``context`` cached tokens (bytes moved, or FLOPs with ``unit="flops"``).
    """
    cost = flops.forward_bytes if unit == "bytes" else flops.forward_flops
    ar = float(cost(shape, 1, context, head_positions=1))
    if strategy == "autoregressive" or k == 0:
        return 0.0, ar, ar
    passes = flops.generation_passes(
        shape,
        strategy=strategy,
        prompt_tokens=context + 1,
        steps=[(context, k, k)],
        exit_layer=exit_layer,
        draft_shape=draft_shape,
        backend=backend,
        prefill_positions=context,
    )
    draft = verify = 0.0
    for p in passes:
        model_shape = shape if p.model == "target" else draft_shape
        value = float(p.bytes(model_shape) if unit == "bytes" else p.flops(model_shape))
        if p.phase == "draft":
            draft += value
        elif p.phase == "verify":
            verify += value
    return draft / k, verify, ar


def _predicted(
    row: pd.Series, group: pd.DataFrame, shape: flops.ModelShape, draft_shape: flops.ModelShape | None, unit: str
) -> float:
    if row["strategy"] == "autoregressive":
        return 1.0
    position = list(row["accept_by_position"])
    k = min(int(row["num_speculations"] or 0), len(position))
    if k == 0 or (row["strategy"] == "speculative" and draft_shape is None):
        return float("nan")
    # The mean context over the generation: prompt plus half the new tokens.
    context = max(1, round(float((group["prompt_tokens"] + group["new_tokens"] / 2).mean())))
    draft, verify, ar = step_costs(
        shape,
        strategy=row["strategy"],
        k=k,
        context=context,
        exit_layer=row["exit_layer"],
        draft_shape=draft_shape,
        backend=row["backend"],
        unit=unit,
    )
    return flops.predicted_speedup(position, k, draft, verify, ar)


def add_costs(
    summary: pd.DataFrame,
    frame: pd.DataFrame,
    manifest: dict,
    *,
    peak_bandwidth: float | None = None,
    peak_flops: float | None = None,
) -> pd.DataFrame:
    """The summary with the analytical cost columns of :mod:`skipbench.flops` added.

    Weights count ``bytes_per_param`` of the dtype the run loaded (manifest provenance).
    Per-token figures are ratios of sums over a cell's prompts, prefill included:

    * ``flops_per_token``, ``bytes_per_token``: total analytical work / Σ new tokens;
      ``{flops,bytes}_{prefill,draft,verify,wasted}_per_token`` the same per phase, and
      ``{flops,bytes}_{draft,verify,wasted}_share`` those phases' fractions of the total
      (wasted work is a part of the draft + verify work, not an extra term).
    * ``params_resident``: target + a separate draft model; self-speculative adds none.
    * ``kv_cache_bytes``: KV cache at the end of generation (target's, plus a separate
      drafter's), mean over prompts.
    * ``predicted_speedup``: :func:`flops.predicted_speedup` from the measured
      ``accept_by_position`` and the bytes moved by a draft pass, a verify pass and an
      autoregressive step at the mean context (batch-1 decoding is bandwidth bound);
      ``predicted_speedup_flops`` the same with FLOPs; ``measured_over_predicted`` =
      speedup / predicted_speedup.
    * ``achieved_bytes_per_s``, ``achieved_flops_per_s``: analytical totals / Σ time_s; with
      ``peak_bandwidth`` (bytes/s) or ``peak_flops`` (FLOP/s), ``bandwidth_fraction`` and
      ``compute_fraction`` of those peaks (nan otherwise).
    """
    summary = summary.copy()
    shape, drafts = model_shapes(manifest)
    names = ["prefill", "draft", "verify", "wasted"]
    records = []
    for row in summary.to_dict("records"):
        group = frame[frame["cell_key"] == row["cell_key"]]
        if "dataset" in row and "dataset" in group:
            group = group[group["dataset"] == row["dataset"]]
        record: dict[str, float] = {}
        row["exit_layer"] = _int_or_none(row["exit_layer"])
        row["num_speculations"] = _int_or_none(row["num_speculations"])
        row["draft_model"] = _str_or_none(row["draft_model"])
        draft_shape = drafts.get(row["draft_model"]) if row["draft_model"] else None
        if shape is None or (row["strategy"] == "speculative" and draft_shape is None):
            records.append(record)
            continue
        totals = {f"{unit}_{phase}": 0 for unit in ("flops", "bytes") for phase in names}
        kv = []
        for prompt in group.itertuples():
            costs = prompt_costs(prompt, shape, draft_shape)
            if costs is not None:
                for phase in names:
                    totals[f"flops_{phase}"] += getattr(costs.flops, phase)
                    totals[f"bytes_{phase}"] += getattr(costs.bytes, phase)
            kv.append(_kv_bytes(prompt, shape, draft_shape))
        new_tokens, seconds = float(group["new_tokens"].sum()), float(group["time_s"].sum())
        for unit in ("flops", "bytes"):
            total = sum(totals[f"{unit}_{phase}"] for phase in ("prefill", "draft", "verify"))
            record[f"{unit}_per_token"] = total / new_tokens if new_tokens else float("nan")
            for phase in names:
                value = totals[f"{unit}_{phase}"]
                record[f"{unit}_{phase}_per_token"] = value / new_tokens if new_tokens else float("nan")
                if phase != "prefill":
                    record[f"{unit}_{phase}_share"] = value / total if total else float("nan")
            record[f"{unit}_total"] = total
        record["params_resident"] = flops.params_resident(
            shape, draft_shape if row["strategy"] == "speculative" else None
        )
        record["kv_cache_bytes"] = float(np.mean(kv)) if kv else float("nan")
        series = pd.Series(row)
        record["predicted_speedup"] = _predicted(series, group, shape, draft_shape, "bytes")
        record["predicted_speedup_flops"] = _predicted(series, group, shape, draft_shape, "flops")
        record["achieved_bytes_per_s"] = record["bytes_total"] / seconds if seconds else float("nan")
        record["achieved_flops_per_s"] = record["flops_total"] / seconds if seconds else float("nan")
        records.append(record)
    costs = pd.DataFrame(records, index=summary.index)
    for column in costs.columns:
        summary[column] = costs[column]
    for column in ("flops_per_token", "predicted_speedup", "achieved_bytes_per_s", "achieved_flops_per_s"):
        if column not in summary:
            summary[column] = float("nan")
    summary["measured_over_predicted"] = summary["speedup"] / summary["predicted_speedup"]
    summary["bandwidth_fraction"] = summary["achieved_bytes_per_s"] / peak_bandwidth if peak_bandwidth else float("nan")
    summary["compute_fraction"] = summary["achieved_flops_per_s"] / peak_flops if peak_flops else float("nan")
    return summary


def cell_identity(row) -> tuple:
    """(strategy, exit layer, K, draft model, backend): what a cell is, whatever its key or run."""
    return (
        row["strategy"],
        _int_or_none(row["exit_layer"]),
        _int_or_none(row["num_speculations"]),
        _str_or_none(row["draft_model"]),
        row["backend"],
    )


def _in_manifest_order(summary: pd.DataFrame, manifest: dict) -> pd.DataFrame:
    """Cells in the order the run lists them (the baseline first), unlisted ones after."""
    order = {}
    for position, cell in enumerate(manifest.get("cells") or []):
        order.setdefault(cell_identity({"backend": "native", **cell}), position)
    rank = [order.get(cell_identity(row), len(order)) for row in summary.to_dict("records")]
    task = pd.factorize(summary["dataset"])[0] if "dataset" in summary else 0
    keys = pd.DataFrame({"task": task, "rank": rank}, index=summary.index)
    positions = keys.sort_values(["task", "rank"], kind="stable").index
    return summary.loc[positions].reset_index(drop=True)


def load_summary(
    run_dir: Path | str, *, peak_bandwidth: float | None = None, peak_flops: float | None = None
) -> tuple[pd.DataFrame, dict]:
    """(per-cell summary with cost columns, manifest) of a run directory.

    Losslessness is a greedy-only figure: in a sampled run it is nan.
    """
    store = RunStore(run_dir)
    manifest = store.read_manifest()
    frame = store.read_cells()
    summary = summarize(frame)
    if summary.empty:
        return summary, manifest
    summary = _in_manifest_order(summary, manifest)
    if is_sampled(manifest):
        summary["lossless"] = float("nan")
    summary = add_costs(summary, frame, manifest, peak_bandwidth=peak_bandwidth, peak_flops=peak_flops)
    return summary, manifest


# --------------------------------------------------------------------------- tables


def _model_label(info: dict | None, fallback: str) -> str:
    info = info or {}
    name = str(info.get("name") or fallback)
    return f"{name} (synthetic)" if info.get("synthetic") else name


def _strategy_label(row) -> str:
    return row["strategy"] if row["backend"] == "native" else f"{row['strategy']} ({row['backend']})"


def _draft_or_exit(row) -> str:
    exit_layer, draft = _int_or_none(row["exit_layer"]), _str_or_none(row["draft_model"])
    if row["strategy"] == "self_speculative" and exit_layer is not None:
        return f"exit {exit_layer}"
    if draft:
        return f"draft {draft}"
    return "-"


def _none_to_nan(value) -> float:
    return float("nan") if value is None or pd.isna(value) else value


def efficiency_table(summary: pd.DataFrame, manifest: dict | None = None) -> pd.DataFrame:
    """The blog-style efficiency table, one row per cell, columns named for what they hold.

    Raw numbers (times in the unit the header names, counts unscaled); :func:`to_markdown`
    formats them. The LayerSkip blog's "FLOPs/Input" and "Time/Input" hold time per input and
    time per token: here they are "time per input (s)" and "time per token (ms)".
    """
    manifest = manifest or {}
    target = (manifest.get("models") or {}).get("target")
    model = _model_label(target, (manifest.get("setup") or {}).get("model", "?"))
    quality = [c for c in summary.columns if c.startswith("quality_")]
    rows = []
    for row in summary.to_dict("records"):
        out = {}
        if "dataset" in row:
            out["task"] = row["dataset"]
        out |= {
            "model": model,
            "strategy": _strategy_label(row),
            "draft / exit": _draft_or_exit(row),
            "K": _none_to_nan(row["num_speculations"]),
            "params resident": row.get("params_resident", float("nan")),
            "time per input (s)": row["time_per_input_s"],
            "time per token (ms)": row["time_per_token_s"] * 1e3,
            "speedup vs autoregressive": row["speedup"],
            "acceptance": row["acceptance_rate"],
            "tokens per step": row["tokens_per_step"],
            "lossless (greedy)": row["lossless"],
        }
        out |= {QUALITY_NAMES.get(c, c.removeprefix("quality_")): row[c] for c in quality}
        out["FLOPs per token"] = row.get("flops_per_token", float("nan"))
        rows.append(out)
    table = pd.DataFrame(rows)
    if len(table):
        table["K"] = table["K"].astype("Int64")
    return table


def _si(value: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


_FORMATS: dict[str, Callable[[float], str]] = {
    "K": lambda v: f"{int(v)}",
    "params resident": _si,
    "FLOPs per token": _si,
    "time per input (s)": lambda v: f"{v:.3f}",
    "time per token (ms)": lambda v: f"{v:.2f}",
    "speedup vs autoregressive": lambda v: f"{v:.2f}x",
    "acceptance": lambda v: f"{v:.3f}",
    "tokens per step": lambda v: f"{v:.2f}",
    "lossless (greedy)": lambda v: f"{v:.0%}",
}


def format_cell(column: str, value, formats: dict[str, Callable[[float], str]] | None = None) -> str:
    """One table entry as text: "-" for missing values, numbers in the column's format."""
    if value is None or (not isinstance(value, (str, list, tuple, np.ndarray)) and pd.isna(value)):
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    formats = _FORMATS if formats is None else {**_FORMATS, **formats}
    if column in formats:
        return formats[column](value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.3f}"


def _text_cells(
    table: pd.DataFrame,
    bold: set[tuple[int, str]] | None = None,
    emphasis: Callable[[str], str] = lambda s: f"**{s}**",
    formats: dict[str, Callable[[float], str]] | None = None,
) -> list[list[str]]:
    bold = bold or set()
    rows = []
    for position in range(len(table)):
        cells = []
        for column in table.columns:
            text = format_cell(column, table[column].iloc[position], formats)
            cells.append(emphasis(text) if (position, column) in bold else text)
        rows.append(cells)
    return rows


def _numeric(table: pd.DataFrame, column: str) -> bool:
    return pd.api.types.is_numeric_dtype(table[column])


def to_markdown(
    table: pd.DataFrame,
    *,
    bold: set[tuple[int, str]] | None = None,
    notes: Sequence[str] = (),
    formats: dict[str, Callable[[float], str]] | None = None,
) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned); ``bold`` holds (row position, column)."""

    def escape(text: str) -> str:
        return str(text).replace("|", "\\|")

    header = "| " + " | ".join(escape(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---:" if _numeric(table, c) else ":---" for c in table.columns) + "|"
    body = ["| " + " | ".join(escape(t) for t in cells) + " |" for cells in _text_cells(table, bold, formats=formats)]
    text = "\n".join([header, rule, *body]) + "\n"
    if notes:
        text += "\n" + "\n".join(f"_{escape(note)}_  " for note in notes) + "\n"
    return text


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_latex(
    table: pd.DataFrame,
    *,
    bold: set[tuple[int, str]] | None = None,
    notes: Sequence[str] = (),
    caption: str | None = None,
    formats: dict[str, Callable[[float], str]] | None = None,
) -> str:
    """A LaTeX ``table`` with a plain ``tabular`` (no packages needed), the notes under it."""
    align = "".join("r" if _numeric(table, c) else "l" for c in table.columns)
    cells = _text_cells(table, bold, emphasis=lambda s: f"\x00{s}\x01", formats=formats)

    def render(text: str) -> str:
        return latex_escape(text).replace("\x00", r"\textbf{").replace("\x01", "}")

    lines = [
        "% written by skipbench",
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\begin{{tabular}}{{{align}}}",
        r"\hline",
        " & ".join(latex_escape(c) for c in table.columns) + r" \\",
        r"\hline",
    ]
    lines += [" & ".join(render(t) for t in row) + r" \\" for row in cells]
    lines += [r"\hline", r"\end{tabular}"]
    if notes:
        lines += [r"\par\smallskip", r"{\footnotesize " + r" \\ ".join(latex_escape(n) for n in notes) + "}"]
    if caption:
        lines.append(rf"\caption{{{latex_escape(caption)}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def provenance_notes(manifest: dict, tasks: Sequence[str] | None = None) -> list[str]:
    """What a table's numbers depend on, one line each, for under every table.

    ``tasks``: the tasks a multi-task run holds (its rows' ``dataset``), else the manifest's.
    """
    models = manifest.get("models") or {}
    setup, prompts = manifest.get("setup") or {}, manifest.get("prompts") or {}
    prov = manifest.get("provenance") or {}
    infos = [models.get("target") or {"name": setup.get("model")}, *(models.get("drafts") or {}).values()]
    synthetic = any(info.get("synthetic") for info in infos)
    target = infos[0]
    model = f"model: {target.get('name')}"
    if target.get("revision"):
        model += f" @ {target.get('revision')}"
    drafts = list(models.get("drafts") or {})
    if drafts:
        model += "; drafts: " + ", ".join(drafts)
    lines = [f"{model}" + (f" - {SYNTHETIC_NOTE}" if synthetic else "")]
    decoding = (
        f"sampling (temperature {setup.get('temperature')}, top-p {setup.get('top_p')})"
        if setup.get("sample")
        else "greedy"
    )
    lines.append(
        f"task: {', '.join(map(str, tasks)) if tasks else task_name(manifest)}; "
        f"prompts: {prompts.get('prompts', '?')}; "
        f"prompt-set hash: {prompts.get('prompt_set_hash', '?')}; "
        f"max new tokens: {prompts.get('max_new_tokens', setup.get('max_new_tokens', '?'))}; {decoding}"
    )
    lines.append(
        f"device: {prov.get('device', '?')}; dtype: {prov.get('dtype', '?')}; "
        f"torch {prov.get('torch_version', '?')}; transformers {prov.get('transformers_version', '?')}; "
        f"skipbench {prov.get('skipbench_version', '?')} (commit {prov.get('git_commit') or 'unknown'})"
    )
    if setup.get("sample"):
        lines.append("lossless is greedy-only: not shown for a sampled run")
    return lines


def _self_speculative(summary: pd.DataFrame) -> pd.DataFrame:
    if summary.empty:
        return summary
    chosen = summary[
        (summary["strategy"] == "self_speculative")
        & summary["exit_layer"].notna()
        & summary["num_speculations"].notna()
    ]
    return chosen


def grid_table(summary: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, set[tuple[int, str]]]:
    """Exit layer (rows) x K (columns) of ``metric`` for self-speculative cells, and the best cells.

    Pass the cells of one backend (and task). The best cells are those with the grid's
    highest value (ties all count), as (row position, column name).
    """
    cells = _self_speculative(summary)
    grid = cells.pivot_table(index="exit_layer", columns="num_speculations", values=metric, aggfunc="mean")
    grid = grid.sort_index().sort_index(axis=1)
    table = pd.DataFrame({"exit layer": [int(e) for e in grid.index]})
    for k in grid.columns:
        table[f"K={int(k)}"] = grid[k].to_numpy(dtype=float)
    best: set[tuple[int, str]] = set()
    values = grid.to_numpy(dtype=float)
    if values.size and not np.all(np.isnan(values)):
        top = np.nanmax(values)
        for i, j in zip(*np.nonzero(np.isclose(values, top) & ~np.isnan(values)), strict=True):
            best.add((int(i), f"K={int(grid.columns[j])}"))
    return table, best


def _grid_formats(metric: str) -> Callable[[float], str]:
    return (lambda v: f"{v:.2f}x") if metric == "speedup" else (lambda v: f"{v:.3f}")


def task_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Spec-Bench-style: per cell, the speedup on each task, the mean over tasks, and τ overall.

    τ ("mean accepted tokens" in Spec-Bench, the bonus token included) is Σ new tokens /
    Σ verify steps over all tasks' prompts.
    """
    tasks = list(dict.fromkeys(summary["dataset"]))
    rows = []
    for _, cells in summary.groupby(MATCH_COLUMNS, dropna=False, sort=False):
        first = cells.iloc[0]
        row = {
            "strategy": _strategy_label(first),
            "draft / exit": _draft_or_exit(first),
            "K": _none_to_nan(first["num_speculations"]),
        }
        for task in tasks:
            found = cells[cells["dataset"] == task]
            row[f"speedup {task}"] = float(found["speedup"].iloc[0]) if len(found) else float("nan")
        row["speedup mean over tasks"] = float(np.nanmean([row[f"speedup {t}"] for t in tasks]))
        steps = cells["verify_steps"].sum()
        row["tokens per step"] = cells["new_tokens"].sum() / steps if steps else float("nan")
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table["K"] = table["K"].astype("Int64")
    return table


def _suffix(*parts: str | None) -> str:
    clean = ["".join(c if c.isalnum() or c in "-." else "-" for c in str(p)) for p in parts if p]
    return "_".join(clean)


def _write_table(
    directory: Path,
    stem: str,
    table: pd.DataFrame,
    notes: list[str],
    *,
    bold: set[tuple[int, str]] | None = None,
    csv: pd.DataFrame | None = None,
    caption: str | None = None,
    formats: dict[str, Callable[[float], str]] | None = None,
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    md, tex, csv_path = (directory / f"{stem}.{ext}" for ext in ("md", "tex", "csv"))
    title = f"**{caption}**\n\n" if caption else ""
    md.write_text(title + to_markdown(table, bold=bold, notes=notes, formats=formats))
    tex.write_text(to_latex(table, bold=bold, notes=notes, caption=caption, formats=formats))
    (table if csv is None else csv).to_csv(csv_path, index=False)
    return [md, tex, csv_path]


def _grid_tables(summary: pd.DataFrame, directory: Path, notes: list[str]) -> list[Path]:
    written = []
    cells = _self_speculative(summary)
    if cells.empty:
        return written
    keys = ["backend", "dataset"] if "dataset" in cells else ["backend"]
    for values, part in cells.groupby(keys, sort=False):
        values = values if isinstance(values, tuple) else (values,)
        for metric, name in (("speedup", "speedup vs autoregressive"), ("acceptance_rate", "acceptance")):
            table, best = grid_table(part, metric)
            # The CSV keeps numbers; the best cell's K is in its own column.
            csv = table.copy()
            csv["best_K"] = pd.array(
                [min((int(c[2:]) for (i, c) in best if i == pos), default=None) for pos in range(len(table))],
                dtype="Int64",
            )
            stem = "grid_" + _suffix("speedup" if metric == "speedup" else "acceptance", *values)
            formats = dict.fromkeys(table.columns[1:], _grid_formats(metric))
            caption = f"{name}: exit layer x K ({', '.join(map(str, values))}; bold: highest)"
            written += _write_table(directory, stem, table, notes, bold=best, csv=csv, caption=caption, formats=formats)
    return written


def _summary_csv(summary: pd.DataFrame, path: Path) -> Path:
    out = summary.copy()
    out["accept_by_position"] = [
        json.dumps([round(float(v), 6) for v in values]) for values in out["accept_by_position"]
    ]
    out.to_csv(path, index=False)
    return path


def write_report(
    run_dir: Path | str, *, peak_bandwidth: float | None = None, peak_flops: float | None = None, plots: bool = True
) -> list[Path]:
    """Write a run's tables and plots; return the files written.

    ``RUN/tables/``:

    * ``efficiency.{md,tex,csv}``: the blog-style table, one row per cell;
    * ``grid_speedup_<backend>[_<task>].{md,tex,csv}`` and ``grid_acceptance_...``: exit
      layer x K for self-speculative cells, the best cell in bold (CSV: a ``best_K`` column);
    * ``tasks.{md,tex,csv}``: speedup per task and tokens per step, when the run holds
      several tasks (a ``dataset`` column);
    * ``summary.csv``: every per-cell figure, cost columns included.

    The Markdown and LaTeX tables carry the provenance under them; CSVs stay plain data
    (``pandas.read_csv`` reads them as they are). ``RUN/plots/``: see :func:`plots.plot_run`.
    ``peak_bandwidth`` (bytes/s) and ``peak_flops`` (FLOP/s) add fractions of those peaks.
    """
    run_dir = Path(run_dir)
    summary, manifest = load_summary(run_dir, peak_bandwidth=peak_bandwidth, peak_flops=peak_flops)
    if summary.empty:
        raise ValueError(f"{run_dir} holds no finished cells to report")
    directory = run_dir / "tables"
    tasks = list(dict.fromkeys(summary["dataset"])) if "dataset" in summary else None
    notes = provenance_notes(manifest, tasks)
    failed = RunStore(run_dir).errors()
    efficiency_notes = notes + [f"failed: {e.get('cell_label')}: {e.get('error')}" for e in failed]
    written = _write_table(directory, "efficiency", efficiency_table(summary, manifest), efficiency_notes)
    written += _grid_tables(summary, directory, notes)
    if "dataset" in summary and summary["dataset"].nunique() > 1:
        written += _write_table(
            directory,
            "tasks",
            task_table(summary),
            notes,
            caption="speedup per task (Spec-Bench style)",
            formats={f"speedup {t}": _FORMATS["speedup vs autoregressive"] for t in [*tasks, "mean over tasks"]},
        )
    written.append(_summary_csv(summary, directory / "summary.csv"))
    if plots:
        from skipbench import plots as plotting

        written += plotting.plot_run(run_dir, summary=summary, manifest=manifest)
    return written


def efficiency_markdown(run_dir: Path | str) -> str:
    """The efficiency table of a run with its provenance, as Markdown (for the CLI to print)."""
    summary, manifest = load_summary(run_dir)
    if summary.empty:
        return "(no finished cells)\n"
    tasks = list(dict.fromkeys(summary["dataset"])) if "dataset" in summary else None
    return to_markdown(efficiency_table(summary, manifest), notes=provenance_notes(manifest, tasks))


def write_task_report(parent: Path | str, runs: dict[str, Path]) -> list[Path]:
    """One sweep over several tasks (one run directory per task) -> the Spec-Bench-style task table."""
    summaries, notes = [], []
    for task, run_dir in runs.items():
        summary, manifest = load_summary(run_dir)
        summaries.append(summary.assign(dataset=task))
        notes = notes or provenance_notes(manifest, list(runs))
    tasks = list(runs)
    return _write_table(
        Path(parent) / "tables",
        "tasks",
        task_table(pd.concat(summaries, ignore_index=True)),
        notes,
        caption="speedup per task (Spec-Bench style)",
        formats={f"speedup {t}": _FORMATS["speedup vs autoregressive"] for t in [*tasks, "mean over tasks"]},
    )
