"""A run's raw rows -> one summary row per cell: speed with intervals, counts, costs (see METRICS).

Counts and tokens are the same in every repeat of a prompt (checked when measured), so they are taken
from each prompt's first row; times use every row. Speedups pair each cell row with the baseline row of
the same prompt and round, and carry a bootstrap interval over prompts x repeats (`intervals`).

`load_summary(run_dir)` is what tables, plots and compare read; nothing downstream looks at raw rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from skipbench import calibrate, costs, intervals, machine
from skipbench.errors import UserError
from skipbench.spec import Cell, baseline_of
from skipbench.store import RunStore

IDENTITY = ["strategy", "exit_layer", "num_speculations", "draft_model", "backend", "replica"]
# The old "noisy" threshold (a speedup interval wider than +-10%), no longer a warning: most intervals of a
# small run are that wide from the prompts' spread alone. A cell is flagged only where its interval holds 1.00,
# naming the source of width that stops the reading (`_undecided`). Kept for importers of the name.
NOISY = 0.10
MIN_UNITS = intervals.MIN_UNITS


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


def _cell_stats(rows: pd.DataFrame) -> dict:
    first = first_rows(rows)
    repeats = rows.groupby("prompt_index").size()
    new_tokens = int(first["new_tokens"].sum())
    ended_on_eos = int((first["stop_reason"] == "eos").sum())
    drafted, accepted, steps = (int(first[name].sum()) for name in ("drafted", "accepted", "verify_steps"))
    per_sample = (first["accepted"] / first["drafted"]).where(first["drafted"] > 0)
    prompts = sorted(int(i) for i in first["prompt_index"])
    speed = units(rows, "new_tokens", "time_s", prompts, rounds_of(rows))
    tokens_per_s, low, high = intervals.ratio(speed)
    if speed.size < MIN_UNITS:
        low = high = float("nan")
    acceptance = intervals.ratio(intervals.Units(first[["accepted"]].to_numpy(float),
                                                 first[["drafted"]].to_numpy(float))) if drafted else (np.nan,) * 3
    acceptance_low, acceptance_high = acceptance[1:] if len(first) >= MIN_UNITS else (np.nan, np.nan)
    preempted = machine.preempted(rows)
    time_per_prompt = rows.groupby("prompt_index")["time_s"].mean()
    stats = {
        "prompts": len(first),
        "repeats": int(repeats.min()),
        "new_tokens": new_tokens,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_low": low,
        "tokens_per_s_high": high,
        "time_per_token_s": 1.0 / tokens_per_s if tokens_per_s else float("nan"),
        "time_per_input_s": float(time_per_prompt.mean()),
        "prefill_share": float(rows["prefill_s"].sum() / rows["time_s"].sum()) if rows["time_s"].sum() else np.nan,
        "drafted": drafted,
        "accepted": accepted,
        "acceptance_rate": accepted / drafted if drafted else float("nan"),
        "acceptance_rate_low": acceptance_low,
        "acceptance_rate_high": acceptance_high,
        "acceptance_rate_per_sample": float(per_sample.mean()),
        "verify_steps": steps,
        # An EOS ends a generation as the step's output: counted here, so autoregressive stays at 1.0.
        "tokens_per_step": (new_tokens + ended_on_eos) / steps if steps else float("nan"),
        "accept_by_position": accept_by_position(first),
        "peak_mem_bytes": rows["peak_mem_bytes"].max() if "peak_mem_bytes" in rows else None,
        "tokens_per_s_units": speed.size,
        "rows": len(rows),
        "cpu_share": machine.median_cpu_share(rows),
        "preempted_rows": int(preempted.sum()),
    }
    stats |= {name: float(first[name].mean()) for name in rows.columns if name.startswith("quality_")}
    return stats



def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per cell, in the frame's order: speed (with intervals), counts, quality, speedup, lossless."""
    if frame.empty:
        return pd.DataFrame()
    groups = {key: rows for key, rows in frame.groupby("cell_key", sort=False)}
    cells = {key: Cell.from_record(rows.iloc[0]) for key, rows in groups.items()}
    records = []
    for key, rows in groups.items():
        cell = cells[key]
        record = {"cell_key": key, "cell_label": cell.label(), **dict(zip(IDENTITY, cell.identity(), strict=True))}
        record |= _cell_stats(rows)
        base = baseline_of(cell, list(cells.values()))
        base_key = next((k for k, c in cells.items() if c == base), None)
        record |= _versus_baseline(rows, groups.get(base_key))
        record["baseline_label"] = base.label() if base is not None and base_key is not None else None
        # The bound "speedup <= tokens per step" holds only against the same implementation.
        record["same_backend_baseline"] = base is not None and base_key is not None and base.backend == cell.backend
        record["control"] = bool(cell.replica) and not cell.method.speculates
        record["is_baseline"] = base == cell
        records.append(record)
    summary = pd.DataFrame(records)
    summary = summary.assign(**rank_grid(summary, groups))
    summary["warnings"] = [_warnings(record) for record in summary.to_dict("records")]
    return summary


