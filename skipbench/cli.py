"""The `skipbench` command line: parse options into specs, call the library, print with rich."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichBar
from rich.table import Table

from skipbench import spec

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Benchmark autoregressive, two-model speculative and LayerSkip self-speculative decoding.")
console = Console(stderr=True)
out = Console()


@app.callback()
def _commands() -> None:
    """Benchmark autoregressive, two-model speculative and LayerSkip self-speculative decoding."""


def fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's to fix: shown as one line, never a traceback."""
    from skipbench.compare import CompareError
    from skipbench.decoding.layers import EngineError
    from skipbench.models import ModelError
    from skipbench.sweep import RunError
    from skipbench.tasks import TaskError

    return (spec.SpecError, ModelError, EngineError, TaskError, RunError, CompareError, FileNotFoundError)


class RichProgress:
    """Bars over cells and over the prompts of the current cell, with running tokens/s and acceptance."""

    def __init__(self):
        self.bar = RichBar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=console)
        self.cells_task = self.prompts_task = None
        self.tokens = self.seconds = self.drafted = self.accepted = 0

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def plan(self, cells: int, prompts: int) -> None:
        self.cells_task = self.bar.add_task("cells", total=cells, stats="")

    def cell_started(self, cell, prompts: int) -> None:
        self.tokens = self.seconds = self.drafted = self.accepted = 0
        if self.prompts_task is not None:
            self.bar.remove_task(self.prompts_task)
        self.prompts_task = self.bar.add_task(f"  {cell.label()}", total=prompts, stats="")

    def prompt_done(self, row: dict) -> None:
        self.tokens += row["new_tokens"]
        self.seconds += row["time_s"]
        self.drafted += row["drafted"]
        self.accepted += row["accepted"]
        stats = f"{self.tokens / self.seconds:.1f} tok/s" if self.seconds else ""
        if self.drafted:
            stats += f"  accept {self.accepted / self.drafted:.2f}"
        self.bar.update(self.prompts_task, advance=1, stats=stats)

    def cell_done(self, cell, status: str) -> None:
        if status != "done":
            self.bar.console.print(f"  {cell.label()}: {status}", highlight=False)
        self.bar.update(self.cells_task, advance=1)

    def note(self, text: str) -> None:
        self.bar.console.print(text, highlight=False)


def print_summary(store) -> None:
    """The run's cells in the order they were asked for, with the cost model's FLOPs per token."""
    from skipbench.report import load_summary

    summary, _ = load_summary(store.root)
    table = Table(title=f"skipbench: {store.root}")
    for name in ("cell", "tok/s", "ms/tok", "accept", "tok/step", "speedup", "lossless", "GFLOP/tok"):
        table.add_column(name, justify="left" if name == "cell" else "right")
    for row in summary.itertuples():
        table.add_row(row.cell_label, f"{row.tokens_per_s:.1f}", f"{row.time_per_token_s * 1e3:.2f}",
                      _fmt(row.acceptance_rate), f"{row.tokens_per_step:.2f}", _fmt(row.speedup, "{:.2f}x"),
                      _fmt(row.lossless, "{:.0%}"), _fmt(row.flops_per_token / 1e9, "{:.3g}"))
    out.print(table)
    for error in store.errors():
        out.print(f"[red]failed[/] {error['cell_label']}: {error['error']}", highlight=False)


def _fmt(value, pattern: str = "{:.3f}") -> str:
    return "-" if value is None or value != value else pattern.format(value)


def setup_from_options(**options) -> spec.Setup:
    options["prompts"] = tuple(options.pop("prompt") or ())
    options["stop_sequences"] = tuple(options.pop("stop")) if options.get("stop") else None
    options.pop("stop", None)
    return spec.Setup(**options)


def default_out(model: str, what: str) -> Path:
    slug = "".join(c if c.isalnum() or c in "-." else "-" for c in model.split("/")[-1])[:40]
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{what}"


# Options shared by run and sweep, declared once.
ModelOpt = typer.Option("smollm2-135m", "--model", "-m",
                        help="Hub id, local dir, synthetic:<preset>[?agree=E&layers=N&seed=S], or smollm2-135m.")
