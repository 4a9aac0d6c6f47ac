"""`skipbench run` and `skipbench sweep`, and what they share: Setup fields from the options, measuring and
printing a plan of cells, the consent to execute model-written code, and exit code 3 for failed cells."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from skipbench import methods, spec
from skipbench.cli.core import EXIT_CELLS_FAILED, app, console, handled, out
from skipbench.cli.display import RichProgress, print_summary, run_train, train_config
from skipbench.cli.options import (
    AcceptanceOpt,
    AddressOpt,
    CompileOpt,
    DataDirOpt,
    DetachOpt,
    DeviceMapOpt,
    DeviceOpt,
    DryRunOpt,
    DtypeOpt,
    ExecuteOpt,
    ForceOpt,
    GpuMemoryOpt,
    GpusOpt,
    GpusPerWorkerOpt,
    LauncherOpt,
    MaxNewOpt,
    MaxParallelOpt,
    MaxPromptOpt,
    ModelOpt,
    NShotOpt,
    NumSamplesOpt,
    OutOpt,
    PartitionOpt,
    PeakBandwidthOpt,
    PeakFlopsOpt,
    PolicyOpt,
    PromptOpt,
    RepeatsOpt,
    SampleOpt,
    SeedOpt,
    StopOpt,
    TemperatureOpt,
    TemplateOpt,
    ThreadsOpt,
    TimeMinOpt,
    TopPOpt,
    UncontainedOpt,
    WarmupOpt,
    WorkersOpt,
)

if TYPE_CHECKING:
    from skipbench.launch import LaunchOptions
    from skipbench.store import RunStore


# The arguments of `run` and `sweep` that become Setup fields, by their parameter names.
SETUP_OPTIONS = ("model", "prompt", "dataset", "num_samples", "seed", "n_shot", "template", "max_prompt_tokens",
                 "prompt_policy", "data_dir", "max_new_tokens", "stop", "sample", "temperature", "top_p", "dtype",
                 "device", "warmup", "repeats", "threads", "execute_code", "device_map")


def setup_options(arguments: dict) -> dict:
    """Setup fields from a command's arguments (None where not given)."""
    options = {name: arguments[name] for name in SETUP_OPTIONS}
    prompts, stops = options.pop("prompt"), options.pop("stop")
    if isinstance(options["dataset"], (list, tuple)):  # sweep: repeatable
        options["dataset"] = list(options["dataset"]) or None
    options["prompts"] = tuple(prompts) if prompts else None
    options["stop_sequences"] = tuple(stops) if stops else None
    return options


def measure_and_print(setup: spec.Setup, cells: list[spec.Cell], target: Path, force: bool, report: bool,
                      command: str = "sweep", launch: LaunchOptions | None = None) -> RunStore:
    """Measure the cells here or through a launcher, then print the summary (and write the report)."""
    from skipbench.launch import local
    from skipbench.report import write_report
    from skipbench.sweep import check_plan

    if launch is not None and launch.launcher != "local":  # ray or slurm: workers measure, this process records
        from skipbench.launch import run as launch_run
        from skipbench.launch.progress import RichBoard

        with RichBoard(console) as board:
            launched = launch_run(launch, setup, cells, target, force=force, board=board)
        store = launched.store
        if launched.running:  # --detach: nothing to print yet
            out.print(escape(launched.note), soft_wrap=True)
            return store
    else:
        check_plan(setup, cells)  # a typo is one line, before anything else is printed
        console.print(escape(f"{command}: {len(cells)} cell(s) of {setup.model} -> {target}"), soft_wrap=True)
        with RichProgress() as progress:
            store = local.run(setup, cells, target, force=force, progress=progress)
    print_summary(store, report=report)
    if report:
        files = write_report(store.root)
        out.print(escape(f"tables and plots: {store.root / 'tables'}, {store.root / 'plots'} ({len(files)} files)"),
                  soft_wrap=True)
    out.print(escape(f"records: {store.root}"), soft_wrap=True)
    return store


