"""The Slurm launcher: one array task per group, submitted with submitit; the run directory is shared.

Each array task runs `worker.run_group_task`: it loads the models, measures its group and records it into
the run directory itself (journal rows as they come, cell files when done), so the run directory must be
on a file system every node sees. Jobs get paths and plain data, never models. The driver holds the run's
lock, waits with a progress bar, and afterwards marks the cells of a task that failed or vanished (time
limit, preemption, a node lost) as failed. `--detach` returns after submitting: the submission is recorded
in RUN/launch/slurm.json, and a later sweep of the same run waits for those tasks instead of submitting
again, then collects. Ctrl-C cancels the tasks (scancel); their journaled rows are kept.

Without Slurm, submitit's "local" executor (subprocesses) or "debug" executor (in this process) run the
same path: `LaunchOptions.cluster`, or SKIPBENCH_SUBMITIT_CLUSTER=local|debug for the command line.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from skipbench.launch.driver import Group, Session
from skipbench.launch.plan import Launched, plan_groups
from skipbench.launch.progress import Board
from skipbench.launch.worker import run_group_task
from skipbench.launch_options import LaunchError, LaunchOptions, require
from skipbench.measure import GroupRows
from skipbench.spec import Cell, Setup, cell_key
from skipbench.store import RunStore, write_atomic

CLUSTER_ENV = "SKIPBENCH_SUBMITIT_CLUSTER"
CLUSTERS = ("slurm", "local", "debug")
DEFAULT_GROUPS = 8  # array tasks when neither --workers nor --max-parallel says
DEFAULT_TIME_MIN = 240  # submitit's own default is 5 minutes: far too short for a sweep


def record_path(store: RunStore) -> Path:
    return store.root / "launch" / "slurm.json"


@dataclass
class Task:
    """A submitted array task: its group, and the submitit job (live, or rebuilt from the record)."""

    group: Group
    job_id: str
    job: object
    cluster: str

    def finished(self) -> bool:
        if self.cluster == "local" and getattr(self.job, "_process", None) is None:
            # A local job rebuilt from the record (after --detach): its pid says whether it still runs.
            return self.job.paths.result_pickle.exists() or not _alive(int(self.job_id))
        return self.job.done()

    def state(self) -> str:
        if self.cluster == "local" and getattr(self.job, "_process", None) is None:
            return "RUNNING" if not self.finished() else "FINISHED"
        return str(self.job.state)

    def error(self) -> str | None:
        """None when the task ended well; else one line saying why (its exception, or how it vanished)."""
        try:
            error = self.job.exception()
        except Exception as problem:  # no result at all: killed, timed out, preempted, cancelled
            return f"task {self.job_id} ended without a result ({_last_line(problem)})"
        return None if error is None else f"task {self.job_id} failed: {_last_line(error)}"

    def cancel(self) -> None:
        try:
            if self.cluster == "local" and getattr(self.job, "_process", None) is None:
                os.kill(int(self.job_id), 2)  # SIGINT: submitit's local controller stops its task
            else:
                self.job.cancel(check=False)
        except Exception:  # already gone
            pass


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return fields[0] != "Z"  # a zombie has finished


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def make_executor(submitit, options: LaunchOptions, setup: Setup, folder: Path, cluster: str):
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster)
    parameters = {"name": "skipbench", "timeout_min": options.time_min or DEFAULT_TIME_MIN, "nodes": 1,
                  "tasks_per_node": 1}
    if cluster == "slurm" and setup.device != "cpu":
        parameters["gpus_per_node"] = options.gpus_per_worker
    if setup.threads:
        parameters["cpus_per_task"] = setup.threads
    if options.partition:
        parameters["slurm_partition"] = options.partition
    if options.max_parallel:
        parameters["slurm_array_parallelism"] = options.max_parallel
    executor.update_parameters(**parameters)
    return executor


def rebuild(submitit, record: dict, setup: Setup) -> list[Task]:
    """The tasks of a recorded submission, as submitit jobs again."""
    tasks = []
    for entry in record["tasks"]:
        cells = [Cell(**values) for values in entry["cells"]]
        group = Group(entry["group"], {cell_key(setup, cell): cell for cell in cells}, GroupRows())
        if record["cluster"] == "slurm":
            job = submitit.SlurmJob(folder=record["folder"], job_id=entry["job_id"])
        else:
            from submitit.local.local import LocalJob

            job = LocalJob(folder=record["folder"], job_id=entry["job_id"])
        tasks.append(Task(group, entry["job_id"], job, record["cluster"]))
    return tasks


def run(options: LaunchOptions, setup: Setup, cells: list[Cell], out_dir: Path, *, force: bool,
        board: Board, poll_s: float | None = None) -> Launched:
    submitit = require("slurm")
    cluster = options.cluster or os.environ.get(CLUSTER_ENV) or "slurm"
    if cluster not in CLUSTERS:
        raise LaunchError(f"submitit cluster must be one of {', '.join(CLUSTERS)} (got {cluster!r})")
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise LaunchError("the slurm launcher found no Slurm here (no sbatch on PATH): run the sweep on the "
                          "cluster's login node")
    if options.detach and cluster == "debug":
        raise LaunchError("--detach needs jobs that run on their own; submitit's debug executor runs them here")
    poll = poll_s or (15.0 if cluster == "slurm" else 0.5)
    out_dir = out_dir.resolve()  # tasks on other nodes resolve nothing against this shell's directory
    groups_wanted = options.workers or options.max_parallel or DEFAULT_GROUPS
    launch = {"launcher": "slurm", "cluster": cluster, "groups": groups_wanted}
    session = Session(setup, cells, out_dir, launch=launch, force=force, board=board)
    store = session.store
    with session.open():
        board.start(sum(cell.method.speculates for cell in cells),
                    f"slurm: {len(cells)} cell(s) of {setup.model} -> {out_dir}")
        path = record_path(store)
        if path.is_file():  # an earlier (detached or interrupted) submission: wait for it, never submit twice
            earlier = rebuild(submitit, json.loads(path.read_text()), setup)
            running = [task for task in earlier if not task.finished()]
            if running and options.detach:
                return Launched(store, len(running), f"{len(running)} task(s) of the earlier submission still "
                                                     f"run; rerun without --detach to wait for them")
            if running:
                board.note(f"waiting for {len(running)} task(s) submitted earlier")
            wait(session, earlier, poll)
            path.unlink()
        groups = session.pending(plan_groups(store, setup, cells, groups_wanted))
        if not groups:
            return Launched(store)
        executor = make_executor(submitit, options, setup, store.root / "launch" / "slurm", cluster)
        grid = [asdict(cell) for cell in cells]
        jobs = executor.map_array(run_group_task, [
            {"run_dir": str(out_dir), "setup": asdict(setup), "grid": grid, "cells": group.plain(),
             "group": group.index, "launch": launch} for group in groups])
        tasks = [Task(group, str(job.job_id), job, cluster) for group, job in zip(groups, jobs, strict=True)]
        write_atomic(path, json.dumps({"cluster": cluster, "folder": str(store.root / "launch" / "slurm" / "%j"),
                                       "tasks": [{"group": task.group.index, "job_id": task.job_id,
                                                  "cells": task.group.plain()} for task in tasks]}).encode())
        board.note(f"submitted {len(tasks)} task(s): job {tasks[0].job_id.split('_')[0]}")
        if options.detach:
            return Launched(store, len(tasks), f"submitted {len(tasks)} task(s); rerun the same command to wait "
                                               f"for them and collect (skipbench report {out_dir} shows what "
                                               f"has finished)")
        wait(session, tasks, poll)
        path.unlink()
    return Launched(store)


def wait(session: Session, tasks: list[Task], poll: float) -> None:
    """Until every task has ended; each task's line says its state and the generations it has journaled.
    A task that failed or vanished has its unfinished cells recorded as failed. Ctrl-C cancels every task
    (their journals stay, and the rerun resumes them)."""
    store, board = session.store, session.board
    waiting = list(tasks)
    try:
        while waiting:
            for task in list(waiting):
                worker = f"g{task.group.index}"
                if not task.finished():
                    rows = len(store.read_journal(task.group.index))
                    board.state(worker, f"job {task.job_id}: {task.state()}, {rows} generations journaled")
                    continue
                waiting.remove(task)
                message = task.error()
                lost = session.lost(task.group, message, worker) if message is not None else []
                errors = {entry.get("cell_key"): entry.get("error") for entry in store.errors()}
                for key, cell in task.group.cells.items():
                    if cell.method.speculates and cell not in lost:
                        board.cell_done(worker, cell, f"failed: {errors[key]}" if key in errors else "done")
                board.state(worker, f"job {task.job_id}: {'failed' if message else 'done'}")
            if waiting:
                time.sleep(poll)
    except BaseException:
        for task in tasks:
            task.cancel()
        record_path(store).unlink(missing_ok=True)  # cancelled: the rerun consolidates and submits again
        raise