PromptOpt = typer.Option(None, "--prompt", "-p", help="A prompt text (repeatable).")
DatasetOpt = typer.Option(None, "--dataset", "-d", help="cnn_dm, humaneval, topv2 or jsonl:PATH.")
NumSamplesOpt = typer.Option(None, "--num-samples", "-n", help="Prompts to take (seeded choice).")
SeedOpt = typer.Option(0, "--seed", help="Seed for prompt choice and sampling.")
NShotOpt = typer.Option(0, "--n-shot", help="Solved examples prepended (cnn_dm).")
TemplateOpt = typer.Option(None, "--template", help='Wrap every prompt, e.g. "[INST] {prompt} [/INST]".')
MaxPromptOpt = typer.Option(None, "--max-prompt-tokens", help="Longest prompt in tokens.")
PolicyOpt = typer.Option("left", "--prompt-policy", help="Longer prompts: 'left' cuts from the left, 'refuse' fails.")
DataDirOpt = typer.Option(None, "--data-dir", envvar="SKIPBENCH_DATA_DIR", help="Local copies of the datasets.")
MaxNewOpt = typer.Option(None, "--max-new-tokens", help="Tokens to generate (default: the task's; 128 for --prompt).")
StopOpt = typer.Option(None, "--stop", help="A stop sequence (repeatable; default: the task's).")
SampleOpt = typer.Option(False, "--sample/--greedy", help="Sample instead of greedy decoding.")
TemperatureOpt = typer.Option(1.0, "--temperature")
TopPOpt = typer.Option(1.0, "--top-p")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, float32 on CPU), float32, bfloat16, float16.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu or cuda.")
WarmupOpt = typer.Option(1, "--warmup", help="Uncounted generations before each cell.")
ThreadsOpt = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's; use 1 on a busy machine).")
ExecuteOpt = typer.Option(False, "--execute-code",
                          help="Run HumanEval completions against their tests (pass@1), in a subprocess.")
BackendOpt = typer.Option("native", "--backend", help="native (skipbench's engine) or hf (transformers generate).")
ForceOpt = typer.Option(False, "--force", help="Redo cells already in the run directory.")


@app.command()
def run(
    strategy: str = typer.Option("self_speculative", "--strategy", "-s",
                                 help="autoregressive, speculative or self_speculative."),
    exit_layer: int = typer.Option(None, "--exit-layer", "-e", help="Layers 0..E-1 draft (self_speculative)."),
    num_speculations: int = typer.Option(None, "--num-speculations", "-k", help="Draft tokens per step (default 4)."),
    draft_model: str = typer.Option(None, "--draft-model", help="Draft model (speculative)."),
    backend: str = BackendOpt,
    no_baseline: bool = typer.Option(False, "--no-baseline", help="Skip the autoregressive baseline."),
    out_dir: Path = typer.Option(None, "--out", "-o", help="Run directory (default runs/<time>-<model>-run)."),
    force: bool = ForceOpt,
    model: str = ModelOpt, prompt: list[str] = PromptOpt, dataset: str = DatasetOpt,
    num_samples: int = NumSamplesOpt, seed: int = SeedOpt, n_shot: int = NShotOpt, template: str = TemplateOpt,
    max_prompt_tokens: int = MaxPromptOpt, prompt_policy: str = PolicyOpt, data_dir: str = DataDirOpt,
    max_new_tokens: int = MaxNewOpt, stop: list[str] = StopOpt, sample: bool = SampleOpt,
    temperature: float = TemperatureOpt, top_p: float = TopPOpt, dtype: str = DtypeOpt, device: str = DeviceOpt,
    warmup: int = WarmupOpt, threads: int = ThreadsOpt, execute_code: bool = ExecuteOpt,
) -> None:
    """Decode a prompt set with one strategy (and the autoregressive baseline) and store the records."""
    with handled():
        setup = setup_from_options(
            model=model, prompt=prompt, dataset=dataset, num_samples=num_samples, seed=seed, n_shot=n_shot,
            template=template, max_prompt_tokens=max_prompt_tokens, prompt_policy=prompt_policy,
            data_dir=data_dir, max_new_tokens=max_new_tokens, stop=stop, sample=sample,
            temperature=temperature, top_p=top_p, dtype=dtype, device=device, warmup=warmup,
            threads=threads, execute_code=execute_code)
        if strategy != "autoregressive" and num_speculations is None:
            num_speculations = 4
        cell = spec.Cell(strategy, exit_layer, num_speculations, draft_model, backend)
        # Speedup and losslessness need the baseline on the same prompts: greedy speculative runs add it.
        cells = [cell]
        if strategy != "autoregressive" and not no_baseline and not sample:
            cells = spec.with_baseline(cells)
        run_sweep(setup, cells, out_dir or default_out(model, "run"), force, report=False)


