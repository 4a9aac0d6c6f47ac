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
from skipbench.intervals import MIN_UNITS
from skipbench.latency import latency_columns
from skipbench.pairing import accept_by_position, first_difference, first_rows, rounds_of, units
from skipbench.ranking import rank_grid
from skipbench.spec import Cell, baseline_of
from skipbench.store import RunStore
from skipbench.verdicts import row_warnings

IDENTITY = ["strategy", "exit_layer", "num_speculations", "draft_model", "backend", "replica"]


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
        record = {"cell_key": key, "cell_label": cell.label(), **dict(zip(IDENTITY, cell.identity()[:len(IDENTITY)],
                                                                          strict=True))}
        record["draft_policy"] = cell.draft_policy
        record["batch_size"] = cell.batch_size
        record |= _cell_stats(rows)
        record |= latency_columns(rows.to_dict("records"))
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
    summary["warnings"] = [row_warnings(record) for record in summary.to_dict("records")]
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
    """The time model: each pass as its layers x the measured time of a layer for its block of positions at
    its batch's rows, plus the head for its rows (`calibrate`); nan when a model that ran, or a number of rows
    it ran at, was not calibrated.

    A pass shared by B rows is recorded once in each of their traces, and each row's `time_s` is 1/B of the
    batch's wall time, so each row is charged 1/B of the pass: the cell's prediction counts it once."""
    total = 0.0
    for model, part in passes.groupby("model"):
        calibration = calibrations.get(model)
        if calibration is None:
            return float("nan")
        rows = part["batch"].to_numpy() if "batch" in part else 1
        seconds = calibrate.pass_seconds(calibration, part["start"], part["end"], part["positions"],
                                         part["head_positions"], rows)
        total += float(np.sum(seconds / rows))  # nan stays nan: a pass the model cannot time
    return total


def add_costs(summary: pd.DataFrame, frame: pd.DataFrame, manifest: dict, *, peak_bandwidth: float | None = None,
              peak_flops: float | None = None) -> pd.DataFrame:
    """The summary with the analytical cost columns of what each cell's generations ran.

    Per-token figures are totals over the cell's prompts (one repeat; counts are the same in each) divided
    by Σ new tokens, prefill included. ``predicted_speedup`` is the baseline's bytes per token over the
    cell's (batch-1 decoding reads weights: a bandwidth-bound model), ``predicted_speedup_flops`` the same
    with FLOPs, and ``predicted_speedup_time`` the time model of `calibrate` (each pass's measured block
    time at its batch's rows: it knows a verify block can be compute-bound, and what B rows cost together;
    a batched cell against autoregressive at the same batch size). ``measured_over_predicted`` divides the measured
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
