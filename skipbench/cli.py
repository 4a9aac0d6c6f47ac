"""The `skipbench` command line: parse options, call the library, print. Nothing else lives here.

Exit codes: 0 done; 1 a regression (compare); 2 a user error (one line, no traceback); 3 the sweep
finished but some cells failed (listed with their errors); 130 interrupted (finished work is kept).
User text (model names, prompts, errors) is never read as rich markup.
"""
# ruff: noqa: E402 - Ctrl-C is taken over before the slow imports (torch), so it never shows a traceback

from __future__ import annotations

import errno
import os
import signal
import sys


def _interrupted_at_start(signum, frame) -> None:
    """Ctrl-C while skipbench starts (imports, parsing) or after its work is stored: nothing to keep, so
    leave at once, without the traceback a KeyboardInterrupt inside an import would print."""
    try:
        sys.stdout.flush()
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
    finally:
        os._exit(130)


if __name__ == "__main__" or os.path.basename(sys.argv[0]) in ("skipbench", "skipbench.exe"):
    signal.signal(signal.SIGINT, _interrupted_at_start)

import time
import warnings
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichBar
from rich.table import Table

from skipbench import methods, spec
from skipbench.bars import ConsoleBar
from skipbench.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Benchmark autoregressive, two-model speculative and LayerSkip self-speculative decoding.")
console = Console(stderr=True, highlight=False)
out = Console(highlight=False)

EXIT_REGRESSION, EXIT_USER_ERROR, EXIT_CELLS_FAILED, EXIT_INTERRUPTED = 1, 2, 3, 130


# Libraries whose warnings and progress bars would bury skipbench's tables (its own warnings are printed lines).
QUIET_LIBRARIES = r"(torch|transformers|huggingface_hub|accelerate|datasets|tokenizers|safetensors|gguf)(\.|$)"


def quiet_libraries() -> None:
    """Silence the libraries' advice, deprecation notes and progress bars; skipbench's own lines stay."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", module=QUIET_LIBRARIES)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if "transformers" in sys.modules:  # imported before the environment could tell it
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


@app.callback()
def _commands() -> None:
    """Benchmark autoregressive, two-model speculative and LayerSkip self-speculative decoding."""
    quiet_libraries()


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # one line, however long
    raise typer.Exit(code)


def _on_sigint(handler):
    """Install a SIGINT handler (only the main thread can); return the one it replaces."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, handler)


class handled:
    """The user's errors as one red line and exit code 2; Ctrl-C as exit code 130 with how to resume.

    A Ctrl-C that lands inside an import may surface as another error (a library turns it into an
    ImportError): a SIGINT seen during the block counts as the interruption, whatever was raised."""

    def __init__(self, force: bool = False):
        self.force = force
        self.interrupted = False
        self.previous = None

    def _interrupt(self, signum, frame):
        self.interrupted = True
        raise KeyboardInterrupt

    def __enter__(self):
        self.previous = _on_sigint(self._interrupt)
        return self

    def __exit__(self, kind, error, traceback):
        if self.previous is not None:
            _on_sigint(self.previous)
        if kind is None:
            return False
        if issubclass(kind, KeyboardInterrupt) or self.interrupted:
            again = "the same command without --force" if self.force else "the same command"
            console.print(f"[yellow]interrupted[/]: finished work is kept; rerun {again} to resume", soft_wrap=True)
            raise typer.Exit(EXIT_INTERRUPTED)
        if issubclass(kind, UserError):
            text = str(error).strip()
            fail(text.splitlines()[0] if text else kind.__name__)
        if issubclass(kind, OSError):
            if error.filename:  # read-only directory, full disk, a missing file, ...
                fail(f"cannot use {error.filename}: {error.strerror or error}")
            if isinstance(error, FileNotFoundError) or error.errno in USER_ERRNOS:
                text = str(error).strip()
                fail(text.splitlines()[0] if text else kind.__name__)
        return False


USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT}


# --------------------------------------------------------------------------- progress