# `skipbench sweep` with no arguments: a real sweep on the offline default model, a few minutes on 2 CPU cores.
DEFAULT_SWEEP_SETUP = dict(model="smollm2-135m", dataset="humaneval", num_samples=4, max_new_tokens=48)
DEFAULT_SWEEP_GRID = dict(exits="4,8,12,16,20,24", speculations="2,4")


@app.command()
def sweep(
    sweep_file: str = typer.Argument(None, help="A sweep file (sweeps/*.toml); options given here override it."),
    exits: str = typer.Option(None, "--exits", help="Exit layers: 2..16, 2..16:2, 1,2,4 or 1,2,8..12."),
    speculations: str = typer.Option(None, "--speculations", help="Draft lengths K, same syntax (default 2,4,6)."),
    strategies: str = typer.Option(None, "--strategies", help="Comma list: self_speculative, speculative."),
    draft_model: list[str] = typer.Option(None, "--draft-model", help="A draft model: two-model rows (repeatable)."),
    backends: str = typer.Option(None, "--backends", help="Comma list of native, hf (default native)."),
    out_dir: Path = typer.Option(None, "--out", "-o", help="Run directory; rerunning it resumes."),
    force: bool = ForceOpt,
    report: bool = typer.Option(True, "--report/--no-report", help="Write tables and plots when done."),
    model: str = typer.Option(None, "--model", "-m", help="As for run (default smollm2-135m)."),
    prompt: list[str] = PromptOpt,
    dataset: list[str] = typer.Option(None, "--dataset", "-d", help="A task (repeatable: one run per task, "
                                      "plus a per-task speedup table)."),
    num_samples: int = NumSamplesOpt, seed: int = typer.Option(None, "--seed"),
    n_shot: int = typer.Option(None, "--n-shot"),
    template: str = TemplateOpt, max_prompt_tokens: int = MaxPromptOpt,
    prompt_policy: str = typer.Option(None, "--prompt-policy"), data_dir: str = DataDirOpt,
    max_new_tokens: int = MaxNewOpt, stop: list[str] = StopOpt,
    sample: bool = typer.Option(None, "--sample/--greedy"), temperature: float = typer.Option(None, "--temperature"),
    top_p: float = typer.Option(None, "--top-p"), dtype: str = typer.Option(None, "--dtype"),
    device: str = typer.Option(None, "--device"), warmup: int = typer.Option(None, "--warmup"),
    threads: int = ThreadsOpt, execute_code: bool = typer.Option(None, "--execute-code/--no-execute-code"),
) -> None:
    """Sweep exit layers, draft lengths and draft models; the autoregressive baseline is always included."""
    with handled():
        if sweep_file:
            loaded = spec.load_sweep_file(sweep_file)
        else:
            loaded = spec.SweepFile(dict(DEFAULT_SWEEP_SETUP), dict(DEFAULT_SWEEP_GRID), None, [])
        given = dict(model=model, num_samples=num_samples, seed=seed, n_shot=n_shot,
                     template=template, max_prompt_tokens=max_prompt_tokens, prompt_policy=prompt_policy,
                     data_dir=data_dir, max_new_tokens=max_new_tokens, sample=sample, temperature=temperature,
                     top_p=top_p, dtype=dtype, device=device, warmup=warmup, threads=threads,
                     execute_code=execute_code,
                     prompts=tuple(prompt) if prompt else None, stop_sequences=tuple(stop) if stop else None)
        # A file's `dataset` may list several tasks; --dataset (repeatable) or --prompt replaces it.
        file_tasks = loaded.setup.pop("dataset", None)
        tasks = list(dataset) if dataset else [] if prompt else (
            file_tasks if isinstance(file_tasks, list) else [file_tasks] if file_tasks else [])
        setup = spec.override(spec.Setup(**loaded.setup), **given)
        grid_values = dict(loaded.grid)
        for key, value in (("exits", exits), ("speculations", speculations), ("strategies", strategies),
                           ("backends", backends)):
            if value is not None:
                grid_values[key] = value
        if draft_model:
            grid_values["draft_models"] = list(draft_model)
        cells = spec.grid_from(grid_values).expand()
        target = out_dir or (Path(loaded.out) if loaded.out else default_out(setup.model, "sweep"))
        if not loaded.train:
            sweep_tasks(setup, tasks, cells, target, force, report)
            return
        # A recipe comparison: train each model unless its checkpoint exists, sweep it, then overlay them.
        runs = []
        for entry in loaded.train:
            options = {key: value for key, value in entry.items() if key != "label"}
            checkpoint = Path(options["out_dir"])
            if not (checkpoint / "config.json").is_file():
                console.print(f"training {entry['label']} -> {checkpoint}", highlight=False)
                run_train(train_config(**options))
            else:
                console.print(f"reusing {checkpoint} for {entry['label']}", highlight=False)
            runs.append(sweep_tasks(replace(setup, model=str(checkpoint)), tasks, cells, target / entry["label"],
                                    force, report))
        from skipbench.plots import overlay

        for index, task in enumerate(tasks or [None]):
            name = "overlay" if len(tasks) < 2 else f"overlay_{task}"
            files = overlay([stores[index].root for stores in runs], [entry["label"] for entry in loaded.train],
                            target / name)
            out.print(f"overlay: {', '.join(str(f) for f in files)}")


