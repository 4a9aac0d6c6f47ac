"""The engine benchmark: every decoding path on one model, as fractions of the device's roofline.

A benchmark, not a test: on a GPU it shows what each method can really do, and how far transformers'
own paths are from skipbench's engine. It is one sweep (its records are a normal run directory, measured
in interleaved rounds), the measured roofline, and one table whose speedups are the summary's: time per
token ratios of sums over prompts and rounds, each paired with the native autoregressive baseline.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from skipbench import intervals
from skipbench.costs import dtype_bytes
from skipbench.measure import Progress, measure_roofline
from skipbench.models import resolve_device, resolve_dtype
from skipbench.pairing import rounds_of, units
from skipbench.spec import Cell, Setup
from skipbench.store import RunStore, write_atomic
from skipbench.summary import load_summary
from skipbench.sweep import execute
from skipbench.tables import number, to_markdown, with_interval


def filler_prompt(tokens: int, seed: int = 0) -> str:
    """Random words, several characters per token, cut to `tokens` by --max-prompt-tokens."""
    rng = random.Random(seed)
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(tokens * 2))


def benchmark_cells(exits: list[int], speculations: list[int], draft: str | None, hf: bool,
                    compiled: bool = True, batch_sizes: Sequence[int] = (1,)) -> list[Cell]:
    """skipbench's engine eager and compiled, and transformers' paths (eager, static cache compiled,
    assistant_early_exit, assistant_model), all in one group: every ratio is paired by round; each at every
    batch size."""
    cells = []
    for backend in ("native", "compiled") if compiled else ("native",):
        cells.append(Cell("autoregressive", backend=backend))
        cells += [Cell("self_speculative", e, k, backend=backend) for e in exits for k in speculations]
        if draft:
            cells.append(Cell("speculative", None, 4, draft, backend=backend))
    if hf:
        cells += [Cell("autoregressive", backend="hf"), Cell("autoregressive", backend="hf_static")]
        cells += [Cell("self_speculative", e, 4, backend="hf") for e in exits]
        if draft:
            cells.append(Cell("speculative", None, 4, draft, backend="hf"))
    return [replace(cell, batch_size=size) for size in batch_sizes for cell in cells]


def benchmark_setup(model: str, *, prompt_tokens: int = 512, new_tokens: int = 128, prompts: int = 3,
                    repeats: int = 3, dtype: str = "auto", device: str = "auto", threads: int | None = None,
                    device_map: str | None = None) -> Setup:
    """The benchmark's setup: `prompts` random prompts of `prompt_tokens` tokens (what `--dry-run` shows too)."""
    return Setup(model=model, prompts=tuple(filler_prompt(prompt_tokens, seed) for seed in range(prompts)),
                 max_prompt_tokens=prompt_tokens, max_new_tokens=new_tokens, dtype=dtype, device=device,
                 warmup=2, repeats=repeats, threads=threads, device_map=device_map)