class RichProgress(ConsoleBar):
    """One bar over the generations of a sweep, with the current cell's running tokens/s and acceptance.

    When the output is not a terminal (a CI log, a file), plain lines instead: one per finished round,
    at most one every 20 s in between, and one per finished or failed cell."""

    def __init__(self):
        super().__init__(console)
        self.task = None
        self.totals: dict = {}
        self.done = self.total = 0
        self.began = self.last_line = time.perf_counter()

    def plan(self, cells, generations: int, rounds: int) -> None:
        self.total, self.done = generations, 0
        self.note(f"measuring {len(cells)} cells: {generations} generations in {rounds} interleaved round(s)")
        if self.live:
            self.task = self.bar.add_task("generations", total=generations, stats="")

    def warming_up(self, cell) -> None:
        if self.live and self.task is not None:
            self.bar.update(self.task, stats=f"warming up {escape(cell.label())}")
        elif not self.live:  # warming up (and compiling) can take minutes: say what is going on
            self._line(f"warming up {cell.label()}")

    def generation_done(self, cell, row: dict) -> None:
        tokens, seconds, drafted, accepted = self.totals.get(cell, (0, 0.0, 0, 0))
        self.totals[cell] = (tokens + row["new_tokens"], seconds + row["time_s"], drafted + row["drafted"],
                             accepted + row["accepted"])
        tokens, seconds, drafted, accepted = self.totals[cell]
        self.done += 1
        stats = f"{escape(short_label(cell))}: {tokens / seconds:.1f} tok/s" if seconds else ""
        if drafted:
            stats += f", accept {accepted / drafted:.2f}"
        if self.live:
            self.bar.update(self.task, advance=1, stats=stats)
        elif time.perf_counter() - self.last_line > 20:
            self._line(f"{self.done}/{self.total} generations ({stats})")

    def round_done(self, index: int, rounds: int) -> None:
        if not self.live:
            self._line(f"round {index + 1}/{rounds} done: {self.done}/{self.total} generations")

    def cell_done(self, cell, status: str) -> None:
        if status != "done" or not self.live:
            self.note(f"  {cell.label()}: {status}")

    def note(self, text: str) -> None:
        self.print(text)

    def _line(self, text: str) -> None:
        self.last_line = time.perf_counter()
        self.print(f"[{time.perf_counter() - self.began:6.0f} s] {text}")


# --------------------------------------------------------------------------- printing a run


def short_label(cell) -> str:
    """A cell's name in a few characters, for narrow terminals: `self E=8 K=4`, `2-model K=4 hf`."""
    parts = [cell.method.short]
    if cell.exit_layer is not None:
        parts.append(f"E={cell.exit_layer}")
    if cell.num_speculations is not None:
        parts.append(f"K={cell.num_speculations}")
    if cell.backend != "native":
        parts.append(cell.backend)
    if cell.replica:
        parts.append(f"#{cell.replica + 1}")
    return " ".join(parts)