def sweep_tasks(setup: spec.Setup, tasks: list[str], cells: list[spec.Cell], target: Path, force: bool,
                report: bool) -> list:
    """One run per task (in TARGET/<task> when there are several), then the per-task speedup table."""
    if len(tasks) < 2:
        return [run_sweep(replace(setup, dataset=tasks[0] if tasks else setup.dataset), cells, target, force,
                          report)]
    stores = [run_sweep(replace(setup, dataset=task), cells, target / task_dir(task), force, report)
              for task in tasks]
    from skipbench.report import write_task_report

    files = write_task_report(target, {task: store.root for task, store in zip(tasks, stores, strict=True)})
    out.print(f"per-task table: {files[0]}")
    return stores


def task_dir(task: str) -> str:
    """A directory name for a task (jsonl:PATH becomes jsonl-<file stem>)."""
    return f"jsonl-{Path(task[6:]).stem}" if task.startswith("jsonl:") else task


def run_sweep(setup: spec.Setup, cells: list[spec.Cell], target: Path, force: bool, report: bool):
    from skipbench.report import write_report
    from skipbench.sweep import execute

    console.print(f"sweep: {len(cells)} cells on {setup.model} -> {target}", highlight=False)
    with RichProgress() as progress:
        store = execute(setup, cells, target, force=force, progress=progress)
    print_summary(store)
    if report:
        files = write_report(store.root)
        out.print(f"tables and plots: {store.root / 'tables'}, {store.root / 'plots'} ({len(files)} files)")
    out.print(f"records: {store.root}")
    return store


@app.command()
def datasets(data_dir: str = DataDirOpt) -> None:
    """List the tasks, where each comes from, and whether it is available right now."""
    from skipbench.tasks import available_tasks

    table = Table(title="skipbench datasets")
    for name in ("task", "source", "available", "where / how"):
        table.add_column(name)
    for task in available_tasks(data_dir):
        table.add_row(task["name"], task["source"], "yes" if task["available"] else "no",
                      task["where"] if task["available"] else task["how"])
    out.print(table)


@app.command()
def roofline(device: str = DeviceOpt, dtype: str = DtypeOpt) -> None:
    """Measure this device's copy bandwidth and matmul rate: the peaks that reports compare against."""
    from skipbench.measure import measure_roofline
    from skipbench.models import resolve_device, resolve_dtype

    with handled():
        torch_device = resolve_device(device)
        peaks = measure_roofline(torch_device, resolve_dtype(dtype, torch_device))
    out.print(f"device {torch_device}: copy bandwidth {peaks['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
              f"{peaks['dtype']} matmul {peaks['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s")
    out.print(f"use: skipbench report RUN --peak-bandwidth {peaks['bandwidth_bytes_per_s']:.3g} "
              f"--peak-flops {peaks['matmul_flops_per_s']:.3g}")


