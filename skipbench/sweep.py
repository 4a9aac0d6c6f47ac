"""Run sweeps: a setup and its cells into a run directory, several tasks, trained models, resume.

`execute` measures one setup's cells: every knob is checked before a model loads, the models are loaded
once, the prompts built once, and the cells measured as one group (see `measure`). Rerunning the same
run directory resumes it: finished cells are skipped and an interrupted session's journal is kept.
A directory holds one setup: other settings are refused, and `force` deletes its cells and starts over.

`plan` and `run` turn a sweep file plus overrides into runs: one per task, optionally after training
the models a file names, with the per-task table and the overlay of trained models at the end.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from skipbench import calibrate, machine, models, placement, spec
from skipbench.costs import ModelShape, dtype_bytes
from skipbench.decoding.layers import DecoderStack, EngineError
from skipbench.errors import UserError
from skipbench.measure import CellRunner, Progress, measure_group, used_devices
from skipbench.methods import BuildContext, compiled_backend
from skipbench.models import LoadedModel, check_vocab_match, load_model, num_layers_of, resolve_device
from skipbench.prompts import PromptSet, build_prompts, greedy_answerer, load_examples
from skipbench.spec import Cell, Setup, SpecError, cell_key
from skipbench.store import RunStore, manifest_for


class RunError(UserError):
    """The run as a whole cannot go on; one line for the user."""


def check_plan(setup: Setup, cells: list[Cell]) -> None:
    """Every knob checked before any model is loaded."""
    setup.check()
    resolve_device(setup.device)  # --device cuda on a machine without one: refused before anything loads
    if not cells:
        raise SpecError("no cells to run")
    layers = num_layers_of(setup.model)
    for cell in cells:
        cell.check(layers)


def refuse_unsupported(cells: list[Cell], target: LoadedModel, drafts: dict[str, LoadedModel]) -> None:
    """A method that cannot drive these models' architecture is refused before anything is timed or written
    (skipbench's engine drives Llama-family models; transformers' early exit needs one as well)."""
    checked = set()
    for cell in cells:
        draft = drafts.get(cell.draft_model) if cell.draft_model else None
        if (cell.method.check_models, cell.draft_model) in checked:
            continue
        try:
            cell.method.check_models(cell, target, draft)
        except EngineError as error:
            raise RunError(str(error)) from None
        checked.add((cell.method.check_models, cell.draft_model))


def model_info(loaded: LoadedModel) -> dict:
    config = loaded.model.config
    return {"name": loaded.name, "source": loaded.source, "revision": loaded.revision,
            "synthetic": loaded.synthetic, "num_layers": config.num_hidden_layers,
            "num_params": loaded.num_params, "config": config.to_dict()}


def _jsonable(value):
    """What a value looks like after a JSON round trip (tuples become lists), to compare manifests."""
    return json.loads(json.dumps(value, default=str))


def _differences(previous: dict, setup: Setup) -> list[str]:
    now = _jsonable(asdict(setup))
    return sorted(name for name in set(previous) | set(now)
                  if name not in spec.MEASUREMENT_ONLY and previous.get(name) != now.get(name))


def refuse_other_settings(store: RunStore, setup: Setup, force: bool) -> None:
    """A run directory holds one setup: another is refused (unless --force), naming what differs."""
    if store.manifest_path().is_file() and not force:
        changed = _differences(store.read_manifest().get("setup") or {}, setup)
        if changed:
            raise RunError(f"{store.root} holds a run with other settings ({', '.join(changed)} differ); choose "
                           f"another --out, or --force to delete its cells and start over")


@dataclass
class Loaded:
    """A run's models, prompts and engines, loaded once for all its cells (here, or on a remote worker)."""

    target: LoadedModel
    drafts: dict[str, LoadedModel]
    prompt_set: PromptSet
    context: BuildContext
    manifest: dict  # what the run directory records: setup, cells, models (with calibrations), prompts
    threads: int
    before: dict  # the machine before loading added to its load
    notes: list[str]  # for the user, once: prompts cut or fewer than asked
    busy: list[str] = field(default_factory=list)  # a busy machine: for the user once, if anything is measured

    def runner(self, setup: Setup) -> Callable[[Cell], CellRunner]:
        devices = used_devices(self.target, *self.drafts.values())  # every row of the run: the same device set
        return lambda cell: CellRunner(cell, setup, self.target, self.drafts.get(cell.draft_model), self.prompt_set,
                                       self.context, devices)