def _versus_baseline(rows: pd.DataFrame, baseline: pd.DataFrame | None) -> dict:
    """Speedup (paired by prompt and round, with its interval) and losslessness against the baseline, and the
    two sources of the interval's width (`intervals.sources`). Fewer than MIN_UNITS paired units: no interval."""
    if baseline is None:
        return {"speedup": np.nan, "speedup_low": np.nan, "speedup_high": np.nan, "lossless": np.nan,
                "speedup_units": 0, "speedup_prompts": 0, "speedup_rounds": 0,
                "speedup_width_prompts": np.nan, "speedup_width_rounds": np.nan}
    prompts = sorted(int(i) for i in rows["prompt_index"].unique())
    rounds = rounds_of(rows, baseline)
    cell_units = units(rows, "time_s", "new_tokens", prompts, rounds)
    base_units = units(baseline, "time_s", "new_tokens", prompts, rounds)
    speedup, low, high = intervals.speedup(cell_units, base_units)
    paired = intervals.Paired.of(cell_units, base_units)
    found = intervals.sources(paired)
    widths = {"speedup_width_prompts": found.prompts, "speedup_width_rounds": found.rounds}
    if found.units < MIN_UNITS:
        low = high = np.nan
        widths = dict.fromkeys(widths, np.nan)
    reference = {int(r.prompt_index): list(r.tokens) for r in first_rows(baseline).itertuples()}
    same = [first_difference(list(r.tokens), reference[int(r.prompt_index)]) == -1
            for r in first_rows(rows).itertuples() if int(r.prompt_index) in reference]
    return {"speedup": speedup, "speedup_low": low, "speedup_high": high,
            "lossless": sum(same) / len(same) if same else np.nan, "speedup_units": found.units,
            "speedup_prompts": int(paired.shape[0]),
            "speedup_rounds": int(paired.counts.min()) if len(paired.counts) else 0, **widths}


# --------------------------------------------------------------------------- paired ranking


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


# --------------------------------------------------------------------------- warnings


def _percent(width: float) -> str:
    return f"+-{width:.0%}" if width == width else "unmeasured"