@app.command()
def benchmark(
    model: str = typer.Option("synthetic:llama3-8b?agree=8", "--model", "-m"),
    draft_model: str = typer.Option("synthetic:llama3-8b?agree=8&layers=8", "--draft-model",
                                    help="Two-model draft ('' for none)."),
    exits: str = typer.Option("4,8,16", "--exits"), speculations: str = typer.Option("2,4,8", "--speculations"),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens"), new_tokens: int = typer.Option(128, "--new-tokens"),
    repeats: int = typer.Option(3, "--repeats"), hf: bool = typer.Option(True, "--hf/--no-hf"),
    dtype: str = DtypeOpt, device: str = DeviceOpt,
    out_dir: Path = typer.Option(None, "--out", "-o"),
) -> None:
    """The engine benchmark (ANCHORS.md's set-up): native and transformers paths vs the measured roofline."""
    from skipbench.benchmark import benchmark_markdown, run_benchmark

    with handled():
        target = out_dir or default_out(model, "benchmark")
        with RichProgress() as progress:
            run_benchmark(model, draft_model or None, spec.parse_range(exits), spec.parse_range(speculations),
                          target, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats,
                          dtype=dtype, device=device, hf=hf, progress=progress)
        import json

        out.print(benchmark_markdown(json.loads((target / "benchmark.json").read_text())))


@app.command()
def train(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Where the checkpoint goes (a transformers directory)."),
    base: str = typer.Option(None, "--base", help="Continual pretraining of a local checkpoint or smollm2-135m."),
    preset: str = typer.Option("recipe-small", "--preset", help="Shape when training from scratch: recipe-small "
                               "(12 layers, hidden 512; GPU) or recipe-cpu (smaller, for a CPU)."),
    corpus: Path = typer.Option(None, "--corpus", help="Directory of text/code files (default: Python's stdlib)."),
    recipe: str = typer.Option("layerskip", "--recipe", help="layerskip (layer dropout + early-exit loss) or none."),
    layer_dropout_max: float = typer.Option(0.2, "--layer-dropout-max"),
    early_exit_scale: float = typer.Option(1.0, "--early-exit-scale"),
    curriculum: str = typer.Option("none", "--curriculum", help="none or gradual."),
    steps: int = typer.Option(None, "--steps"), minutes: float = typer.Option(None, "--minutes"),
    seq_len: int = typer.Option(256, "--seq-len"), batch_size: int = typer.Option(16, "--batch-size"),
    lr: float = typer.Option(None, "--lr"), vocab_size: int = typer.Option(8192, "--vocab-size"),
    seed: int = SeedOpt, device: str = DeviceOpt,
) -> None:
    """Train (or continue training) a Llama-family model with the LayerSkip recipe, or without it."""
    with handled():
        config = train_config(out_dir=out_dir, base=base, preset=preset, corpus=corpus, recipe=recipe,
                              layer_dropout_max=layer_dropout_max, early_exit_scale=early_exit_scale,
                              curriculum=curriculum, steps=steps, minutes=minutes, seq_len=seq_len,
                              batch_size=batch_size, lr=lr, vocab_size=vocab_size, seed=seed, device=device)
        run_train(config)