def print_summary(store, device: str | None = None) -> None:
    """The run's cells in the order asked for; fits an 80-column terminal. Failed cells and warnings after.
    A run timed on several devices gets a table per device: times are never pooled across devices."""
    from skipbench.spec import Cell
    from skipbench.summary import NOISY, load_summary, run_devices
    from skipbench.tables import number, with_interval

    devices = run_devices(store.root) if device is None else []
    if len(devices) > 1:
        out.print(escape(f"rows timed on {len(devices)} devices: one table per device"), soft_wrap=True)
        for name in devices:
            print_summary(store, name)
        for error in store.errors():
            out.print(f"[red]failed[/] {escape(error['cell_label'])}: {escape(error['error'])}", soft_wrap=True)
        return
    summary, manifest = load_summary(store.root, device=device)
    target = (manifest.get("models") or {}).get("target") or {}
    title = f"{target.get('name')}{' (SYNTHETIC weights)' if target.get('synthetic') else ''}: {store.root}"
    title += f" on {device}" if device else ""
    table = Table(title=escape(title), title_justify="left", pad_edge=False)
    for name in ("cell", "tok/s", "speedup [95% CI]", "accept", "tok/step", "lossless"):
        table.add_column(name, justify="left" if name == "cell" else "right", no_wrap=True)
    drafts = sorted({row["draft_model"] for row in summary.to_dict("records") if isinstance(row["draft_model"], str)})
    for row in summary.to_dict("records"):
        cell = Cell.from_record(row)
        label = short_label(cell) + (f" d{drafts.index(cell.draft_model) + 1}" if cell.draft_model else "")
        table.add_row(escape(label), number(row["tokens_per_s"], "{:.1f}"),
                      with_interval(row["speedup"], row["speedup_low"], row["speedup_high"]),
                      number(row["acceptance_rate"], "{:.2f}"), number(row["tokens_per_step"], "{:.2f}"),
                      number(row["lossless"], "{:.0%}"))
    out.print(table)
    for index, name in enumerate(drafts):
        out.print(escape(f"d{index + 1}: draft model {name}"), soft_wrap=True)
    noisy = [row for row in summary.to_dict("records") if any(w.startswith("noisy") for w in row["warnings"])]
    if noisy:
        out.print(f"[yellow]warning[/]: {len(noisy)} of {len(summary)} cells have speedup intervals wider than "
                  f"+-{NOISY:.0%} (tables/efficiency.md lists them): add --repeats or prompts, or measure on a "
                  f"quieter machine")
    for row in summary.to_dict("records"):
        for warning in row["warnings"]:
            if not warning.startswith("noisy"):
                out.print(f"[yellow]warning[/] {escape(row['cell_label'])}: {escape(warning)}", soft_wrap=True)
    for error in store.errors() if device is None else []:
        out.print(f"[red]failed[/] {escape(error['cell_label'])}: {escape(error['error'])}", soft_wrap=True)


# --------------------------------------------------------------------------- options shared by run and sweep
# None means: the sweep file's value, else the default of skipbench.spec.Setup.

ModelOpt = typer.Option(None, "--model", "-m", help="Hub id, local dir, synthetic:<preset>[?agree=E&layers=N&seed=S], "
                        "or smollm2-135m (default).")
PromptOpt = typer.Option(None, "--prompt", "-p", help="A prompt text (repeatable).")
NumSamplesOpt = typer.Option(None, "--num-samples", "-n", help="Prompts to take (seeded choice).")
SeedOpt = typer.Option(None, "--seed", help="Seed for prompt choice and sampling (default 0).")
NShotOpt = typer.Option(None, "--n-shot", help="Solved examples prepended (cnn_dm).")
TemplateOpt = typer.Option(None, "--template", help='Wrap every prompt, e.g. "[INST] {prompt} [/INST]".')
MaxPromptOpt = typer.Option(None, "--max-prompt-tokens", help="Longest prompt in tokens.")
PolicyOpt = typer.Option(None, "--prompt-policy", help="Longer prompts: 'left' cuts from the left (default), "
                         "'refuse' fails.")
DataDirOpt = typer.Option(None, "--data-dir", envvar="SKIPBENCH_DATA_DIR",
                          help="Local copies of the datasets: DIR/<task>/<split>.jsonl (see skipbench datasets).")
MaxNewOpt = typer.Option(None, "--max-new-tokens", help="Tokens to generate (default: the task's; 128 for --prompt).")
StopOpt = typer.Option(None, "--stop", help="A stop sequence (repeatable; default: the task's).")
SampleOpt = typer.Option(None, "--sample/--greedy", help="Sample instead of greedy decoding (default greedy).")
TemperatureOpt = typer.Option(None, "--temperature", help="Sampling temperature (default 1.0).")
TopPOpt = typer.Option(None, "--top-p", help="Nucleus sampling mass (default 1.0).")
DtypeOpt = typer.Option(None, "--dtype", help="auto (bf16 on CUDA, float32 on CPU), float32, bfloat16, float16.")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu or cuda.")
WarmupOpt = typer.Option(None, "--warmup", help="Uncounted generations per cell before timing (default 1).")
RepeatsOpt = typer.Option(None, "--repeats", help="Timed rounds per cell, interleaved with the baseline (default 3).")
ThreadsOpt = typer.Option(None, "--threads", help="CPU threads for torch (default: half the cores).")
ExecuteOpt = typer.Option(None, "--execute-code/--no-execute-code",
                          help="Run HumanEval completions against their tests (pass@1) in a sandbox.")