def _needs(prompts: int, rounds: int) -> str:
    """What brings a cell to MIN_UNITS paired units: more prompts at its rounds, or more rounds."""
    more_prompts = -(-MIN_UNITS // max(rounds, 1)) - prompts
    repeats = -(-MIN_UNITS // max(prompts, 1))
    return f"{more_prompts} more prompt(s) or --repeats {repeats}"


def _warnings(record: dict) -> list[str]:
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


def report_lines(summary: pd.DataFrame, collapse: int = 4) -> list[str]:
    """What to print under a run's table: the best-cell lines, then the warnings, a kind that `collapse` or
    more cells share in one line (which cells: tables/efficiency.md), the others one per cell."""
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
            lines.append(f"warning: {name}: {len(found)} of {len(records)} cells{extra} (tables/efficiency.md "
                         f"lists them): {ADVICE[name]}")
        else:
            lines += [f"warning {label}: {warning}" for label, warning in found]
    return lines


# --------------------------------------------------------------------------- costs


def bytes_per_param(manifest: dict) -> int:
    """Bytes per weight of the run, from the dtype the models were loaded in (provenance)."""
    dtype = (manifest.get("provenance") or {}).get("dtype") or (manifest.get("setup") or {}).get("dtype")
    return costs.dtype_bytes(dtype if dtype not in (None, "auto") else None)


def model_shapes(manifest: dict) -> tuple[costs.ModelShape | None, dict[str, costs.ModelShape]]:
    """The target's shape and each draft model's, or None where a config is missing or not a Llama."""
    per_param = bytes_per_param(manifest)
    models = manifest.get("models") or {}

    def shape(info: dict | None) -> costs.ModelShape | None:
        config = (info or {}).get("config")
        if not config:
            return None
        try:
            return costs.ModelShape.from_config(config, bytes_per_param=per_param)
        except (TypeError, ValueError, KeyError):
            return None

    drafts = {name: s for name, info in (models.get("drafts") or {}).items() if (s := shape(info)) is not None}
    return shape(models.get("target")), drafts


def _cost_columns(rows: pd.DataFrame, cell: Cell, shape: costs.ModelShape, draft: costs.ModelShape | None,
                  calibrations: dict[str, dict | None]) -> dict:
    first = first_rows(rows)
    passes = costs.pass_table(first)
    shapes = {"target": shape} | ({"draft": draft} if draft is not None else {})
    found = costs.costs_of_passes(passes, shapes)
    new_tokens = float(first["new_tokens"].sum())
    seconds = float(rows.groupby("prompt_index")["time_s"].mean().sum())  # one pass over the prompts
    record = {}
    for unit, split in (("flops", found.flops), ("bytes", found.bytes)):
        record[f"{unit}_total"] = split["total"]
        record[f"{unit}_per_token"] = split["total"] / new_tokens if new_tokens else np.nan
        for phase in ("prefill", "draft", "verify", "wasted"):
            record[f"{unit}_{phase}_per_token"] = split[phase] / new_tokens if new_tokens else np.nan
            if phase != "prefill":
                record[f"{unit}_{phase}_share"] = split[phase] / split["total"] if split["total"] else np.nan
    # The time model times the model's layers eagerly: it says nothing of compiled kernels.
    predicted = _predicted_seconds(passes, calibrations) if cell.method.eager_layers else np.nan
    record["model_seconds_per_token"] = predicted / new_tokens if new_tokens else np.nan
    method = cell.method
    record["params_resident"] = costs.params_resident(shape, draft if method.separate_draft_model else None)
    kv = costs.kv_cache_bytes(shape, costs.final_cache_tokens(passes, "target", shape.layers))
    if method.draft_cache == "draft_model" and draft is not None:
        kv += costs.kv_cache_bytes(draft, costs.final_cache_tokens(passes, "draft"))
    elif method.draft_cache == "exit_layers":
        kv += costs.kv_cache_bytes(shape, costs.final_cache_tokens(passes, "target", cell.exit_layer),
                                   cell.exit_layer)
    record["kv_cache_bytes"] = kv / max(len(first), 1)
    record["achieved_bytes_per_s"] = found.bytes["total"] / seconds if seconds else np.nan
    record["achieved_flops_per_s"] = found.flops["total"] / seconds if seconds else np.nan
    return record


def _predicted_seconds(passes: pd.DataFrame, calibrations: dict[str, dict | None]) -> float:
    """The time model: each pass as its layers x the measured time of a layer for its block of positions,
    plus the head for its rows (`calibrate`); nan when a model that ran was not calibrated."""
    total = 0.0
    for model, part in passes.groupby("model"):
        calibration = calibrations.get(model)
        if calibration is None:
            return float("nan")
        total += calibrate.pass_seconds(calibration, part["start"], part["end"], part["positions"],
                                        part["head_positions"]).sum()
    return total


def add_costs(summary: pd.DataFrame, frame: pd.DataFrame, manifest: dict, *, peak_bandwidth: float | None = None,
              peak_flops: float | None = None) -> pd.DataFrame:
    """The summary with the analytical cost columns of what each cell's generations ran.

    Per-token figures are totals over the cell's prompts (one repeat; counts are the same in each) divided
    by Σ new tokens, prefill included. ``predicted_speedup`` is the baseline's bytes per token over the
    cell's (batch-1 decoding reads weights: a bandwidth-bound model), ``predicted_speedup_flops`` the same
    with FLOPs, and ``predicted_speedup_time`` the time model of `calibrate` (each pass's measured block
    time: it knows a verify block can be compute-bound). ``measured_over_predicted`` divides the measured
    speedup by the time model where the run was calibrated, else by the bytes model.
    """
    shape, drafts = model_shapes(manifest)
    models = manifest.get("models") or {}
    target_calibration = (models.get("target") or {}).get("calibration")
    if summary.empty or shape is None:
        return summary
    groups = {key: rows for key, rows in frame.groupby("cell_key", sort=False)}
    records = []
    for row in summary.to_dict("records"):
        cell = Cell.from_record(row)
        draft = drafts.get(cell.draft_model) if cell.draft_model else None
        if cell.method.separate_draft_model and draft is None:
            records.append({})
            continue
        draft_calibration = ((models.get("drafts") or {}).get(cell.draft_model) or {}).get("calibration")
        calibrations = {"target": target_calibration, "draft": draft_calibration}
        records.append(_cost_columns(groups[row["cell_key"]], cell, shape, draft, calibrations))
    summary = pd.concat([summary.reset_index(drop=True), pd.DataFrame(records)], axis=1)
    cells = [Cell.from_record(row) for row in summary.to_dict("records")]
    for name, column in (("predicted_speedup", "bytes_per_token"), ("predicted_speedup_flops", "flops_per_token"),
                         ("predicted_speedup_time", "model_seconds_per_token")):
        values = []
        for cell, own in zip(cells, summary.get(column, pd.Series(np.nan, index=summary.index)), strict=True):
            base = baseline_of(cell, cells)
            base_value = summary.loc[cells.index(base), column] if base is not None and column in summary else np.nan
            values.append(base_value / own if own and own == own else np.nan)
        summary[name] = values
    best = summary["predicted_speedup_time"].where(summary["predicted_speedup_time"].notna(),
                                                   summary["predicted_speedup"])
    summary["measured_over_predicted"] = summary["speedup"] / best
    summary["bandwidth_fraction"] = summary["achieved_bytes_per_s"] / peak_bandwidth if peak_bandwidth else np.nan
    summary["compute_fraction"] = summary["achieved_flops_per_s"] / peak_flops if peak_flops else np.nan
    return summary


def in_manifest_order(summary: pd.DataFrame, manifest: dict) -> pd.DataFrame:
    """Cells in the order the run lists them (the baseline first), unlisted ones after."""
    order = {}
    for position, cell in enumerate(manifest.get("cells") or []):
        order.setdefault(Cell.from_record(cell).identity(), position)
    rank = [order.get(Cell.from_record(row).identity(), len(order)) for row in summary.to_dict("records")]
    return summary.assign(_rank=rank).sort_values("_rank", kind="stable").drop(columns="_rank").reset_index(drop=True)


class MixedDevices(UserError):
    """A run timed on several devices, read as one: times are never pooled across devices."""


def devices_of(frame: pd.DataFrame) -> list[str]:
    """The devices a run's rows were timed on, the device of group 0 first (runs of older skipbench versions
    record none: [])."""
    if frame.empty or "device" not in frame:
        return []
    timed = frame.dropna(subset=["device"])
    first_group = timed.groupby(timed["device"].astype(str))["group"].min()
    return sorted(first_group.index, key=lambda device: (first_group[device], device))


def run_devices(run_dir: Path | str) -> list[str]:
    """The devices of a run's finished rows: more than one (e.g. a sweep over a cluster's mixed GPUs) means
    one report per device."""
    return devices_of(RunStore(run_dir).read_cells())


def device_slug(device: str) -> str:
    """A device's name in file names: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return "-".join(part for part in "".join(c if c.isalnum() else " " for c in device.lower()).split())


def for_device(manifest: dict, device: str) -> dict:
    """The manifest as one device's report sees it: the provenance of a group timed there; the calibration
    (time model) only where it was measured on that device."""
    provenance = dict(manifest.get("provenance") or {})
    models = manifest.get("models") or {}
    if provenance.get("device") != device and models:  # calibrated on another device: no time model here
        drafts = {name: {**info, "calibration": None} for name, info in (models.get("drafts") or {}).items()}
        models = {**models, "target": {**(models.get("target") or {}), "calibration": None}, "drafts": drafts}
    entry = next((where for where in (manifest.get("groups") or {}).values() if where.get("device") == device), {})
    for name in ("cpu_threads", "torch_version", "transformers_version", "python_version", "skipbench_version",
                 "git_commit"):
        if entry.get(name) is not None:
            provenance[name] = entry[name]
    return {**manifest, "models": models, "provenance": provenance | {"device": device}}


def load_summary(run_dir: Path | str, *, peak_bandwidth: float | None = None,
                 peak_flops: float | None = None, device: str | None = None) -> tuple[pd.DataFrame, dict]:
    """(per-cell summary with cost columns, manifest) of a run directory; lossless is nan when sampled.

    Times are never pooled across devices: a run timed on several (`run_devices`) is read one `device` at a
    time, with that device's rows and provenance; reading it whole raises `MixedDevices`."""
    store = RunStore(run_dir)
    manifest = store.read_manifest()
    frame = store.read_cells()
    devices = devices_of(frame)
    if device is not None:
        frame = frame[frame["device"] == device].reset_index(drop=True) if "device" in frame else frame
        manifest = for_device(manifest, device)
    elif len(devices) > 1:
        raise MixedDevices(f"{run_dir} holds rows timed on {len(devices)} devices ({'; '.join(devices)}): times are "
                           f"never pooled across devices, so it is summarized one device at a time (skipbench "
                           f"report writes a table per device)")
    frame = complete_cells(frame, (manifest.get("prompts") or {}).get("prompts"))
    summary = summarize(frame)
    if summary.empty:
        return summary, manifest
    summary = in_manifest_order(summary, manifest)
    if (manifest.get("setup") or {}).get("sample"):
        summary["lossless"] = np.nan
    summary = add_costs(summary, frame, manifest, peak_bandwidth=peak_bandwidth, peak_flops=peak_flops)
    summary.attrs["problems"] = store.problems
    return summary, manifest


def complete_cells(frame: pd.DataFrame, prompts: int | None) -> pd.DataFrame:
    """Only cells that measured every prompt at least once (a partial cell would compare other prompts)."""
    if frame.empty or prompts is None:
        return frame
    covered = frame.groupby("cell_key")["prompt_index"].nunique()
    return frame[frame["cell_key"].isin(covered[covered >= prompts].index)]
