"""The engine benchmark: every decoding path on one model, as fractions of the device's roofline.

A benchmark, not a test: on a GPU it shows what each method can really do, and how far transformers'
own paths are from skipbench's engine. It is one sweep (so its records are a normal run directory)
plus the measured roofline, and one table.
"""

from __future__ import annotations

import json
import random
import statistics
import string
from pathlib import Path

from skipbench.measure import measure_roofline
from skipbench.models import resolve_device, resolve_dtype
from skipbench.spec import Cell, Setup
from skipbench.store import RunStore, write_atomic
from skipbench.sweep import Progress, execute


def filler_prompt(tokens: int, seed: int = 0) -> str:
    """Random words, several characters per token, cut to `tokens` by --max-prompt-tokens."""
    rng = random.Random(seed)
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(tokens * 2))


def benchmark_cells(exits: list[int], speculations: list[int], draft: str | None, hf: bool) -> list[Cell]:
    cells = [Cell("autoregressive")]
    cells += [Cell("self_speculative", e, k) for e in exits for k in speculations]
    if draft:
        cells.append(Cell("speculative", None, 4, draft))
    if hf:
        cells += [Cell("autoregressive", backend="hf"), Cell("autoregressive", backend="hf_static")]
        cells += [Cell("self_speculative", e, 4, backend="hf") for e in exits]
        if draft:
            cells.append(Cell("speculative", None, 4, draft, backend="hf"))
    return cells


def run_benchmark(model: str, draft: str | None, exits: list[int], speculations: list[int], out_dir: Path, *,
                  prompt_tokens: int = 512, new_tokens: int = 128, repeats: int = 3, dtype: str = "auto",
                  device: str = "auto", hf: bool = True, progress: Progress | None = None) -> list[dict]:
    torch_device = resolve_device(device)
    peaks = measure_roofline(torch_device, resolve_dtype(dtype, torch_device))
    setup = Setup(model=model, prompts=(filler_prompt(prompt_tokens),) * repeats, max_prompt_tokens=prompt_tokens,
                  max_new_tokens=new_tokens, dtype=dtype, device=device, warmup=2)
    cells = benchmark_cells(exits, speculations, draft, hf)
    store = execute(setup, cells, out_dir, progress=progress)
    manifest = store.read_manifest()
    target = manifest["models"]["target"]
    bytes_per_param = 2 if manifest["provenance"]["dtype"] in ("bfloat16", "float16") else 4
    weight_bytes = target["num_params"] * bytes_per_param
    roofline_tokens_per_s = peaks["bandwidth_bytes_per_s"] / weight_bytes
    frame = store.read_cells()
    rows = []
    for cell in cells:
        group = frame[frame["cell_label"] == cell.label()]
        if group.empty:
            continue
        # Median over repeats of per-generation tokens/s: one slow outlier does not move it.
        tokens_per_s = statistics.median(group["new_tokens"] / group["time_s"])
        rows.append({"decoding": cell.label(), "tokens_per_s": tokens_per_s,
                     "roofline_fraction": tokens_per_s / roofline_tokens_per_s,
                     "tokens_per_verify_step": group["new_tokens"].sum() / group["verify_steps"].sum()})
    native_ar = next(r["tokens_per_s"] for r in rows if r["decoding"] == Cell("autoregressive").label())
    for row in rows:
        row["speedup_vs_native_ar"] = row["tokens_per_s"] / native_ar
    summary = {"model": model, "device": manifest["provenance"]["device"], "dtype": manifest["provenance"]["dtype"],
               "torch": manifest["provenance"]["torch_version"],
               "transformers": manifest["provenance"]["transformers_version"], "weight_bytes": weight_bytes,
               "roofline_tokens_per_s": roofline_tokens_per_s, **peaks, "prompt_tokens": prompt_tokens,
               "new_tokens": new_tokens, "repeats": repeats, "rows": rows}
    write_atomic(RunStore(out_dir).root / "benchmark.json", json.dumps(summary, indent=2).encode())
    write_atomic(RunStore(out_dir).root / "benchmark.md", benchmark_markdown(summary).encode())
    return rows


def benchmark_markdown(summary: dict) -> str:
    lines = [f"Model {summary['model']} ({summary['dtype']}, {summary['weight_bytes'] / 1e9:.2f} GB of weights) on "
             f"{summary['device']}; torch {summary['torch']}, transformers {summary['transformers']}.",
             f"Copy bandwidth {summary['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s -> autoregressive roofline "
             f"{summary['roofline_tokens_per_s']:.1f} tokens/s. Prompt {summary['prompt_tokens']} tokens, "
             f"{summary['new_tokens']} new tokens, median of {summary['repeats']} after warm-up.", "",
             "| decoding | tokens/s | fraction of roofline | speedup vs native AR | tokens per verify step |",
             "|---|---|---|---|---|"]
    for row in summary["rows"]:
        lines.append(f"| {row['decoding']} | {row['tokens_per_s']:.1f} | {row['roofline_fraction']:.0%} | "
                     f"{row['speedup_vs_native_ar']:.2f}x | {row['tokens_per_verify_step']:.2f} |")
    return "\n".join(lines) + "\n"