CompileOpt = typer.Option(False, "--compile", help="Run skipbench's engine with static shapes and torch.compile "
                          "(CUDA graphs on a GPU): the 'native' backend becomes 'compiled'. Compile time is "
                          "reported apart, never inside a cell's time.")
UncontainedOpt = typer.Option(False, "--execute-code-uncontained",
                              help="Where no namespace sandbox is available, run model-written code with only "
                                   "resource limits: it can read and write your files and use the network.")
OutOpt = typer.Option(None, "--out", "-o", help="Run directory (default: derived from the setup, so rerunning the "
                      "same command resumes).")
ForceOpt = typer.Option(False, "--force", help="Delete the run directory's cells and start over.")
LauncherOpt = typer.Option(None, "--launcher", help="Where cells run: local (this process; default), ray (a worker "
                           "per GPU of a Ray cluster, or a local cluster if none runs) or slurm (array tasks via "
                           "submitit). Needs pip install 'skipbench[ray]' or 'skipbench[slurm]'.")
WorkersOpt = typer.Option(None, "--workers", help="ray: workers (default: the cluster's GPUs, else 2); slurm: array "
                          "tasks (default: --max-parallel, else 8). Each measures a group of cells with its own "
                          "baseline.")
AddressOpt = typer.Option(None, "--address", help="ray: auto (a running cluster) or HOST:PORT (default: a running "
                          "cluster, else a new local one).")
GpusPerWorkerOpt = typer.Option(None, "--gpus-per-worker", help="ray, slurm: GPUs per worker (default 1).")
PartitionOpt = typer.Option(None, "--partition", help="slurm: the partition to submit to.")
TimeMinOpt = typer.Option(None, "--time-min", help="slurm: each task's time limit in minutes (default 240).")
MaxParallelOpt = typer.Option(None, "--max-parallel", help="slurm: array tasks running at once.")
DetachOpt = typer.Option(False, "--detach", help="slurm: submit and return; the same command again waits for the "
                         "tasks and collects (skipbench report shows what has finished).")


# The arguments of `run` and `sweep` that become Setup fields, by their parameter names.
SETUP_OPTIONS = ("model", "prompt", "dataset", "num_samples", "seed", "n_shot", "template", "max_prompt_tokens",
                 "prompt_policy", "data_dir", "max_new_tokens", "stop", "sample", "temperature", "top_p", "dtype",
                 "device", "warmup", "repeats", "threads", "execute_code")


def setup_options(arguments: dict) -> dict:
    """Setup fields from a command's arguments (None where not given)."""
    options = {name: arguments[name] for name in SETUP_OPTIONS}
    prompts, stops = options.pop("prompt"), options.pop("stop")
    if isinstance(options["dataset"], (list, tuple)):  # sweep: repeatable
        options["dataset"] = list(options["dataset"]) or None
    options["prompts"] = tuple(prompts) if prompts else None
    options["stop_sequences"] = tuple(stops) if stops else None
    return options


def measure_and_print(setup: spec.Setup, cells: list, target: Path, force: bool, report: bool,
                      command: str = "sweep", launch=None):
    from skipbench.launch import local
    from skipbench.sweep import check_plan
    from skipbench.tables import write_report

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
    print_summary(store)
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