def allow_execution(setup: spec.Setup, command_line: bool | None, uncontained: bool) -> spec.Setup:
    """Model-written code runs only when --execute-code is on the command line, and only contained."""
    if setup.execute_code and command_line is None:
        raise spec.SpecError("the sweep file asks to execute model-written code (execute_code = true); add "
                             "--execute-code to confirm, or --no-execute-code")
    if not setup.execute_code:
        return setup
    from skipbench.tasks import sandbox

    reason = sandbox.sandbox_support()
    if reason is not None and not uncontained:
        raise spec.SpecError(f"cannot contain model-written code here ({reason}); --execute-code-uncontained runs "
                             f"it with only resource limits: it can read and write your files and use the network")
    console.print("[yellow]note[/]: executing model-written code (HumanEval tests) "
                  + ("in a namespace sandbox" if reason is None else "UNCONTAINED, with resource limits only"))
    return replace(setup, execute_code=True, execute_uncontained=reason is not None)


def finish(stores: list[RunStore], force: bool = False) -> None:
    """Exit 3 when any cell of the sweep failed (after everything else finished)."""
    failed = [error for store in stores for error in store.errors() if not error.get("unsupported")]
    if failed:
        again = "the same command without --force" if force else "the same command"
        console.print(f"[red]{len(failed)} cell(s) failed[/]; rerun {again} to retry only them", soft_wrap=True)
        raise typer.Exit(EXIT_CELLS_FAILED)


def print_dry_run(setup: spec.Setup, cells: list[spec.Cell], gpus: int | None, gpu_memory: str,
                  peak_bandwidth: float | None, peak_flops: float | None, acceptance: float | None) -> None:
    """`--dry-run`: the plan, placements, memory per device and the time estimate, without loading weights."""
    from skipbench import dryrun
    from skipbench.measure import measure_roofline
    from skipbench.models import resolve_device, resolve_dtype
    from skipbench.store import device_name

    setup.check()
    device = resolve_device(setup.device)

    def roofline() -> dict:  # only when no calibration of the shape is stored here (small: under a second)
        return measure_roofline(device, resolve_dtype(setup.dtype, device), size_mb=64, repeats=3)

    options = dryrun.Options(gpus=gpus, gpu_memory=gpu_memory, peak_bandwidth=peak_bandwidth, peak_flops=peak_flops,
                             acceptance=dryrun.ASSUMED_ACCEPTANCE if acceptance is None else acceptance,
                             roofline=roofline)
    for line in dryrun.report(setup, cells, options, device_name=device_name(device)):
        out.print(escape(line), soft_wrap=True)


# --------------------------------------------------------------------------- commands