def config_of(name: str):
    """A model's config without its weights when that is cheap (synthetic, smollm2-135m, a local directory)."""
    if name.startswith("synthetic:"):
        return models.synthetic_config(name)
    if name == "smollm2-135m":
        return models.LlamaConfig(**models.PRESETS["smollm2-135m"])
    if (Path(name).expanduser() / "config.json").is_file():
        try:
            return models.pretrained_config(name)
        except models.ModelError:
            return None  # loading it will say what is wrong
    return None


def check_run_memory(names: list[str], dtype: str, device: str) -> None:
    """Refuse a run whose models (the target and every draft) do not fit together, before loading any."""
    configs = {name: config_of(name) for name in dict.fromkeys(names)}
    known = {name: config for name, config in configs.items() if config is not None}
    if len(known) < 2:
        return  # one model: loading it checks it
    torch_device = resolve_device(device)
    first, *rest = known
    try:
        models.check_memory(first, known[first], models.resolve_dtype(dtype, torch_device), torch_device,
                     others={name: known[name] for name in rest})
    except (TypeError, AttributeError, ValueError):  # a config of another shape: loading will tell
        return


def present_devices(device: str) -> list[placement.Device]:
    """This machine's devices with the memory free on each now: every GPU torch sees, else the CPU."""
    if resolve_device(device).type == "cuda":
        return [placement.Device(f"cuda:{index}", models.available_memory(torch.device(f"cuda:{index}")) or 0)
                for index in range(torch.cuda.device_count())]
    return [placement.Device("cpu", models.available_memory(torch.device("cpu")) or 0)]


def place_run(setup: Setup, names: list[str]) -> dict[str, placement.Placement]:
    """With --device-map, each model's placement (the target's as asked; each draft model's own, on what the
    models before it left) and every device's memory checked before anything loads; {} without one."""
    if setup.device_map is None:
        return {}
    devices = present_devices(setup.device)
    size = dtype_bytes(models.resolve_dtype(setup.dtype, resolve_device(setup.device)))
    kv_tokens = (setup.max_prompt_tokens or 0) + (setup.max_new_tokens or 0)  # known before prompts are built
    table: dict[str, placement.DeviceMemory] = {}
    placed = {}
    for index, name in enumerate(dict.fromkeys(names)):
        config = config_of(name) or models.pretrained_config(name)
        shape = ModelShape.from_config(config, bytes_per_param=size)
        mode = setup.device_map if index == 0 or setup.device_map in placement.MODES else "sequential"
        used = {device: entry.total for device, entry in table.items()}
        placed[name] = placement.resolve(mode, shape, devices, kv_tokens=kv_tokens, used=used)
        placement.check_present(placed[name], devices, f"model {name}")
        placement.memory(shape, placed[name], kv_tokens, table, draft=index > 0)
    placement.check_fits(table, devices, " with ".join(placed))
    return placed