def train_config(**options):
    from skipbench.train import TrainConfig

    unknown = set(options) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise spec.SpecError(f"unknown training option(s) {', '.join(sorted(unknown))}")
    for key in ("out_dir", "corpus"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    return TrainConfig(**options)


def run_train(config) -> None:
    """Train with a progress bar, then print the agreement table."""
    from skipbench.train import TrainError
    from skipbench.train import train as run_training

    bar = RichBar(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                  TimeElapsedColumn(), console=console)
    with handled(TrainError), bar:
        task = bar.add_task("train", total=config.steps, stats="")

        def progress(step: int, total: int | None, loss: float, tokens_per_s: float) -> None:
            bar.update(task, completed=step, total=total, stats=f"loss {loss:.3f}  {tokens_per_s:,.0f} tok/s")

        result = run_training(config, progress=progress)
    table = Table(title=f"{config.recipe} recipe: held-out loss {result.held_out_loss:.3f} after {result.steps} "
                        f"steps ({result.seconds:.0f} s)")
    table.add_column("after layer", justify="right")
    table.add_column("top-1 agreement with the final layer", justify="right")
    table.add_column("held-out loss", justify="right")
    for layer, agreement in result.agreement_by_layer.items():
        table.add_row(str(layer), f"{agreement:.3f}", f"{result.loss_by_layer[layer]:.3f}")
    out.print(table)
    out.print(f"checkpoint: {result.out_dir} (use --model {result.out_dir})")


def parse_fraction(text: str) -> float:
    """`5%` or `0.05` -> 0.05."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise spec.SpecError(f"cannot read {text!r} as a fraction; use 5% or 0.05") from None


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run directory (runs/<run>)."),
    peak_bandwidth: float = typer.Option(None, "--peak-bandwidth", help="Bytes/s (see skipbench roofline)."),
    peak_flops: float = typer.Option(None, "--peak-flops", help="FLOP/s (see skipbench roofline)."),
    overlay: list[Path] = typer.Option(None, "--overlay", help="Other runs to overlay with this one (repeatable)."),
    labels: str = typer.Option(None, "--labels", help="Comma list of labels for this run and the overlays."),
) -> None:
    """Tables (Markdown, LaTeX, CSV) and plots (PNG, PDF) from a run's raw records."""
    from skipbench.plots import overlay as overlay_plot
    from skipbench.report import efficiency_markdown, write_report
    from skipbench.store import RunStore
    from skipbench.sweep import RunError

    with handled():
        store = RunStore(run_dir)
        store.read_manifest()  # one clear line when this is not a run directory
        if not store.has_cells():
            raise RunError(f"{run_dir} holds no finished cells yet: run or resume its sweep first")
        files = write_report(run_dir, peak_bandwidth=peak_bandwidth, peak_flops=peak_flops)
        if overlay:
            runs = [run_dir, *overlay]
            names = labels.split(",") if labels else [path.name for path in runs]
            if len(names) != len(runs):
                raise spec.SpecError(f"--labels gives {len(names)} labels for {len(runs)} runs")
            files += overlay_plot(runs, names, run_dir / "plots" / "overlay")
        out.print(efficiency_markdown(run_dir), highlight=False)
        out.print(f"wrote {len(files)} files under {run_dir}/tables and {run_dir}/plots")


@app.command()
def compare(
    base_dir: Path = typer.Argument(..., help="The baseline run (e.g. results/ci-smoke)."),
    new_dir: Path = typer.Argument(..., help="The run to check."),
    max_slowdown: str = typer.Option("5%", "--max-slowdown", help="Speedup may fall this much (5% or 0.05)."),
    max_acceptance_drop: float = typer.Option(0.02, "--max-acceptance-drop"),
    max_quality_drop: float = typer.Option(0.01, "--max-quality-drop"),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="A base cell missing in the new run is a note."),
) -> None:
    """Match the cells of two runs and exit 1 when one regressed beyond the tolerances."""
    from skipbench.compare import compare_runs, format_comparison

    with handled():
        comparison = compare_runs(base_dir, new_dir, max_slowdown=parse_fraction(max_slowdown),
                                  max_acceptance_drop=max_acceptance_drop, max_quality_drop=max_quality_drop,
                                  allow_missing=allow_missing)
    out.print(format_comparison(comparison))
    for note in comparison.notes:
        out.print(f"note: {note}", highlight=False)
    for problem in comparison.problems:
        out.print(f"[red]regression[/]: {problem}", highlight=False)
    if not comparison.ok:
        raise typer.Exit(1)
    out.print("[green]no regression[/]")


class handled:
    """Turn the user's errors into one red line and exit code 2; Ctrl-C into exit code 130."""

    def __init__(self, *extra: type[Exception]):
        self.extra = extra

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is None:
            return False
        if issubclass(kind, KeyboardInterrupt):
            console.print("[yellow]interrupted[/]: finished cells are kept; rerun the same command to resume")
            raise typer.Exit(130)
        if issubclass(kind, (*user_errors(), *self.extra)):
            message = str(error).strip().splitlines()[0] if str(error).strip() else kind.__name__
            fail(message)
        return False


def main() -> None:
    # transformers is imported lazily by the commands; its advisory warnings would bury the tables.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        app()
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    main()
