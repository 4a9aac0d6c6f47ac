"""Render a run's summary as tables (Markdown, LaTeX, CSV) and write a run's report.

Every speed figure is printed with its 95% interval, `1.44x [1.38, 1.51]`, or with the number of units
where they are too few for one, `0.54x [n=2]`. The best cell of an exit x K grid is marked by the paired
ranking (`ranking.rank_grid`): bold when it is faster than every other cell on the same prompts and rounds,
otherwise every cell not shown slower than it is marked as a tie. Markdown comes from `DataFrame.to_markdown`
(tabulate), LaTeX from `Styler.to_latex`; CSVs keep plain numbers and the interval bounds in their own columns.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from skipbench.intervals import MIN_UNITS
from skipbench.spec import Cell, baseline_of
from skipbench.store import RunStore
from skipbench.summary import device_slug, load_summary, run_devices
from skipbench.verdicts import beats_verdict

QUALITY_NAMES = {
    "quality_rouge1": "ROUGE-1 F",
    "quality_rouge2": "ROUGE-2 F",
    "quality_rougeL": "ROUGE-L F",
    "quality_exact_match": "exact match",
    "quality_pass@1": "pass@1",
}
SYNTHETIC_NOTE = "SYNTHETIC (random weights)"


# --------------------------------------------------------------------------- formatting one value


def missing(value) -> bool:
    return value is None or (isinstance(value, float | np.floating) and np.isnan(value)) or value is pd.NA


def with_interval(point, low, high, pattern: str = "{:.2f}x") -> str:
    """`1.44x [1.38, 1.51]`; the point alone when there is no interval; "-" when there is no point."""
    if missing(point):
        return "-"
    if missing(low) or missing(high):
        return pattern.format(point)
    return f"{pattern.format(point)} [{pattern.format(low).rstrip('x')}, {pattern.format(high).rstrip('x')}]"


def speedup_text(row) -> str:
    """A summary row's speedup: `1.44x [1.38, 1.51]`, or `0.54x [n=2]` where it has too few paired units for
    an interval (`intervals.MIN_UNITS`)."""
    if missing(row["speedup"]) or not missing(row["speedup_low"]) or missing(row.get("speedup_units")):
        return with_interval(row["speedup"], row["speedup_low"], row["speedup_high"])
    return f"{row['speedup']:.2f}x [n={int(row['speedup_units'])}]"


def si(value) -> str:
    if missing(value):
        return "-"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def number(value, pattern: str = "{:.3f}") -> str:
    return "-" if missing(value) else pattern.format(value)


# --------------------------------------------------------------------------- what a row is called


def strategy_label(row) -> str:
    name = row["strategy"] if row["backend"] == "native" else f"{row['strategy']} ({row['backend']})"
    return f"{name} A/A control" if not missing(row.get("replica")) and row.get("replica") else name


def speedup_versus(summary: pd.DataFrame) -> list[str]:
    """What each row's speedup divides by: "-" for a baseline itself, else that baseline's strategy label
    (the baselines of one table may differ: another backend's autoregressive divides by the native one)."""
    cells = [Cell.from_record(row) for row in summary.to_dict("records")]
    versus = []
    for cell in cells:
        base = baseline_of(cell, cells)
        versus.append("-" if base is None or base == cell else strategy_label(
            {"strategy": base.strategy, "backend": base.backend, "replica": base.replica}))
    return versus


def draft_or_exit(row) -> str:
    if not missing(row["exit_layer"]):
        return f"exit {int(row['exit_layer'])}"
    if not missing(row["draft_model"]):
        return f"draft {row['draft_model']}"
    return "-"


def model_label(manifest: dict) -> str:
    info = (manifest.get("models") or {}).get("target") or {}
    name = str(info.get("name") or (manifest.get("setup") or {}).get("model", "?"))
    return f"{name} (synthetic)" if info.get("synthetic") else name


# --------------------------------------------------------------------------- tables


def efficiency_table(summary: pd.DataFrame, manifest: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The blog-style efficiency table, one row per cell: (text for md/LaTeX, numbers for CSV).

    The LayerSkip blog's "FLOPs/Input" and "Time/Input" hold time per input and time per token: here the
    columns are named for what they hold.
    """
    quality = [c for c in summary.columns if c.startswith("quality_")]
    text, numbers = [], []
    model = model_label(manifest)
    for row, versus in zip(summary.to_dict("records"), speedup_versus(summary), strict=True):
        k = None if missing(row["num_speculations"]) else int(row["num_speculations"])
        common = {"model": model, "strategy": strategy_label(row), "draft / exit": draft_or_exit(row)}
        numbers.append(common | {
            "K": k,
            "params resident": row.get("params_resident"),
            "time per input (s)": row["time_per_input_s"],
            "time per token (ms)": row["time_per_token_s"] * 1e3,
            "tokens/s": row["tokens_per_s"], "tokens/s low": row["tokens_per_s_low"],
            "tokens/s high": row["tokens_per_s_high"],
            "speedup vs autoregressive": row["speedup"], "speedup low": row["speedup_low"],
            "speedup high": row["speedup_high"], "vs": versus, "speedup units": row.get("speedup_units"),
            "speedup width over prompts": row.get("speedup_width_prompts"),
            "speedup width over rounds": row.get("speedup_width_rounds"),
            "acceptance": row["acceptance_rate"], "acceptance low": row.get("acceptance_rate_low"),
            "acceptance high": row.get("acceptance_rate_high"), "tokens per step": row["tokens_per_step"],
            "lossless (greedy)": row["lossless"], "prefill share": row["prefill_share"],
            **{QUALITY_NAMES.get(c, c.removeprefix("quality_")): row[c] for c in quality},
            "FLOPs per token": row.get("flops_per_token"), "repeats": row["repeats"],
        })
        text.append(common | {
            "K": "-" if k is None else str(k),
            "params resident": si(row.get("params_resident")),
            "time per token (ms)": number(row["time_per_token_s"] * 1e3, "{:.2f}"),
            "tokens/s": with_interval(row["tokens_per_s"], row["tokens_per_s_low"], row["tokens_per_s_high"],
                                      "{:.1f}"),
            "speedup vs autoregressive": speedup_text(row),
            "vs": versus,
            "acceptance": number(row["acceptance_rate"]),
            "tokens per step": number(row["tokens_per_step"], "{:.2f}"),
            "lossless (greedy)": number(row["lossless"], "{:.0%}"),
            "prefill share": number(row["prefill_share"], "{:.0%}"),
            **{QUALITY_NAMES.get(c, c.removeprefix("quality_")): number(row[c]) for c in quality},
            "FLOPs per token": si(row.get("flops_per_token")),
        })
    return pd.DataFrame(text), pd.DataFrame(numbers)


def exit_cells(summary: pd.DataFrame) -> pd.DataFrame:
    """The cells with an exit layer and K: the ones an exit x K grid holds."""
    if summary.empty:
        return summary
    return summary[summary["exit_layer"].notna() & summary["num_speculations"].notna()]


RANK_COLUMN = {"speedup": "best", "acceptance_rate": "best_acceptance"}


def best_cells(table: pd.DataFrame, metric: str) -> tuple[set[int], bool]:
    """The positions the paired ranking (`ranking.rank_grid`) marks by `metric` ("speedup" or
    "acceptance_rate"), and whether one cell is clear of the rest (shown better than each other cell on the
    same prompts and rounds). A table without the ranking's column marks nothing."""
    marks = table.get(RANK_COLUMN[metric])
    if marks is None:
        return set(), False
    marked = {position for position, mark in enumerate(marks) if mark in ("best", "tied")}
    return marked, len(marked) == 1 and "best" in set(marks)


def grid_table(cells: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Exit layer (rows) x K (columns) of one backend's cells: (text, numbers, caption note on the best).

    Cells carry their intervals; the best is bold when the paired ranking finds it clear, the tied ones bold
    with a `~`."""
    cells = cells.reset_index(drop=True)
    marked, clear = best_cells(cells, metric)
    exits = sorted({int(e) for e in cells["exit_layer"]})
    ks = sorted({int(k) for k in cells["num_speculations"]})
    text = pd.DataFrame({"exit layer": [str(e) for e in exits]})
    numbers = pd.DataFrame({"exit layer": exits})
    for k in ks:
        column_text, column_numbers = [], []
        for exit_layer in exits:
            found = cells[(cells["exit_layer"] == exit_layer) & (cells["num_speculations"] == k)]
            if found.empty:
                column_text.append("-")
                column_numbers.append(np.nan)
                continue
            position, row = found.index[0], found.iloc[0]
            if metric == "speedup":
                value = speedup_text(row)
            else:
                value = with_interval(row[metric], row.get(f"{metric}_low"), row.get(f"{metric}_high"), "{:.3f}")
            if position in marked:
                value = f"**{value}**" if clear else f"**~{value}**"
            column_text.append(value)
            column_numbers.append(row[metric])
        text[f"K={k}"] = column_text
        numbers[f"K={k}"] = column_numbers
    return text, numbers, grid_note(cells, metric, marked, clear)


def grid_note(cells: pd.DataFrame, metric: str, marked: set[int], clear: bool) -> str:
    """The caption's words on the marked cells, and for speedup, plainly whether any cell beats the baseline."""
    units = "prompts and rounds" if metric == "speedup" else "prompts"
    marks = cells.get(RANK_COLUMN[metric])
    if marks is not None and (marks == "unranked").any():
        note = (f"not ranked: too few {units} shared (fewer than {MIN_UNITS} units) for a paired comparison; "
                f"add prompts or --repeats")
    elif not marked:
        note = ""
    elif clear:
        note = f"bold: the best cell, shown better than every other on the same {units} (paired bootstrap, 95%)"
    else:
        note = (f"bold ~: {len(marked)} cells tied for best (none shown worse than the best on the same {units}: "
                f"paired bootstrap, 95%)")
    if metric == "speedup" and not cells.empty:
        baseline = cells["baseline_label"].dropna().iloc[0] if "baseline_label" in cells and \
            cells["baseline_label"].notna().any() else "the baseline"
        verdict = beats_verdict(cells, baseline)
        note = f"{note}; {verdict}" if note else verdict
    return note


def task_table(summaries: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Spec-Bench-style: per cell, the speedup on each task, the mean over tasks, and tau overall.

    tau ("mean accepted tokens" in Spec-Bench, the bonus token included) is the tokens per step over all
    tasks' prompts."""
    identities: dict[tuple, dict] = {}
    for task, summary in summaries.items():
        for row in summary.to_dict("records"):
            identities.setdefault(Cell.from_record(row).identity(), {})[task] = row
    text, numbers = [], []
    for per_task in identities.values():
        first = next(iter(per_task.values()))
        k = None if missing(first["num_speculations"]) else int(first["num_speculations"])
        common = {"strategy": strategy_label(first), "draft / exit": draft_or_exit(first)}
        number_row, text_row = common | {"K": k}, common | {"K": "-" if k is None else str(k)}
        for task in summaries:
            row = per_task.get(task)
            values = (row["speedup"], row["speedup_low"], row["speedup_high"]) if row else (np.nan,) * 3
            number_row |= {f"speedup {task}": values[0], f"speedup {task} low": values[1],
                           f"speedup {task} high": values[2]}
            text_row[f"speedup {task}"] = with_interval(*values)
        mean = float(np.nanmean([number_row[f"speedup {task}"] for task in summaries]))
        number_row["speedup mean over tasks"] = mean
        text_row["speedup mean over tasks"] = number(mean, "{:.2f}x")
        steps = sum(row["verify_steps"] for row in per_task.values())
        made = sum(row["tokens_per_step"] * row["verify_steps"] for row in per_task.values())
        number_row["tokens per step"] = made / steps if steps else np.nan
        text_row["tokens per step"] = number(number_row["tokens per step"], "{:.2f}")
        text.append(text_row)
        numbers.append(number_row)
    return pd.DataFrame(text), pd.DataFrame(numbers)


# --------------------------------------------------------------------------- rendering


def to_markdown(text: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    """A GitHub-flavoured Markdown table (tabulate), the notes in italics under it."""
    escaped = text.map(lambda value: str(value).replace("|", "\\|"))
    escaped.columns = [str(c).replace("|", "\\|") for c in text.columns]
    body = escaped.to_markdown(index=False, disable_numparse=True)
    lines = "\n".join(f"_{note.replace('|', '/')}_  " for note in notes)
    return body + "\n" + (f"\n{lines}\n" if notes else "")


def latex_escape(text: str) -> str:
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(special.get(ch, ch) for ch in str(text))


def to_latex(text: pd.DataFrame, notes: Sequence[str] = (), caption: str | None = None) -> str:
    """A LaTeX table (pandas Styler, booktabs rules), bold from `**...**`, the notes under the tabular."""

    def cell(value) -> str:
        value = str(value)
        if value.startswith("**") and value.endswith("**"):
            return r"\textbf{" + latex_escape(value[2:-2]) + "}"
        return latex_escape(value)

    escaped = text.map(cell)
    escaped.columns = [latex_escape(c) for c in text.columns]
    styler = escaped.style.hide(axis="index")
    tabular = styler.to_latex(hrules=True, column_format="l" * len(text.columns))
    lines = ["% written by skipbench", r"\begin{table}[t]", r"\centering", r"\small", tabular.rstrip()]
    if notes:
        lines += [r"\par\smallskip", r"{\footnotesize " + r" \\ ".join(latex_escape(n) for n in notes) + "}"]
    if caption:
        lines.append(rf"\caption{{{latex_escape(caption)}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def provenance_notes(manifest: dict, tasks: Sequence[str] | None = None) -> list[str]:
    """What a table's numbers depend on, one line each, for under every table."""
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
    lines = [model + (f" - {SYNTHETIC_NOTE}" if synthetic else "")]
    decoding = (f"sampling (temperature {setup.get('temperature')}, top-p {setup.get('top_p')})"
                if setup.get("sample") else "greedy")
    task = ", ".join(map(str, tasks)) if tasks else str(setup.get("dataset") or prompts.get("dataset") or "prompts")
    lines.append(f"task: {task}; prompts: {prompts.get('prompts', '?')}; prompt-set hash: "
                 f"{prompts.get('prompt_set_hash', '?')}; max new tokens: {prompts.get('max_new_tokens', '?')}; "
                 f"{decoding}; repeats: {setup.get('repeats', 1)} interleaved rounds; intervals: 95% bootstrap "
                 f"over prompts x repeats")
    machine = (prov.get("machine") or {}).get("before") or {}
    load = f"; load before {machine['load_1min']:.2f}" if machine.get("load_1min") is not None else ""
    lines.append(f"device: {prov.get('device', '?')}; dtype: {prov.get('dtype', '?')}; threads: "
                 f"{prov.get('cpu_threads', '?')}{load}; torch {prov.get('torch_version', '?')}; transformers "
                 f"{prov.get('transformers_version', '?')}; skipbench {prov.get('skipbench_version', '?')} "
                 f"(commit {prov.get('git_commit') or 'unknown'})")
    if setup.get("sample"):
        lines.append("lossless is greedy-only: not shown for a sampled run")
    return lines


def cell_warnings(summary: pd.DataFrame) -> list[str]:
    return [f"{row['cell_label']}: {warning}" for row in summary.to_dict("records")
            for warning in row.get("warnings") or []]


# --------------------------------------------------------------------------- files


def _suffix(*parts: str | None) -> str:
    return "_".join("".join(c if c.isalnum() or c in "-." else "-" for c in str(p)) for p in parts if p)


def write_table(directory: Path, stem: str, text: pd.DataFrame, numbers: pd.DataFrame, notes: list[str],
                caption: str | None = None) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    md, tex, csv = (directory / f"{stem}.{ext}" for ext in ("md", "tex", "csv"))
    title = f"**{caption}**\n\n" if caption else ""
    md.write_text(title + to_markdown(text, notes))
    tex.write_text(to_latex(text, notes, caption))
    numbers.to_csv(csv, index=False)
    return [md, tex, csv]


def _summary_csv(summary: pd.DataFrame, path: Path) -> Path:
    out = summary.copy()
    out["accept_by_position"] = [json.dumps([round(float(v), 6) for v in values])
                                 for values in out["accept_by_position"]]
    out["warnings"] = [json.dumps(list(values)) for values in out["warnings"]]
    out.to_csv(path, index=False)
    return path


def write_tables(run_dir: Path, summary: pd.DataFrame, manifest: dict, device: str | None = None) -> list[Path]:
    """Write the tables of a run's summary (of one device's rows, when `device` is given); return the files.

    ``RUN/tables/``: ``efficiency.{md,tex,csv}`` (one row per cell), ``grid_speedup_<backend>`` and
    ``grid_acceptance_<backend>`` (exit layer x K), ``summary.csv`` (every per-cell figure). Markdown and
    LaTeX carry the provenance, failed cells and warnings under them; CSVs stay plain data. A device's files
    are named ``..._<device>``."""
    tag = device_slug(device) if device else None
    directory = run_dir / "tables"
    notes = provenance_notes(manifest)
    failed = [f"{e.get('cell_label')}: {e.get('error')}" if e.get("unsupported") else
              f"failed: {e.get('cell_label')}: {e.get('error')}" for e in RunStore(run_dir).errors()]
    extra = failed + [f"warning: {w}" for w in cell_warnings(summary)] + list(summary.attrs.get("problems", []))
    written = write_table(directory, _suffix("efficiency", tag), *efficiency_table(summary, manifest), notes + extra)
    grid = exit_cells(summary)
    for backend, cells in grid.groupby("backend", sort=False):
        for metric, name in (("speedup", "speedup vs autoregressive"), ("acceptance_rate", "acceptance")):
            text, numbers, note = grid_table(cells, metric)
            stem = "grid_" + _suffix("speedup" if metric == "speedup" else "acceptance", backend, tag)
            caption = f"{name}: exit layer x K ({backend})" + (f"; {note}" if note else "")
            written += write_table(directory, stem, text, numbers, notes, caption)
    written.append(_summary_csv(summary, directory / f"{_suffix('summary', tag)}.csv"))
    return written


def write_task_table(parent: Path | str, runs: dict[str, Path], device: str | None = None) -> list[Path]:
    """One sweep over several tasks (one run directory per task) -> the Spec-Bench-style task table (one per
    device, ``tasks_<device>``, when the runs were timed on several)."""
    devices = list(dict.fromkeys(name for run_dir in runs.values() for name in run_devices(run_dir)))
    if device is None and len(devices) > 1:
        return [path for name in devices for path in write_task_table(parent, runs, name)]
    summaries, notes = {}, []
    for task, run_dir in runs.items():
        summary, manifest = load_summary(run_dir, device=device)
        summaries[task] = summary
        notes = notes or provenance_notes(manifest, list(runs))
    return write_table(Path(parent) / "tables", _suffix("tasks", device and device_slug(device)),
                       *task_table(summaries), notes, caption="speedup per task (Spec-Bench style)"
                       + (f" on {device}" if device else ""))


def efficiency_markdown(run_dir: Path | str, device: str | None = None) -> str:
    """The efficiency table of a run with its provenance, as Markdown (a table per device when it was timed
    on several: times are never pooled across devices)."""
    devices = run_devices(run_dir) if device is None else []
    if len(devices) > 1:
        return f"rows timed on {len(devices)} devices: one table per device\n\n" + "\n".join(
            f"### {name}\n\n{efficiency_markdown(run_dir, name)}" for name in devices)
    summary, manifest = load_summary(run_dir, device=device)
    if summary.empty:
        return "(no finished cells)\n"
    return to_markdown(efficiency_table(summary, manifest)[0], provenance_notes(manifest))