@app.command()
def run(
    strategy: str = typer.Option("self_speculative", "--strategy", "-s",
                                 help=f"One of {', '.join(methods.strategies())}."),
    exit_layer: int = typer.Option(None, "--exit-layer", "-e", help="Layers 0..E-1 draft (self_speculative; "
                                   "default: a quarter of the layers)."),
    num_speculations: int = typer.Option(None, "--num-speculations", "-k", help="Draft tokens per step (default 4)."),
    draft_model: str = typer.Option(None, "--draft-model", help="Draft model (speculative)."),
    backend: str = typer.Option("native", "--backend", help=f"One of {', '.join(methods.backends())}."),
    draft_policy: str = typer.Option("static", "--draft-policy", help="static (fixed E and K), confidence:T, "
                                     "heuristic or dynamic-exit; K is the most a round drafts (heuristic: its start)."),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="Skip the autoregressive baseline."),
    batch_sizes: str = typer.Option("1", "--batch-sizes", help="Prompts decoded together, e.g. 1,4,16: the cell "
                                    "(and its baseline) at each batch size."),
    out_dir: Path = OutOpt, force: bool = ForceOpt,
    model: str = ModelOpt, prompt: list[str] = PromptOpt, dataset: str = typer.Option(None, "--dataset", "-d",
                                                                                      help="cnn_dm, humaneval, "
                                                                                      "topv2, spec_bench, "
                                                                                      "spec_bench:multi_turn or "
                                                                                      "jsonl:PATH."),
    num_samples: int = NumSamplesOpt, seed: int = SeedOpt, n_shot: int = NShotOpt, template: str = TemplateOpt,
    max_prompt_tokens: int = MaxPromptOpt, prompt_policy: str = PolicyOpt, data_dir: str = DataDirOpt,
    max_new_tokens: int = MaxNewOpt, stop: list[str] = StopOpt, sample: bool = SampleOpt,
    temperature: float = TemperatureOpt, top_p: float = TopPOpt, dtype: str = DtypeOpt, device: str = DeviceOpt,
    warmup: int = WarmupOpt, repeats: int = RepeatsOpt, threads: int = ThreadsOpt, execute_code: bool = ExecuteOpt,
    execute_code_uncontained: bool = UncontainedOpt, compile: bool = CompileOpt,
    device_map: str = DeviceMapOpt, dry_run: bool = DryRunOpt, gpus: int = GpusOpt, gpu_memory: str = GpuMemoryOpt,
    peak_bandwidth: float = PeakBandwidthOpt, peak_flops: float = PeakFlopsOpt, acceptance: float = AcceptanceOpt,
) -> None:
    """Decode a prompt set with one strategy (and the autoregressive baseline) and store the records."""
    from skipbench.decoding.policy import varies_exit
    from skipbench.models import num_layers_of, pretrained_config
    from skipbench.sweep import run_dir_name

    with handled(force):
        given = setup_options(locals())
        setup = spec.override(spec.Setup(), **given)
        if setup.dataset is None and not setup.prompts:
            setup = replace(setup, prompts=("def fibonacci(n):",))
        setup = allow_execution(setup, execute_code, execute_code_uncontained)
        backend = methods.compiled_backend(backend) if compile else backend
        method = methods.method_for(strategy, backend)
        if method.speculates and num_speculations is None:
            num_speculations = 4
        if method.drafter == "exit" and exit_layer is None and not varies_exit(draft_policy):
            layers = num_layers_of(setup.model)
            if layers is None and dry_run:  # without weights: the dry run's config (a Hub id's known shape)
                from skipbench.dryrun import config_of

                layers = config_of(setup.model)[0].num_hidden_layers
            if layers is None and not setup.model.startswith("synthetic:"):  # a Hub id: its config says
                layers = getattr(pretrained_config(setup.model), "num_hidden_layers", None)
            exit_layer = max(1, layers // 4) if layers else None
        cell = spec.Cell(strategy, exit_layer, num_speculations, draft_model, backend, draft_policy=draft_policy)
        cells = [replace(cell, batch_size=size) for size in spec.parse_range(batch_sizes)]
        layers = num_layers_of(setup.model)  # None where only the loaded model can say: checked again then
        for each in cells:
            each.check(layers)
        # Speedup and losslessness need the baseline on the same prompts: speculative runs add it.
        cells = spec.with_baseline(cells) if method.speculates and not no_baseline else cells
        if dry_run:
            print_dry_run(setup, cells, gpus, gpu_memory, peak_bandwidth, peak_flops, acceptance)
            return
        target = out_dir or run_dir_name(setup, cells, "run")
        store = measure_and_print(setup, cells, target, force, report=False, command="run")
    finish([store], force)


# `skipbench sweep` with no arguments: a real sweep on the offline default model, a few minutes on 2 CPU cores.
# No stop sequences: SmolLM2 often opens a HumanEval completion with "\n#" or "\ndef", where the Codex stops
# would end it after a token or two and prefill would be most of the time; the default measures decoding.
DEFAULT_SWEEP = spec.SweepFile(setup=dict(model="smollm2-135m", dataset="humaneval", num_samples=3,
                                          max_new_tokens=48, stop_sequences=[]),
                               grid=dict(exits="8,16,24", speculations="2"), out=None, train=[])


@app.command()
def sweep(
    sweep_file: str = typer.Argument(None, metavar="SWEEP_FILE",
                                     help="A sweep file (sweeps/*.toml); options given here override it."),
    exits: str = typer.Option(None, "--exits", help="Exit layers: 2..16, 2..16:2, 1,2,4 or 1,2,8..12."),
    speculations: str = typer.Option(None, "--speculations", help="Draft lengths K, same syntax (default 2,4,6)."),
    strategies: str = typer.Option(None, "--strategies", help="Comma list: self_speculative, speculative."),
    draft_model: list[str] = typer.Option(None, "--draft-model", metavar="<str>",
                                          help="A draft model: two-model rows (repeatable)."),
    backends: str = typer.Option(None, "--backends", help=f"Comma list of {', '.join(methods.backends())} "
                                 f"(default native)."),
    draft_policies: str = typer.Option(None, "--draft-policies", help="Comma list of draft policies: static, "
                                       "confidence:T, heuristic, dynamic-exit (default static)."),
    control: bool = typer.Option(None, "--control/--no-control", help="Add a second autoregressive cell, timed "
                                 "like any other: an A/A control whose speedup interval should contain 1.00."),
    batch_sizes: str = typer.Option(None, "--batch-sizes", help="Prompts decoded together, e.g. 1,4,16: every "
                                    "cell at each batch size, each against autoregressive at the same size."),
    out_dir: Path = OutOpt, force: bool = ForceOpt,
    report: bool = typer.Option(True, "--report/--no-report", help="Write tables and plots when done."),
    model: str = ModelOpt, prompt: list[str] = PromptOpt,
    dataset: list[str] = typer.Option(None, "--dataset", "-d", metavar="<str>", help="A task (repeatable: one "
                                      "run per task, plus a per-task speedup table)."),
    num_samples: int = NumSamplesOpt, seed: int = SeedOpt, n_shot: int = NShotOpt, template: str = TemplateOpt,
    max_prompt_tokens: int = MaxPromptOpt, prompt_policy: str = PolicyOpt, data_dir: str = DataDirOpt,
    max_new_tokens: int = MaxNewOpt, stop: list[str] = StopOpt, sample: bool = SampleOpt,
    temperature: float = TemperatureOpt, top_p: float = TopPOpt, dtype: str = DtypeOpt, device: str = DeviceOpt,
    warmup: int = WarmupOpt, repeats: int = RepeatsOpt, threads: int = ThreadsOpt, execute_code: bool = ExecuteOpt,
    execute_code_uncontained: bool = UncontainedOpt, compile: bool = CompileOpt,
    launcher: str = LauncherOpt, workers: int = WorkersOpt, address: str = AddressOpt,
    gpus_per_worker: int = GpusPerWorkerOpt, partition: str = PartitionOpt, time_min: int = TimeMinOpt,
    max_parallel: int = MaxParallelOpt, detach: bool = DetachOpt,
    device_map: str = DeviceMapOpt, dry_run: bool = DryRunOpt, gpus: int = GpusOpt, gpu_memory: str = GpuMemoryOpt,
    peak_bandwidth: float = PeakBandwidthOpt, peak_flops: float = PeakFlopsOpt, acceptance: float = AcceptanceOpt,
) -> None:
    """Sweep exit layers, draft lengths and draft models; the autoregressive baseline is always included."""
    from skipbench import launch as launching
    from skipbench import sweep as sweeping
    from skipbench.plots import overlay_runs
    from skipbench.tables import write_task_table

    with handled(force):
        given = setup_options(locals())
        grid = dict(exits=exits, speculations=speculations, strategies=strategies, backends=backends,
                    draft_models=list(draft_model) if draft_model else None, control=control,
                    draft_policies=draft_policies, batch_sizes=batch_sizes)
        default = replace(DEFAULT_SWEEP, setup=dict(DEFAULT_SWEEP.setup), grid=dict(DEFAULT_SWEEP.grid))
        plan = sweeping.plan(sweep_file, given, grid, out_dir, default, compile=compile)
        if dry_run:
            for task in plan.tasks or [None]:
                chosen = replace(plan.setup, dataset=task) if task else plan.setup
                print_dry_run(chosen, plan.cells, gpus, gpu_memory, peak_bandwidth, peak_flops, acceptance)
            return
        plan.setup = allow_execution(plan.setup, execute_code, execute_code_uncontained)
        launch = launching.merged(plan.launch, launcher=launcher, workers=workers, address=address,
                                  gpus_per_worker=gpus_per_worker, partition=partition, time_min=time_min,
                                  max_parallel=max_parallel, detach=detach)
        began = time.perf_counter()
        outcome = sweeping.run(plan, force=force,
                               measure=lambda s, c, t, f: measure_and_print(s, c, t, f, report, launch=launch),
                               train=lambda options: run_train(train_config(**options)),
                               note=lambda text: console.print(escape(text)), task_table=write_task_table,
                               overlay=overlay_runs)
        for file in outcome.files:
            out.print(escape(f"wrote {file}"), soft_wrap=True)
        console.print(escape(f"sweep done in {sweeping.elapsed(began)}"))
    finish(outcome.stores, force)
