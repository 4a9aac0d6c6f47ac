"""`skipbench datasets`, `skipbench roofline` and `skipbench benchmark`: what this machine offers, its peaks,
and the engine benchmark on it."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from skipbench import spec
from skipbench.cli.core import app, handled, out
from skipbench.cli.display import RichProgress
from skipbench.cli.options import (
    DATA_DIR_HELP,
    AcceptanceOpt,
    DeviceMapOpt,
    DryRunOpt,
    GpuMemoryOpt,
    GpusOpt,
    PeakBandwidthOpt,
    PeakFlopsOpt,
    RepeatsOpt,
    ThreadsOpt,
)


@app.command()
def datasets(data_dir: str = typer.Option(None, "--data-dir", envvar="SKIPBENCH_DATA_DIR",
                                          help=f"{DATA_DIR_HELP}: where to look.")) -> None:
    """List the tasks, where each comes from, and whether it is available right now."""
    from skipbench.tasks import available_tasks

    table = Table(title="skipbench datasets")
    for name in ("task", "source", "available", "where / how"):  # a path folds over lines, never cut short
        table.add_column(name, overflow="fold", ratio=3 if name == "where / how" else None)
    for task in available_tasks(data_dir):
        table.add_row(escape(task["name"]), escape(task["source"]), "yes" if task["available"] else "no",
                      escape(task["where"] if task["available"] else task["how"]))
    out.print(table)


@app.command()
def roofline(device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
             dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16, float16."),
             threads: int = ThreadsOpt) -> None:
    """Measure this device's copy bandwidth and matmul rate: the peaks that reports compare against."""
    import torch

    from skipbench.machine import default_threads
    from skipbench.measure import measure_roofline
    from skipbench.models import resolve_device, resolve_dtype

    with handled():
        torch_device = resolve_device(device)
        if torch_device.type == "cpu":
            torch.set_num_threads(threads or default_threads())
        peaks = measure_roofline(torch_device, resolve_dtype(dtype, torch_device))
    threads_note = f", {torch.get_num_threads()} thread(s)" if torch_device.type == "cpu" else ""
    out.print(f"device {torch_device}{threads_note}: copy bandwidth {peaks['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
              f"{peaks['dtype']} matmul {peaks['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s")
    out.print(f"use: skipbench report RUN --peak-bandwidth {peaks['bandwidth_bytes_per_s']:.3g} "
              f"--peak-flops {peaks['matmul_flops_per_s']:.3g}")