def finish(stores: list, force: bool = False) -> None:
    """Exit 3 when any cell of the sweep failed (after everything else finished)."""
    failed = [error for store in stores for error in store.errors()]
    if failed:
        again = "the same command without --force" if force else "the same command"
        console.print(f"[red]{len(failed)} cell(s) failed[/]; rerun {again} to retry only them", soft_wrap=True)
        raise typer.Exit(EXIT_CELLS_FAILED)


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
    no_baseline: bool = typer.Option(False, "--no-baseline", help="Skip the autoregressive baseline."),
    out_dir: Path = OutOpt, force: bool = ForceOpt,
    model: str = ModelOpt, prompt: list[str] = PromptOpt, dataset: str = typer.Option(None, "--dataset", "-d",
                                                                                      help="cnn_dm, humaneval, "
                                                                                      "topv2 or jsonl:PATH."),
    num_samples: int = NumSamplesOpt, seed: int = SeedOpt, n_shot: int = NShotOpt, template: str = TemplateOpt,
    max_prompt_tokens: int = MaxPromptOpt, prompt_policy: str = PolicyOpt, data_dir: str = DataDirOpt,
    max_new_tokens: int = MaxNewOpt, stop: list[str] = StopOpt, sample: bool = SampleOpt,
    temperature: float = TemperatureOpt, top_p: float = TopPOpt, dtype: str = DtypeOpt, device: str = DeviceOpt,
    warmup: int = WarmupOpt, repeats: int = RepeatsOpt, threads: int = ThreadsOpt, execute_code: bool = ExecuteOpt,
    execute_code_uncontained: bool = UncontainedOpt, compile: bool = CompileOpt,
) -> None:
    """Decode a prompt set with one strategy (and the autoregressive baseline) and store the records."""
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
        if method.drafter == "exit" and exit_layer is None:
            layers = num_layers_of(setup.model)
            if layers is None and not setup.model.startswith("synthetic:"):  # a Hub id: its config says
                layers = getattr(pretrained_config(setup.model), "num_hidden_layers", None)
            exit_layer = max(1, layers // 4) if layers else None
        cell = spec.Cell(strategy, exit_layer, num_speculations, draft_model, backend)
        # Speedup and losslessness need the baseline on the same prompts: speculative runs add it.
        cells = spec.with_baseline([cell]) if method.speculates and not no_baseline else [cell]
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
    sweep_file: str = typer.Argument(None, help="A sweep file (sweeps/*.toml); options given here override it."),
    exits: str = typer.Option(None, "--exits", help="Exit layers: 2..16, 2..16:2, 1,2,4 or 1,2,8..12."),
    speculations: str = typer.Option(None, "--speculations", help="Draft lengths K, same syntax (default 2,4,6)."),
    strategies: str = typer.Option(None, "--strategies", help="Comma list: self_speculative, speculative."),
    draft_model: list[str] = typer.Option(None, "--draft-model", help="A draft model: two-model rows (repeatable)."),
    backends: str = typer.Option(None, "--backends", help=f"Comma list of {', '.join(methods.backends())} "
                                 f"(default native)."),
    control: bool = typer.Option(None, "--control/--no-control", help="Add a second autoregressive cell, timed "
                                 "like any other: an A/A control whose speedup interval should contain 1.00."),
    out_dir: Path = OutOpt, force: bool = ForceOpt,
    report: bool = typer.Option(True, "--report/--no-report", help="Write tables and plots when done."),
    model: str = ModelOpt, prompt: list[str] = PromptOpt,
    dataset: list[str] = typer.Option(None, "--dataset", "-d", help="A task (repeatable: one run per task, "
                                      "plus a per-task speedup table)."),
    num_samples: int = NumSamplesOpt, seed: int = SeedOpt, n_shot: int = NShotOpt, template: str = TemplateOpt,
    max_prompt_tokens: int = MaxPromptOpt, prompt_policy: str = PolicyOpt, data_dir: str = DataDirOpt,
    max_new_tokens: int = MaxNewOpt, stop: list[str] = StopOpt, sample: bool = SampleOpt,
    temperature: float = TemperatureOpt, top_p: float = TopPOpt, dtype: str = DtypeOpt, device: str = DeviceOpt,
    warmup: int = WarmupOpt, repeats: int = RepeatsOpt, threads: int = ThreadsOpt, execute_code: bool = ExecuteOpt,
    execute_code_uncontained: bool = UncontainedOpt, compile: bool = CompileOpt,
    launcher: str = LauncherOpt, workers: int = WorkersOpt, address: str = AddressOpt,
    gpus_per_worker: int = GpusPerWorkerOpt, partition: str = PartitionOpt, time_min: int = TimeMinOpt,
    max_parallel: int = MaxParallelOpt, detach: bool = DetachOpt,
) -> None:
    """Sweep exit layers, draft lengths and draft models; the autoregressive baseline is always included."""
    from skipbench import launch as launching
    from skipbench import sweep as sweeping

    with handled(force):
        given = setup_options(locals())
        grid = dict(exits=exits, speculations=speculations, strategies=strategies, backends=backends,
                    draft_models=list(draft_model) if draft_model else None, control=control)
        default = replace(DEFAULT_SWEEP, setup=dict(DEFAULT_SWEEP.setup), grid=dict(DEFAULT_SWEEP.grid))
        plan = sweeping.plan(sweep_file, given, grid, out_dir, default, compile=compile)
        plan.setup = allow_execution(plan.setup, execute_code, execute_code_uncontained)
        launch = launching.merged(plan.launch, launcher=launcher, workers=workers, address=address,
                                  gpus_per_worker=gpus_per_worker, partition=partition, time_min=time_min,
                                  max_parallel=max_parallel, detach=detach)
        began = time.perf_counter()
        outcome = sweeping.run(plan, force=force,
                               measure=lambda s, c, t, f: measure_and_print(s, c, t, f, report, launch=launch),
                               train=lambda options: run_train(train_config(**options)),
                               note=lambda text: console.print(escape(text)))
        for file in outcome.files:
            out.print(escape(f"wrote {file}"), soft_wrap=True)
        console.print(escape(f"sweep done in {sweeping.elapsed(began)}"))
    finish(outcome.stores, force)


