"""`--dry-run`: what a run or sweep will do, where its models go and what it costs, without loading weights.

Configs come from a synthetic preset, a local directory, the Hugging Face cache, or (a Hub id known to have
a preset's shape, offline) the preset's config, and the output says which. Prompt lengths come from the
prompts themselves where they can be tokenised here, else from --max-prompt-tokens or a stated assumption.

The time estimate follows the summary's time model: a generation's passes (prefill, then per step K draft
passes and one verify block) each cost layers x the time of a layer for its block size plus the head. Block
times are a calibration stored by an earlier run of the same model shape on this machine (`runs/`), else the
roofline max(bytes / bandwidth, FLOPs / peak) of `--peak-bandwidth/--peak-flops` (or of a roofline measured
here now). Acceptance is unknown before decoding: a synthetic `agree=A` model accepts every draft at exits
>= A; otherwise `acceptance` (per draft token) is assumed and printed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, LlamaConfig

from skipbench import calibrate, costs, placement, tasks
from skipbench.models import (
    PRESETS,
    ByteTokenizer,
    ModelError,
    available_memory,
    parse_synthetic,
    pretrained_config,
    synthetic_config,
)
from skipbench.spec import Cell, Setup
from skipbench.store import RunStore

# Hub ids whose published config has a preset's shape: what a dry run uses when the id's config is not here.
HUB_PRESETS = {
    "facebook/layerskip-llama2-7b": "llama2-7b", "facebook/layerskip-llama2-13b": "llama2-13b",
    "facebook/layerskip-llama2-70b": "llama2-70b", "facebook/layerskip-codellama-7b": "codellama-7b",
    "facebook/layerskip-codellama-34b": None, "facebook/layerskip-llama3-8b": "llama3-8b",
    "facebook/layerskip-llama3.2-1b": "llama3.2-1b", "meta-llama/llama-2-7b-hf": "llama2-7b",
    "meta-llama/llama-2-13b-hf": "llama2-13b", "meta-llama/llama-2-70b-hf": "llama2-70b",
    "meta-llama/meta-llama-3-8b": "llama3-8b", "meta-llama/llama-3.2-1b": "llama3.2-1b",
    "tinyllama/tinyllama_v1.1": "tinyllama-1.1b", "tinyllama/tinyllama-1.1b-chat-v1.0": "tinyllama-1.1b",
}
ASSUMED_ACCEPTANCE = 0.6  # per draft token, when nothing better is known (the LayerSkip blog's range)
ASSUMED_PROMPT_TOKENS = 1024
# torch.compile of one graph (a decoder layer, the pass inputs or the head at one (rows, positions)), measured:
# cpu 9 graphs of synthetic:tiny in 27.6-35.4 s (2 cores, an empty inductor cache); cuda 6 graphs of the
# Llama-3-8B shape in 13.1 s (one H200, torch 2.11). Larger models' layers compile in about the same time.
COMPILE_SECONDS_PER_GRAPH = {"cuda": 2.2, "cpu": 3.5}


class DryRunError(ModelError):
    """A model whose config cannot be found without its weights; one line."""


def config_of(name: str):
    """(config, where it came from) of any model name, without weights."""
    if name.startswith("synthetic:"):
        return synthetic_config(name), "synthetic preset"
    if name in PRESETS:
        return LlamaConfig(**PRESETS[name]), f"the {name} preset's shape"
    if (Path(name).expanduser() / "config.json").is_file():
        return pretrained_config(name), f"{name}/config.json"
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True), "the Hugging Face cache"
    except Exception:  # not in the cache: a known shape may stand in
        preset = HUB_PRESETS.get(name.lower())
        if preset:
            return (LlamaConfig(**PRESETS[preset]),
                    f"not available offline: the published shape of synthetic:{preset} stands in")
    raise DryRunError(f"model {name!r}: no config here (not a preset, a local directory or in the Hugging Face "
                      f"cache) and its shape is not known; download its config.json or give a local directory")


@dataclass
class Workload:
    prompts: int
    longest: int  # tokens
    typical: int
    new_tokens: int
    basis: str


def workload(setup: Setup, tokenizer=None) -> Workload:
    """Prompt count and lengths: tokenised here when they can be, else stated assumptions."""
    defaults = getattr(tasks.datasets, "_DEFAULTS", {}).get((setup.dataset or "").split(":")[0])
    new = setup.max_new_tokens or (defaults.max_new_tokens if defaults else 128)
    if setup.dataset is None:
        tokenizer = tokenizer or ByteTokenizer()
        texts = [setup.template.replace("{prompt}", text) if setup.template else text for text in setup.prompts]
        texts = texts[: setup.num_samples] if setup.num_samples else texts
        lengths = sorted(len(tokenizer.encode(text)) for text in texts) or [1]
        if setup.max_prompt_tokens:
            lengths = [min(length, setup.max_prompt_tokens) for length in lengths]
        kind = "tokenised here" if not isinstance(tokenizer, ByteTokenizer) else "bytes (an upper bound for BPE)"
        return Workload(len(texts), lengths[-1], lengths[len(lengths) // 2], new, f"--prompt texts, {kind}")
    longest = setup.max_prompt_tokens or ASSUMED_PROMPT_TOKENS
    count = setup.num_samples or 100
    why = ("--max-prompt-tokens" if setup.max_prompt_tokens
           else f"assumed {ASSUMED_PROMPT_TOKENS} (set --max-prompt-tokens)")
    return Workload(count, longest, max(longest * 3 // 4, 1), new,
                    f"{setup.dataset}: {count} prompts of at most {longest} tokens ({why})")


# --------------------------------------------------------------------------- passes of a generation


def acceptance(setup_model: str, cell: Cell, assumed: float) -> tuple[float, str]:
    if setup_model.startswith("synthetic:") and cell.exit_layer is not None:
        agree = parse_synthetic(setup_model)[1].get("agree")
        if agree is not None and cell.exit_layer >= agree:
            return 1.0, "1.0 (synthetic agree)"
    return assumed, f"{assumed:g} (assumed)"


def passes(cell: Cell, layers: int, draft_layers: int | None, prompt: int, new: int, rate: float) -> list[tuple]:
    """(model, start, end, positions, head rows, count) of one generation, with its expected step count."""
    found = [("target", 0, layers, max(prompt - 1, 0), 0, 1)]
    k = cell.num_speculations or 0
    if not cell.method.speculates:
        return [*found, ("target", 0, layers, 1, 1, new)]
    per_step = 1 + sum(rate**index for index in range(1, k + 1))
    steps = math.ceil(new / per_step)
    if cell.exit_layer is not None:
        exit_layer = cell.exit_layer
        return [*found, ("target", 0, exit_layer, 1, 1, steps * k), ("target", 0, exit_layer, 1, 0, steps),
                ("target", exit_layer, layers, k + 1, k + 1, steps)]
    draft = draft_layers or layers
    return [*found, ("draft", 0, draft, max(prompt - 1, 0), 0, 1), ("draft", 0, draft, 1, 1, steps * k),
            ("target", 0, layers, k + 1, k + 1, steps)]


@dataclass
class TimeBasis:
    kind: str  # "calibration" | "roofline" | "none"
    text: str
    calibrations: dict = field(default_factory=dict)  # role -> calibration dict
    overhead: float = 0.0  # seconds per pass beyond its layers and head (the loop, launches, the host sync)
    bandwidth: float | None = None
    flops: float | None = None

    def seconds(self, shape: costs.ModelShape, role: str, span: tuple, context: int) -> float | None:
        start, end, positions, head = span
        calibration = self.calibrations.get(role)
        if self.kind == "calibration" and calibration:
            return float(calibrate.pass_seconds(calibration, start, end, positions, head, clamp=True)) + self.overhead
        if self.bandwidth and self.flops:
            moved = float(costs.pass_bytes(shape, start, end, positions, context, head))
            work = float(costs.pass_flops(shape, start, end, positions, context, head))
            return max(moved / self.bandwidth, work / self.flops)
        return None


def _same_shape(config: dict, shape: costs.ModelShape) -> bool:
    try:
        return costs.ModelShape.from_config(config, bytes_per_param=shape.bytes_per_param) == shape
    except (TypeError, ValueError, KeyError):
        return False


def stored_calibration(shape: costs.ModelShape, device: str, dtype: str,
                       roots=(Path("runs"),)) -> tuple[dict, str] | None:
    """The newest calibration an earlier run stored for a model of this shape on this device and dtype."""
    found = []
    for root in roots:
        for manifest in [*Path(root).glob("*/manifest.json"), *Path(root).glob("*/*/manifest.json")]:
            try:
                data = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            provenance = data.get("provenance") or {}
            if provenance.get("device") != device or provenance.get("dtype") != dtype:
                continue
            models = data.get("models") or {}
            for info in [models.get("target") or {}, *(models.get("drafts") or {}).values()]:
                if info.get("calibration") and _same_shape(info.get("config") or {}, shape):
                    found.append((manifest.stat().st_mtime, info["calibration"], str(manifest.parent)))
    if not found:
        return None
    _, calibration, where = max(found, key=lambda entry: entry[0])
    return calibration, where


@dataclass
class Estimate:
    wall_s: float | None
    compile_s: float
    per_cell: dict  # label -> seconds
    lines: list[str]


def estimate(setup: Setup, cells: list[Cell], shapes: dict[str, costs.ModelShape], load: Workload,
             basis: TimeBasis, rate: float, device_kind: str) -> Estimate:
    """Seconds of the whole measurement: every cell decodes every prompt (warm-up + repeats) times."""
    per_cell, notes, compile_shapes = {}, [], set()
    context = load.typical + load.new_tokens // 2
    for cell in cells:
        draft = shapes.get(cell.draft_model) if cell.draft_model else None
        cell_rate, said = acceptance(setup.model, cell, rate)
        total = 0.0
        for role, start, end, positions, head, count in passes(cell, shapes["target"].layers,
                                                               draft.layers if draft else None, load.typical,
                                                               load.new_tokens, cell_rate):
            shape = draft if role == "draft" else shapes["target"]
            seconds = basis.seconds(shape, role if role == "target" else cell.draft_model,
                                    (start, end, positions, head), context)
            if seconds is None:
                total = float("nan")
                break
            total += seconds * count
            if cell.backend == "compiled" and positions <= (cell.num_speculations or 0) + 2:  # not prefill
                # One graph per unit and (rows, positions), whatever the span: the exits share them.
                model, rows = role if role == "target" else cell.draft_model, cell.batch_size
                if start < end:
                    compile_shapes |= {(model, "inputs", rows, positions), (model, "layer", rows, positions)}
                if head:
                    compile_shapes.add((model, "head", rows, head))
        per_cell[cell.label()] = total * (setup.warmup + setup.repeats) * load.prompts
        if cell.method.speculates:
            notes.append(f"{cell.label()}: acceptance {said}")
    compile_s = len(compile_shapes) * COMPILE_SECONDS_PER_GRAPH.get(device_kind, 20.0)
    values = np.array(list(per_cell.values()), dtype=float)
    wall = None if np.isnan(values).any() else float(values.sum())
    return Estimate(wall, compile_s, per_cell, sorted(set(notes)))


def calibration_seconds(basis: TimeBasis, shapes: dict[str, costs.ModelShape], load: Workload, k: int) -> float:
    """What timing the layer and the head of each model costs before measuring (`calibrate.measure`)."""
    sizes = calibrate.block_sizes(load.longest, k)
    total = 0.0
    for role, shape in shapes.items():
        for size in sizes:
            one = basis.seconds(shape, role, (0, 1, size, 0), load.typical) or 0.0
            head = basis.seconds(shape, role, (shape.layers, shape.layers, size, size), load.typical) or 0.0
            total += (calibrate.REPEATS + 1) * (one + head)
    return total


def present_devices() -> list[placement.Device]:
    """This machine's GPUs (their total memory), else its CPU (memory available now)."""
    if torch.cuda.is_available():
        return [placement.Device(f"cuda:{index}", torch.cuda.get_device_properties(index).total_memory)
                for index in range(torch.cuda.device_count())]
    return [placement.Device("cpu", available_memory(torch.device("cpu")) or 0)]