@app.command()
def benchmark(
    model: str = typer.Option("synthetic:llama3-8b?agree=8", "--model", "-m", help="The target model (same forms "
                              "as run --model)."),
    draft_model: str = typer.Option("synthetic:llama3-8b?agree=8&layers=8", "--draft-model",
                                    help="Two-model draft ('' for none)."),
    exits: str = typer.Option("4,8,16", "--exits", help="Exit layers of the self-speculative cells: 4,8,16 or "
                              "2..16:2."),
    speculations: str = typer.Option("2,4,8", "--speculations", help="Draft lengths K, same syntax."),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", help="Tokens of each (random) prompt."),
    new_tokens: int = typer.Option(128, "--new-tokens", help="Tokens to generate per prompt."),
    prompts: int = typer.Option(3, "--prompts", help="Prompts (each timed in every round)."),
    repeats: int = RepeatsOpt, hf: bool = typer.Option(True, "--hf/--no-hf", help="Also transformers' generate."),
    compiled: bool = typer.Option(True, "--compiled/--no-compiled", help="Also the compiled engine."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, float32 on CPU), float32, bfloat16, "
                              "float16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    threads: int = ThreadsOpt, out_dir: Path = typer.Option(None, "--out", "-o", help="Run directory (default: "
                                                            "runs/benchmark-<date>-<time>)."),
    batch_sizes: str = typer.Option("1", "--batch-sizes", help="Prompts decoded together, e.g. 1,8,32 (use "
                                    "--prompts of at least the largest)."),
    device_map: str = DeviceMapOpt, dry_run: bool = DryRunOpt, gpus: int = GpusOpt, gpu_memory: str = GpuMemoryOpt,
    peak_bandwidth: float = PeakBandwidthOpt, peak_flops: float = PeakFlopsOpt, acceptance: float = AcceptanceOpt,
) -> None:
    """The engine benchmark: native and transformers paths on one model vs the measured roofline.

    The default is the set-up of the reference figures in the README (Llama-3-8B shape, layers >= 8
    zeroed, bf16 on a GPU); on a CPU pick a model that fits, e.g. --model "synthetic:smollm2-135m?agree=8"."""
    from skipbench.benchmark import benchmark_cells, benchmark_setup, run_benchmark
    from skipbench.cli.runs import print_dry_run

    with handled():
        if dry_run:  # the benchmark's cells, placement, memory per device and time estimate, without weights
            setup = benchmark_setup(model, prompt_tokens=prompt_tokens, new_tokens=new_tokens, prompts=prompts,
                                    repeats=repeats or 3, dtype=dtype, device=device, threads=threads,
                                    device_map=device_map)
            cells = benchmark_cells(spec.parse_range(exits), spec.parse_range(speculations), draft_model or None, hf,
                                    compiled, tuple(spec.parse_range(batch_sizes)))
            print_dry_run(setup, cells, gpus, gpu_memory, peak_bandwidth, peak_flops, acceptance)
            return
        target = out_dir or Path("runs") / f"benchmark-{time.strftime('%Y%m%d-%H%M%S')}"
        with RichProgress() as progress:
            summary = run_benchmark(model, draft_model or None, spec.parse_range(exits),
                                    spec.parse_range(speculations), target, prompt_tokens=prompt_tokens,
                                    new_tokens=new_tokens, prompts=prompts, repeats=repeats or 3, dtype=dtype,
                                    device=device, threads=threads, hf=hf, compiled=compiled, progress=progress,
                                    batch_sizes=tuple(spec.parse_range(batch_sizes)), device_map=device_map)
        print_benchmark(summary, target)


def print_benchmark(summary: dict, run_dir: Path) -> None:
    """The benchmark's cells in a table that fits the terminal; the wide one (roofline, time model) is in
    RUN/benchmark.md."""
    from skipbench.benchmark import compile_text
    from skipbench.tables import number, with_interval

    drafts: list[str] = []
    title = f"{summary['model']} on {summary['device']}: roofline {summary['roofline_tokens_per_s']:.1f} tokens/s"
    table = Table(title=escape(title), title_justify="left", pad_edge=False)
    for name in ("decoding", "tok/s", "vs native AR", "vs own AR"):
        table.add_column(name, justify="left" if name == "decoding" else "right", overflow="fold",
                         no_wrap=name != "decoding")
    for row in summary["rows"]:
        label = row["decoding"]
        for word in label.split():
            if word.startswith("draft="):
                drafts += [word] if word not in drafts else []
                label = label.replace(word, f"d{drafts.index(word) + 1}")
        table.add_row(escape(label), number(row["tokens_per_s"], "{:.1f}"),
                      with_interval(row["speedup_vs_native_ar"], row["speedup_vs_native_ar_low"],
                                    row["speedup_vs_native_ar_high"]),
                      with_interval(row["speedup"], row["speedup_low"], row["speedup_high"]))
    out.print(table)
    for index, word in enumerate(drafts):
        out.print(escape(f"d{index + 1}: draft model {word.removeprefix('draft=')}"))
    compiled = compile_text(summary)
    if compiled:
        out.print(escape(f"compile time, outside every cell's time: {compiled}"))
    out.print(escape(f"every column (intervals, roofline fraction, the time model's prediction): "
                     f"{run_dir / 'benchmark.md'}"))