@app.command()
def datasets(data_dir: str = DataDirOpt) -> None:
    """List the tasks, where each comes from, and whether it is available right now."""
    from skipbench.tasks import available_tasks

    table = Table(title="skipbench datasets")
    for name in ("task", "source", "available", "where / how"):
        table.add_column(name)
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
    model: str = typer.Option("synthetic:llama3-8b?agree=8", "--model", "-m"),
    draft_model: str = typer.Option("synthetic:llama3-8b?agree=8&layers=8", "--draft-model",
                                    help="Two-model draft ('' for none)."),
    exits: str = typer.Option("4,8,16", "--exits"), speculations: str = typer.Option("2,4,8", "--speculations"),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens"), new_tokens: int = typer.Option(128, "--new-tokens"),
    prompts: int = typer.Option(3, "--prompts", help="Prompts (each timed in every round)."),
    repeats: int = RepeatsOpt, hf: bool = typer.Option(True, "--hf/--no-hf"),
    compiled: bool = typer.Option(True, "--compiled/--no-compiled", help="Also the compiled engine."),
    dtype: str = typer.Option("auto", "--dtype"), device: str = typer.Option("auto", "--device"),
    threads: int = ThreadsOpt, out_dir: Path = typer.Option(None, "--out", "-o"),
) -> None:
    """The engine benchmark: native and transformers paths on one model vs the measured roofline.

    The default is the set-up of the reference figures in the README (Llama-3-8B shape, layers >= 8
    zeroed, bf16 on a GPU); on a CPU pick a model that fits, e.g. --model "synthetic:smollm2-135m?agree=8"."""
    from skipbench.benchmark import benchmark_markdown, run_benchmark

    with handled():
        target = out_dir or Path("runs") / f"benchmark-{time.strftime('%Y%m%d-%H%M%S')}"
        with RichProgress() as progress:
            summary = run_benchmark(model, draft_model or None, spec.parse_range(exits),
                                    spec.parse_range(speculations), target, prompt_tokens=prompt_tokens,
                                    new_tokens=new_tokens, prompts=prompts, repeats=repeats or 3, dtype=dtype,
                                    device=device, threads=threads, hf=hf, compiled=compiled, progress=progress)
        out.print(escape(benchmark_markdown(summary)))


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
    seed: int = typer.Option(0, "--seed"), device: str = typer.Option("auto", "--device"),
) -> None:
    """Train (or continue training) a Llama-family model with the LayerSkip recipe, or without it."""
    with handled():
        run_train(train_config(out_dir=out_dir, base=base, preset=preset, corpus=corpus, recipe=recipe,
                               layer_dropout_max=layer_dropout_max, early_exit_scale=early_exit_scale,
                               curriculum=curriculum, steps=steps, minutes=minutes, seq_len=seq_len,
                               batch_size=batch_size, lr=lr, vocab_size=vocab_size, seed=seed, device=device))