@dataclass
class Options:
    """What a dry run is asked on top of the setup."""

    gpus: int | None = None
    gpu_memory: str = "80GB"
    peak_bandwidth: float | None = None
    peak_flops: float | None = None
    acceptance: float = ASSUMED_ACCEPTANCE
    roots: tuple = (Path("runs"),)
    roofline: Callable[[], dict] | None = None  # measures this device's peaks, when nothing else is known


def shape_for(config, dtype: str, gpu: bool) -> costs.ModelShape:
    size = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 2 if gpu else 4)
    return costs.ModelShape.from_config(config, bytes_per_param=size)


def report(setup: Setup, cells: list[Cell], options: Options, *, device_name: str = "") -> list[str]:
    """The dry run's lines: cells, configs, placement and memory per device, the time estimate and its basis."""
    placement.parse_memory(options.gpu_memory)  # a bad --gpu-memory is refused even where --gpus is not given
    devices = (placement.target_devices(options.gpus, options.gpu_memory) if options.gpus is not None
               else present_devices())
    gpu = devices[0].name.startswith("cuda")
    dtype = setup.dtype if setup.dtype != "auto" else ("bfloat16" if gpu else "float32")
    lines = [f"dry run: {len(cells)} cell(s), nothing loaded"]
    lines += [f"  {cell.label()}" for cell in cells]
    config, where = config_of(setup.model)
    shapes = {"target": shape_for(config, dtype, gpu)}
    lines.append(f"model {setup.model}: {shapes['target'].layers} layers, "
                 f"{shapes['target'].params().total / 1e9:.2f} B params, {dtype}; config: {where}")
    for name in sorted({cell.draft_model for cell in cells if cell.draft_model}):
        draft_config, draft_where = config_of(name)
        shapes[name] = shape_for(draft_config, dtype, gpu)
        lines.append(f"draft {name}: {shapes[name].layers} layers, {shapes[name].params().total / 1e9:.2f} B params; "
                     f"config: {draft_where}")
    load = workload(setup)
    k = max((cell.num_speculations or 0 for cell in cells), default=0)
    kv_tokens = load.longest + load.new_tokens + k + 1
    lines.append(f"prompts: {load.basis}; {load.new_tokens} new tokens; KV cache for {kv_tokens} positions")
    what = f"{options.gpus} x {options.gpu_memory} (--gpus)" if options.gpus else "present here"
    lines.append(f"devices ({what}): " + ", ".join(f"{d.name} {d.memory / 1e9:.0f} GB" for d in devices))
    mode = setup.device_map or "auto"
    try:
        placed = placement.resolve(mode, shapes["target"], devices, kv_tokens=kv_tokens)
    except placement.PlacementError as error:
        if mode not in placement.MODES:  # the JSON map itself is wrong: bad input, refused as a real run does
            raise
        return [*lines, f"placement: {error}"]
    placement.check_present(placed, devices, f"model {setup.model}")  # a map naming a device not there
    if setup.device_map is None and len(placed.devices()) > 1:
        lines.append("note: the model does not fit on one device: run it with --device-map auto (shown)")
    lines.append(f"placement ({mode}) of {setup.model}: {placed.summary()}")
    table = placement.memory(shapes["target"], placed, kv_tokens)
    used = {name: entry.total for name, entry in table.items()}
    for name in (n for n in shapes if n != "target"):
        draft_placed = placement.place(shapes[name], devices, "sequential", kv_tokens=kv_tokens, used=used)
        placement.memory(shapes[name], draft_placed, kv_tokens, table, draft=True)
        used = {device: entry.total for device, entry in table.items()}
        lines.append(f"placement of draft {name}: {draft_placed.summary()}")
    lines.append("memory per device (GB):   weights  KV cache  draft    total   share")
    sizes = {device.name: device.memory for device in devices}
    for name, entry in table.items():
        share = entry.total / (placement.MEMORY_SHARE * sizes[name]) if sizes.get(name) else float("nan")
        lines.append(f"  {name:<22} {entry.weights / 1e9:8.2f} {entry.kv / 1e9:9.2f} {entry.draft / 1e9:6.2f} "
                     f"{entry.total / 1e9:8.2f}   {share:.0%} of the usable {placement.MEMORY_SHARE:.0%}")
    fits = all(entry.total <= placement.MEMORY_SHARE * sizes.get(name, 0) for name, entry in table.items())
    lines.append("fits: yes" if fits else "fits: NO (see the device over 100%)")
    basis = time_basis(shapes, dtype, options, device_name if not options.gpus else "")
    if basis.kind == "none":
        return [*lines, f"time: not estimated ({basis.text})"]
    result = estimate(setup, cells, shapes, load, basis, options.acceptance, "cuda" if gpu else "cpu")
    calibration = calibration_seconds(basis, shapes, load, k)
    lines.append(f"time basis: {basis.text}")
    lines += [f"  {note}" for note in result.lines]
    for label, seconds in result.per_cell.items():
        lines.append(f"  {label}: {seconds:.1f} s")
    if result.wall_s is not None:
        total = result.wall_s + calibration
        lines.append(f"estimated wall time: {total:.1f} s ({total / 60:.1f} min): decoding {result.wall_s:.1f} s "
                     f"({setup.warmup} warm-up + {setup.repeats} timed rounds x {load.prompts} prompts x "
                     f"{len(cells)} cells), calibration {calibration:.1f} s; model loading not included")
    compiled = sum(1 for cell in cells if cell.backend == "compiled")
    if compiled:
        lines.append(f"estimated compile time: {result.compile_s:.0f} s (graphs, one per unit and pass shape, x "
                     f"{COMPILE_SECONDS_PER_GRAPH['cuda' if gpu else 'cpu']:.0f} s each; outside cells' times)")
    return lines