def run_benchmark(model: str, draft: str | None, exits: list[int], speculations: list[int], out_dir: Path, *,
                  prompt_tokens: int = 512, new_tokens: int = 128, prompts: int = 3, repeats: int = 3,
                  dtype: str = "auto", device: str = "auto", threads: int | None = None, hf: bool = True,
                  compiled: bool = True, progress: Progress | None = None, batch_sizes: tuple[int, ...] = (1,),
                  device_map: str | None = None) -> dict:
    """Measure the roofline and every path; write RUN/benchmark.{json,md}; return the summary dict."""
    torch_device = resolve_device(device)
    setup = benchmark_setup(model, prompt_tokens=prompt_tokens, new_tokens=new_tokens, prompts=prompts,
                            repeats=repeats, dtype=dtype, device=device, threads=threads, device_map=device_map)
    cells = benchmark_cells(exits, speculations, draft, hf, compiled, batch_sizes)
    store = execute(setup, cells, out_dir, progress=progress)
    peaks = measure_roofline(torch_device, resolve_dtype(dtype, torch_device))
    summary_frame, manifest = load_summary(out_dir)
    frame = store.read_cells()
    target = manifest["models"]["target"]
    weight_bytes = target["num_params"] * dtype_bytes(manifest["provenance"]["dtype"])
    roofline_tokens_per_s = peaks["bandwidth_bytes_per_s"] / weight_bytes
    native_key = summary_frame.loc[summary_frame["cell_label"] == Cell("autoregressive").label(), "cell_key"].iloc[0]
    native_ar = frame[frame["cell_key"] == native_key]
    prompts_index = sorted(int(i) for i in frame["prompt_index"].unique())
    rows = []
    for row in summary_frame.to_dict("records"):
        cell_rows = frame[frame["cell_key"] == row["cell_key"]]
        rounds = rounds_of(cell_rows, native_ar)
        versus = intervals.speedup(units(cell_rows, "time_s", "new_tokens", prompts_index, rounds),
                                   units(native_ar, "time_s", "new_tokens", prompts_index, rounds))
        rows.append({"decoding": row["cell_label"], "tokens_per_s": row["tokens_per_s"],
                     "tokens_per_s_low": row["tokens_per_s_low"], "tokens_per_s_high": row["tokens_per_s_high"],
                     "roofline_fraction": row["tokens_per_s"] / roofline_tokens_per_s,
                     "speedup_vs_native_ar": versus[0], "speedup_vs_native_ar_low": versus[1],
                     "speedup_vs_native_ar_high": versus[2], "speedup": row["speedup"],
                     "speedup_low": row["speedup_low"], "speedup_high": row["speedup_high"],
                     "predicted_speedup": row.get("predicted_speedup_time", float("nan")),
                     "tokens_per_verify_step": row["tokens_per_step"]})
    provenance = manifest["provenance"]
    summary = {"model": model, "device": provenance["device"], "dtype": provenance["dtype"],
               "compile_seconds": provenance.get("compile_seconds", {}),
               "compiled_graphs": provenance.get("compiled_graphs", {}),
               "threads": provenance["cpu_threads"], "torch": provenance["torch_version"],
               "transformers": provenance["transformers_version"], "weight_bytes": weight_bytes,
               "roofline_tokens_per_s": roofline_tokens_per_s, **peaks, "prompt_tokens": prompt_tokens,
               "new_tokens": new_tokens, "prompts": prompts, "repeats": repeats, "rows": rows}
    write_atomic(RunStore(out_dir).root / "benchmark.json", json.dumps(summary, indent=2).encode())
    write_atomic(RunStore(out_dir).root / "benchmark.md", benchmark_markdown(summary).encode())
    return summary


def benchmark_markdown(summary: dict) -> str:
    import pandas as pd

    header = (f"Model {summary['model']} ({summary['dtype']}, {summary['weight_bytes'] / 1e9:.2f} GB of weights) on "
              f"{summary['device']}, {summary['threads']} thread(s); torch {summary['torch']}, transformers "
              f"{summary['transformers']}.\nCopy bandwidth {summary['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s -> "
              f"autoregressive roofline {summary['roofline_tokens_per_s']:.1f} tokens/s. {summary['prompts']} "
              f"prompts of {summary['prompt_tokens']} tokens, {summary['new_tokens']} new tokens, "
              f"{summary['repeats']} interleaved rounds after warm-up; 95% intervals. \"own AR\": the "
              f"autoregressive cell of the same backend (native, compiled, hf).\n\n")
    table = pd.DataFrame([{
        "decoding": row["decoding"],
        "tokens/s": with_interval(row["tokens_per_s"], row["tokens_per_s_low"], row["tokens_per_s_high"], "{:.1f}"),
        "fraction of roofline": number(row["roofline_fraction"], "{:.0%}"),
        "speedup vs native AR": with_interval(row["speedup_vs_native_ar"], row["speedup_vs_native_ar_low"],
                                              row["speedup_vs_native_ar_high"]),
        "speedup vs own AR": with_interval(row["speedup"], row["speedup_low"], row["speedup_high"]),
        "predicted (time model)": number(row["predicted_speedup"], "{:.2f}x"),
        "measured / predicted": number(row["speedup"] / row["predicted_speedup"], "{:.0%}"),
        "tokens per verify step": number(row["tokens_per_verify_step"], "{:.2f}"),
    } for row in summary["rows"]])
    compiled = compile_text(summary)
    footer = f"\nCompile time, outside every cell's time: {compiled}.\n" if compiled else ""
    return header + to_markdown(table) + footer


def compile_text(summary: dict) -> str:
    """Per model, the seconds torch.compile took and the graphs it made ("" when nothing was compiled)."""
    graphs = summary.get("compiled_graphs", {})
    return "; ".join(f"{name} {seconds:.1f} s" + (f" ({graphs[name]} graphs)" if name in graphs else "")
                     for name, seconds in summary.get("compile_seconds", {}).items())