def load_run(setup: Setup, cells: list[Cell], *, threads: int | None = None,
             loader: Callable[..., LoadedModel] = load_model) -> Loaded:
    """Load what measuring `cells` needs on this process's device: the target and every draft model (once),
    the prompts, each model's calibration for the time model, and the engines' shared context. Models an
    architecture cannot run are refused here, before anything is timed."""
    threads = threads or setup.threads or machine.default_threads()
    if setup.device != "cuda" and not setup.device.startswith("cuda:"):
        torch.set_num_threads(threads)
    before = machine.state(threads)  # before our own loading adds to the load average
    examples = load_examples(setup)  # an empty or unreadable prompt set is refused before any model loads
    largest = max(cell.batch_size for cell in cells)
    if largest > len(examples.examples):  # a cell labelled B=4 that decoded batches of 3 would misreport itself
        raise SpecError(f"--batch-sizes {largest} is larger than the {len(examples.examples)} prompt(s) of this run: "
                        f"give at least {largest} prompts, or batch sizes up to {len(examples.examples)}")
    names = [setup.model, *sorted({cell.draft_model for cell in cells if cell.draft_model})]
    placed = place_run(setup, names)  # --device-map: each device's memory checked, before any model loads
    if not placed:
        check_run_memory(names, setup.dtype, setup.device)  # every model the run loads, together
    where = {name: {"placement": placed[name]} if name in placed else {} for name in names}
    target = loader(setup.model, dtype=setup.dtype, device=setup.device, **where[setup.model])
    drafts: dict[str, LoadedModel] = {}
    for name in names[1:]:
        drafts[name] = loader(name, dtype=setup.dtype, device=setup.device, **where[name])
        check_vocab_match(target, drafts[name])
    refuse_unsupported(cells, target, drafts)
    prompt_set = build_prompts(setup, target.tokenizer, max_positions=target.max_positions, loaded=examples,
                               answer=greedy_answerer(target.model, target.tokenizer))
    lengths = sorted(len(prompt.token_ids) for prompt in prompt_set.prompts)
    most_drafts = max(cell.num_speculations or 0 for cell in cells)
    sizes = calibrate.block_sizes(lengths[-1], most_drafts)
    typical = lengths[len(lengths) // 2] + prompt_set.max_new_tokens // 2  # the context of a typical step
    rows = calibrate.batch_contexts([len(prompt.token_ids) for prompt in prompt_set.prompts],
                                    calibrate.batch_rows({cell.batch_size for cell in cells}, len(lengths)),
                                    prompt_set.max_new_tokens)
    infos = {name: model_info(loaded) | {"calibration": _calibration(loaded, sizes, typical, rows, most_drafts)}
             for name, loaded in (("target", target), *drafts.items())}
    manifest = manifest_for(setup, cells, models={"target": infos.pop("target"), "drafts": infos},
                            prompts=prompt_set.describe(), dtype=target.model.dtype, machine={"before": before},
                            device=used_devices(target, *drafts.values()) if placed else target.model.device,
                            placements={name: where.describe() for name, where in placed.items()})
    context = BuildContext.for_run(cells, lengths[-1], prompt_set.max_new_tokens, len(lengths))
    busy = machine.busy_warning(before, when="before")
    return Loaded(target, drafts, prompt_set, context, manifest, threads, before, list(prompt_set.notes),
                  [f"warning: {busy}"] if busy else [])


def refuse_other_inputs(previous: dict, manifest: dict) -> None:
    """The same setup read other inputs: a prompt file edited, a checkpoint retrained in place. Their rows
    cannot be mixed with the stored ones."""
    differences = []
    hashes = [(m.get("prompts") or {}).get("prompt_set_hash") for m in (previous, manifest)]
    if None not in hashes and hashes[0] != hashes[1]:
        differences.append(f"the prompts (prompt-set hash {hashes[0]} then {hashes[1]})")
    models = [m.get("models") or {} for m in (previous, manifest)]
    for role, before, now in [("model", models[0].get("target") or {}, models[1].get("target") or {}),
                              *[(f"draft {name}", info, (models[1].get("drafts") or {}).get(name) or {})
                                for name, info in (models[0].get("drafts") or {}).items()]]:
        if before.get("revision") and now.get("revision") and before["revision"] != now["revision"]:
            differences.append(f"the {role} (revision {before['revision']} then {now['revision']})")
    if differences:
        raise RunError(f"the run's inputs changed since its cells were measured: {'; '.join(differences)}; choose "
                       f"another --out, or --force to delete its cells and start over")


def execute(setup: Setup, cells: list[Cell], out_dir: Path | str, *, force: bool = False,
            progress: Progress | None = None, loader: Callable[..., LoadedModel] = load_model) -> RunStore:
    """Measure `cells` on `setup` into `out_dir`; return its store (its `problems` and errors say what failed)."""
    progress = progress or Progress()
    check_plan(setup, cells)
    store = RunStore(out_dir)
    with store.lock():
        refuse_other_settings(store, setup, force)
        loaded = load_run(setup, cells, loader=loader)
        if store.manifest_path().is_file() and not force:
            refuse_other_inputs(store.read_manifest(), loaded.manifest)
        # Everything is known to work from here on: only now is a --force restart allowed to delete.
        if force:
            store.clear()
        for note in loaded.notes:
            progress.note(note)
        manifest = loaded.manifest
        store.write_manifest(manifest)
        keyed = {cell_key(setup, cell): cell for cell in cells}
        measured = measure_group(keyed, loaded.runner(setup), loaded.prompt_set, store, repeats=setup.repeats,
                                 sampled=setup.sample, progress=progress, when_measuring=loaded.busy)
        after = machine.state(loaded.threads)
        compiled, graphs = loaded.context.compile_seconds(), loaded.context.compiled_graphs()
        if compiled:
            progress.note("compile time (outside every cell's time): " + ", ".join(
                f"{name} {seconds:.1f} s ({graphs[name]} graphs)" for name, seconds in compiled.items()))
        store.write_manifest({**manifest, "provenance": {**manifest["provenance"], "compile_seconds": compiled,
                                                         "compiled_graphs": graphs,
                                                         "machine": {"before": loaded.before, "after": after}}})
        # A session that measured nothing (a resume of a finished run) timed nothing a busy machine could spoil.
        if measured.session and (warning := machine.busy_warning(after, when="after")) is not None:
            progress.note(f"warning: {warning}")
        if measured.session and (warning := machine.preempted_warning(measured.session)) is not None:
            progress.note(f"warning: {warning}")
        for problem in store.problems:
            progress.note(f"note: {problem}")
    return store


def _calibration(loaded: LoadedModel, sizes: list[int], context: int, rows: dict[int, int],
                 most_drafts: int) -> dict | None:
    """Measured layer and head times per block size and number of rows (for the time model), where the engine
    can drive the model."""
    try:
        stack = DecoderStack(loaded.model, placement=loaded.placement)
    except EngineError:
        return None
    return calibrate.measure(stack, sizes, context, rows, most_drafts)


# --------------------------------------------------------------------------- sweeps of files, tasks, models


@dataclass
class Plan:
    """What a `skipbench sweep` does: a setup, its cells, the tasks, where, and models to train first."""

    setup: Setup
    cells: list[Cell]
    tasks: list[str]
    out: Path
    train: list[dict] = field(default_factory=list)
    launch: dict = field(default_factory=dict)  # the sweep file's [launch] table


def run_dir_name(setup: Setup, cells: list[Cell], what: str) -> Path:
    """A run directory derived from what is measured, so rerunning the same command finds it (resume)."""
    slug = "".join(c if c.isalnum() or c in "-." else "-" for c in setup.model.split("/")[-1])[:40].strip("-")
    material = json.dumps({"setup": spec.identity_fields(setup),
                           "cells": [spec.described(cell) for cell in cells]}, sort_keys=True, default=list)
    return Path("runs") / f"{slug}-{what}-{hashlib.sha256(material.encode()).hexdigest()[:8]}"


def plan(sweep_file: str | None, setup_options: dict, grid_options: dict, out: Path | None,
         default_file: spec.SweepFile, *, compile: bool = False) -> Plan:
    """A sweep file (or the default sweep) with the command line's options laid over it; `compile` runs
    skipbench's engine compiled (`methods.compiled_backend`)."""
    loaded = spec.load_sweep_file(sweep_file) if sweep_file else default_file
    given = {key: value for key, value in setup_options.items() if value is not None}
    loaded = replace(loaded, setup=dict(loaded.setup), grid=dict(loaded.grid))  # the caller's stays as it was
    if sweep_file is None and (given.get("dataset") or given.get("prompts")):
        # The default sweep's prompt count, lengths and stops were chosen for its task: another task (or
        # --prompt texts) takes its own defaults wherever the command line says nothing.
        loaded.setup = {key: value for key, value in loaded.setup.items() if key == "model"}
    # A file's `dataset` may list several tasks; --dataset (repeatable) or --prompt replaces it.
    file_tasks = loaded.setup.pop("dataset", None)
    datasets = given.pop("dataset", None)
    if datasets:
        tasks = list(datasets)
    elif given.get("prompts"):
        tasks = []
        if file_tasks:  # the file's num_samples counted its dataset's examples, not these prompts
            loaded.setup.pop("num_samples", None)
    else:
        tasks = file_tasks if isinstance(file_tasks, list) else [file_tasks] if file_tasks else []
    setup = spec.override(spec.setup_from(loaded.setup, origin=sweep_file), **given)
    grid_values = dict(loaded.grid) | {key: value for key, value in grid_options.items() if value is not None}
    cells = spec.grid_from(grid_values).expand()
    if compile:
        cells = list(dict.fromkeys(replace(cell, backend=compiled_backend(cell.backend)) for cell in cells))
    target = out or (Path(loaded.out) if loaded.out else run_dir_name(setup, cells, "sweep"))
    return Plan(setup, cells, tasks, Path(target), loaded.train, loaded.launch)


def task_dir(task: str) -> str:
    """A directory name for a task (jsonl:PATH becomes jsonl-<file stem>)."""
    return f"jsonl-{Path(task[6:]).stem}" if task.startswith("jsonl:") else task


@dataclass
class Outcome:
    """What a sweep produced: the runs (one per task and trained model) and extra files written."""

    stores: list[RunStore] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def run_tasks(setup: Setup, tasks: list[str], cells: list[Cell], target: Path, *, force: bool,
              measure: Callable[[Setup, list[Cell], Path, bool], RunStore],
              task_table: Callable[[Path, dict[str, Path]], list[Path]]) -> Outcome:
    """One run per task (in TARGET/<task> when there are several), then the per-task speedup table, which
    `task_table(parent, {task: run directory})` writes (tables sit above this layer)."""
    if len(tasks) < 2:
        chosen = replace(setup, dataset=tasks[0]) if tasks else setup
        return Outcome([measure(chosen, cells, target, force)])
    stores = [measure(replace(setup, dataset=task), cells, target / task_dir(task), force) for task in tasks]
    files = task_table(target, {task: store.root for task, store in zip(tasks, stores, strict=True)})
    return Outcome(stores, files)


def run(sweep: Plan, *, force: bool, measure: Callable[[Setup, list[Cell], Path, bool], RunStore],
        train: Callable[[dict], None], note: Callable[[str], None],
        task_table: Callable[[Path, dict[str, Path]], list[Path]],
        overlay: Callable[[list[Path], list[str], Path], list[Path]]) -> Outcome:
    """The whole sweep. With [[train]] entries: train each model (unless its checkpoint exists), sweep it,
    and overlay the runs. `measure` runs one setup (the CLI's adds progress and a report), `train` one model,
    `task_table` writes a multi-task sweep's per-task table, `overlay(run directories, labels, out)` the
    overlay plots of the trained models' runs (the report layer, above this one, provides both)."""
    if not sweep.train:
        return run_tasks(sweep.setup, sweep.tasks, sweep.cells, sweep.out, force=force, measure=measure,
                         task_table=task_table)
    runs: list[Outcome] = []
    for entry in sweep.train:
        checkpoint = Path(entry["out_dir"])
        if (checkpoint / "config.json").is_file():
            note(f"reusing {checkpoint} for {entry['label']}")
        else:
            note(f"training {entry['label']} -> {checkpoint}")
            train({key: value for key, value in entry.items() if key != "label"})
        runs.append(run_tasks(replace(sweep.setup, model=str(checkpoint)), sweep.tasks, sweep.cells,
                              sweep.out / entry["label"], force=force, measure=measure, task_table=task_table))
    outcome = Outcome([store for result in runs for store in result.stores])
    labels = [entry["label"] for entry in sweep.train]
    for index, task in enumerate(sweep.tasks or [None]):
        name = "overlay" if len(sweep.tasks) < 2 else f"overlay_{task_dir(task)}"
        outcome.files += overlay([result.stores[index].root for result in runs], labels, sweep.out / name)
    return outcome


def elapsed(began: float) -> str:
    seconds = time.perf_counter() - began
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"
