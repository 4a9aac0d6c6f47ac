"""The library entry point of a remote launch: one worker measures whole groups of cells on its device.

A worker is built from plain data (the setup as a dict, the grid's cells as dicts), never from models:
it loads the target and draft models once, builds the prompts once, and then measures any number of
groups, yielding `measure.Event`s. Its first event for a group is a "worker" event carrying where it
runs (host, device and its UUID, worker id, library and driver versions) and the run's manifest as this
worker sees it, so the driver can write the manifest without loading a model itself.

Ray's actor wraps `Worker` and streams the events back to the driver, which records them (`driver`).
A Slurm array task calls `run_group_task`, which records into the shared run directory itself.
"""

from __future__ import annotations

import fcntl
import os
import platform
import subprocess
from collections.abc import Iterator
from dataclasses import replace

import torch
import transformers

import skipbench
from skipbench import spec
from skipbench.measure import Event, GroupRows, Progress, consolidate, measure, record
from skipbench.spec import Cell, Setup, cell_key
from skipbench.store import RunStore, device_name, git_commit
from skipbench.sweep import Loaded, load_run, refuse_other_inputs


def device_uuid(device: torch.device) -> str | None:
    """The GPU's UUID (two cards of one model tell apart by it); None on a CPU."""
    if device.type != "cuda":
        return None
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return str(uuid) if uuid is not None else None


def driver_version() -> str | None:
    """The NVIDIA driver's version, where nvidia-smi answers; None elsewhere."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


def where(device: torch.device, worker: str, threads: int) -> dict:
    """Where a worker measures: what a row needs to say which device timed it, and the versions behind it."""
    return {"host": platform.node(), "device": device_name(device), "device_uuid": device_uuid(device),
            "worker": worker, "pid": os.getpid(), "cpu_threads": threads if device.type == "cpu" else None,
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "cuda_version": torch.version.cuda, "driver_version": driver_version(),
            "python_version": platform.python_version(), "skipbench_version": skipbench.__version__,
            "git_commit": git_commit()}


class Worker:
    """Measures groups of one setup's cells on this process's device; models load on the first group."""

    def __init__(self, setup: dict, grid: list[dict], worker: str, threads: int | None = None):
        self.setup: Setup = spec.setup_from(setup)
        self.grid = [Cell(**cell) for cell in grid]  # every cell of the run: one engine capacity for all groups
        self.worker = worker
        self.threads = threads
        self.loaded: Loaded | None = None
        self.where: dict = {}

    def load(self) -> Loaded:
        """What `sweep.execute` loads (`sweep.load_run`), on this device, and where this worker measures."""
        self.loaded = load_run(self.setup, self.grid, threads=self.threads)
        self.where = where(self.loaded.target.model.device, self.worker, self.loaded.threads)
        return self.loaded

    def run_group(self, cells: list[dict], group: int, stored: dict[str, list[dict]]) -> Iterator[Event]:
        """Measure one group (cells as dicts, the baseline among them) after its `stored` rows, as events:
        first a "worker" event (where, and the manifest), "note"s for the user, then those of `measure.measure`."""
        loaded = self.loaded or self.load()
        setup = self.setup
        yield Event("worker", row={"where": self.where | {"group": group}, "manifest": loaded.manifest})
        for note in loaded.notes:
            yield Event("note", text=note)
        loaded.notes = []
        keyed = {cell_key(setup, cell): cell for cell in (Cell(**values) for values in cells)}
        # Rows say which device and worker timed them: the report never divides times across devices.
        extra = {"device_uuid": self.where["device_uuid"], "worker": self.worker}
        events = measure(keyed, loaded.runner(setup), loaded.prompt_set, GroupRows(stored), repeats=setup.repeats,
                         sampled=setup.sample, group=group)
        for event in events:
            if event.kind == "plan":  # something is measured: a busy machine concerns it (once per worker)
                yield from (Event("note", text=note) for note in loaded.busy)
                loaded.busy = []
            yield replace(event, row=event.row | extra) if event.kind == "row" else event


# --------------------------------------------------------------------------- the manifest, from any process


def update_manifest(store: RunStore, group: int, report: dict, launch: dict | None = None) -> None:
    """Add a worker's report (a "worker" event) to the run's manifest: the first report with models gives the
    models, prompts and provenance; every report adds its group's entry (host, device, UUID, versions).

    Slurm tasks call this concurrently on a shared file system: a lock file serializes them."""
    lock_path = store.root / "launch" / ".manifest.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            current = store.read_manifest() if store.manifest_path().is_file() else {}
            current.pop("schema_version", None)
            if current.get("models"):  # every worker must have read the same prompts and weights
                refuse_other_inputs(current, report["manifest"])
            manifest = current if current.get("models") else {**current, **report["manifest"]}
            manifest["cells"] = current.get("cells") or report["manifest"]["cells"]  # the whole grid
            groups = {**current.get("groups", {}), str(group): report["where"]}
            manifest["groups"] = {name: groups[name] for name in sorted(groups, key=int)}
            if launch is not None:
                manifest["launch"] = launch
            store.write_manifest(manifest)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- a Slurm array task


class LogProgress(Progress):
    """A task's progress as plain lines in its log (Slurm's output file)."""

    def __init__(self, group: int):
        self.group = group

    def plan(self, cells, generations: int, rounds: int) -> None:
        self.note(f"measuring {len(cells)} cells: {generations} generations in {rounds} round(s)")

    def round_done(self, round_index: int, rounds: int) -> None:
        self.note(f"round {round_index + 1}/{rounds} done")

    def cell_done(self, cell, status: str) -> None:
        self.note(f"{cell.label()}: {status}")

    def note(self, text: str) -> None:
        print(f"group {self.group}: {text}", flush=True)


def task_id() -> str:
    """This task's id in its scheduler (Slurm array job_task, or submitit's local job), else the pid."""
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and index:
        return f"slurm-{array}_{index}"
    for name in ("SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID"):
        if os.environ.get(name):
            return f"job-{os.environ[name]}"
    return f"pid-{os.getpid()}"


def run_group_task(task: dict) -> dict:
    """One Slurm array task: measure group `task["group"]` of the run in `task["run_dir"]` (a shared file
    system) and record it there: journal rows as they come, cell files when done, error records.

    `task` is plain data: run_dir, setup (dict), grid and cells (lists of dicts), group, launch (dict)."""
    store = RunStore(task["run_dir"])
    worker = Worker(task["setup"], task["grid"], task_id())
    setup = worker.setup
    keyed = {cell_key(setup, Cell(**values)): Cell(**values) for values in task["cells"]}
    group = task["group"]
    stored = consolidate(store, keyed, group)  # an earlier task's journal of this group, merged first

    def reported(events: Iterator[Event]) -> Iterator[Event]:
        for event in events:
            if event.kind == "worker":
                update_manifest(store, group, event.row, task.get("launch"))
            elif event.kind == "note":
                print(f"group {group}: {event.text}", flush=True)
            else:
                yield event

    rows = record(reported(worker.run_group(task["cells"], group, stored.rows)), store, keyed, stored,
                  LogProgress(group), group)
    return {"group": group, "worker": worker.worker, "rows": sum(len(value) for value in rows.rows.values())}