def train_config(**options):
    from skipbench.train import config_from

    return config_from(options)


def run_train(config) -> None:
    """Train with a progress bar, then print the agreement table."""
    from skipbench.train import train as run_training

    bar = RichBar(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                  TimeElapsedColumn(), console=console)
    with bar:
        task = bar.add_task("train", total=config.steps, stats="")

        def progress(step: int, total: int | None, loss: float, tokens_per_s: float) -> None:
            bar.update(task, completed=step, total=total, stats=f"loss {loss:.3f}  {tokens_per_s:,.0f} tok/s")

        result = run_training(config, progress=progress)
    table = Table(title=escape(f"{config.recipe} recipe: held-out loss {result.held_out_loss:.3f} after "
                               f"{result.steps} steps ({result.seconds:.0f} s)"))
    for name in ("after layer", "top-1 agreement with the final layer", "held-out loss"):
        table.add_column(name, justify="right")
    for layer, agreement in result.agreement_by_layer.items():
        table.add_row(str(layer), f"{agreement:.3f}", f"{result.loss_by_layer[layer]:.3f}")
    out.print(table)
    out.print(escape(f"checkpoint: {result.out_dir} (use --model {result.out_dir})"), soft_wrap=True)


def parse_fraction(text: str) -> float:
    """`5%` or `0.05` -> 0.05."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise spec.SpecError(f"cannot read {text!r} as a fraction; use 5% or 0.05") from None
    if not 0 <= value < 1:
        raise spec.SpecError(f"{text!r} must be a fraction in [0, 1)")
    return value


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
    from skipbench.store import RunStore
    from skipbench.summary import load_summary
    from skipbench.tables import efficiency_markdown, write_report

    with handled():
        store = RunStore(run_dir)
        store.read_manifest()  # one clear line when this is not a run directory
        store.read_cells()  # damaged cell files are set aside here, each with one warning line
        for problem in store.problems:
            console.print(f"[yellow]warning[/]: {escape(problem)}; rerun its sweep to recompute it", soft_wrap=True)
        if not store.has_cells():
            raise UserError(f"{run_dir} holds no finished cells yet: run or resume its sweep first")
        runs = [run_dir, *(overlay or [])]
        names = labels.split(",") if labels else [path.name for path in runs]
        if len(names) != len(runs):
            raise spec.SpecError(f"--labels gives {len(names)} labels for {len(runs)} runs")
        files = write_report(run_dir, peak_bandwidth=peak_bandwidth, peak_flops=peak_flops)
        if overlay:
            files += overlay_plot([load_summary(path)[0] for path in runs], names, run_dir / "plots" / "overlay")
        out.print(escape(efficiency_markdown(run_dir)))
        out.print(escape(f"wrote {len(files)} files under {run_dir}/tables and {run_dir}/plots"), soft_wrap=True)


@app.command()
def compare(
    base_dir: Path = typer.Argument(..., help="The baseline run (e.g. results/ci-smoke)."),
    new_dir: Path = typer.Argument(..., help="The run to check."),
    max_slowdown: str = typer.Option("5%", "--max-slowdown", help="A speedup may fall this much beyond the runs' "
                                     "intervals (5% or 0.05)."),
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
    for problem in comparison.problems:
        out.print(f"[red]regression[/]: {escape(problem)}")
    if not comparison.ok:
        raise typer.Exit(EXIT_REGRESSION)
    out.print("[green]no regression[/]")


def main() -> None:
    # Before transformers is imported (lazily, by the commands): its warnings would bury the tables.
    quiet_libraries()
    _on_sigint(_interrupted_at_start)  # until a command's own handling is in place
    try:
        app()
    except KeyboardInterrupt:  # before a command's own handler is in place (imports, parsing)
        console.print("[yellow]interrupted[/]")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    main()