def time_basis(shapes: dict[str, costs.ModelShape], dtype: str, options: Options, device_name: str) -> TimeBasis:
    """Calibrations stored here for every model, else the given or measured roofline, else none."""
    if device_name:
        found = {role: stored_calibration(shape, device_name, dtype, options.roots) for role, shape in shapes.items()}
        if all(found.values()):
            where = sorted({entry[1] for entry in found.values()})
            overhead = pass_overhead(found["target"][1], found["target"][0])
            return TimeBasis("calibration", f"layer and head times calibrated on this machine ({device_name}, "
                             f"{dtype}) by {', '.join(where)}, plus {overhead * 1e3:.2f} ms per pass that run's "
                             f"generations took beyond them", {role: entry[0] for role, entry in found.items()},
                             overhead=overhead)
    if options.peak_bandwidth and options.peak_flops:
        return TimeBasis("roofline", f"roofline of --peak-bandwidth {options.peak_bandwidth:.3g} B/s and "
                         f"--peak-flops {options.peak_flops:.3g} FLOP/s (per device; layers run one device at a "
                         f"time)", bandwidth=options.peak_bandwidth, flops=options.peak_flops)
    if options.roofline and not options.gpus:
        peaks = options.roofline()
        return TimeBasis("roofline", f"roofline measured here now ({peaks['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
                         f"{peaks['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s); no stored calibration of this shape",
                         bandwidth=peaks["bandwidth_bytes_per_s"], flops=peaks["matmul_flops_per_s"])
    return TimeBasis("none", "no calibration of this shape here; give --peak-bandwidth and --peak-flops of the "
                     "target device, e.g. 2.0e12 and 3.1e14 for an A100 80GB")


def pass_overhead(root: str, calibration: dict) -> float:
    """Seconds per pass that a calibrated run's timed generations took beyond the time model's layers and
    heads: what one pass costs in the loop itself on this machine (0 when the run has no rows)."""
    rows = RunStore(root).read_cells()
    if rows.empty or "pass_phase" not in rows:
        return 0.0
    table = costs.pass_table(rows)
    table = table[table["model"] == "target"]
    table = table[table["batch"] == 1]  # batch 1 (the estimate's passes); a batched pass is in every row's trace
    rows = rows.iloc[sorted(set(table["row"]))]
    predicted = calibrate.pass_seconds(calibration, table["start"], table["end"], table["positions"],
                                       table["head_positions"], clamp=True).sum()
    return max(float(rows["time_s"].sum() - predicted) / max(len(table), 1), 0.0)
