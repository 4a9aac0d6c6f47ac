"""The Ray launcher: one actor per device measures whole groups; the driver writes everything they send.

Each actor (num_gpus=--gpus-per-worker on a cluster with GPUs, a CPU worker otherwise) loads the models
once (`worker.Worker`) and streams a group's events back through a Ray generator; a thread per actor
hands them to `driver.Session.record`, so the run directory lives with the driver only (no shared file
system). Without a running cluster, `ray.init()` starts a local one. A dead actor costs its group's
cells in flight (recorded as failed, their rows kept); Ctrl-C kills the actors and keeps every row.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from dataclasses import asdict
from pathlib import Path

from skipbench import machine
from skipbench.errors import UserError
from skipbench.launch.driver import Group, Session
from skipbench.launch.plan import Launched, plan_groups
from skipbench.launch.progress import Board
from skipbench.launch.worker import Worker
from skipbench.launch_options import LaunchError, LaunchOptions, require
from skipbench.spec import Cell, Setup


def connect(ray, address: str | None) -> bool:
    """Join the cluster at `address` (auto: a running one, else an error), or without one a running cluster
    if any, else start a local one; True when this call started Ray (so it shuts it down again)."""
    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address:
        try:
            ray.init(address=address, **quiet)
        except ConnectionError as error:
            raise LaunchError(f"cannot reach a Ray cluster at {address}: {error}") from None
    else:
        ray.init(include_dashboard=False, **quiet)  # a running cluster (RAY_ADDRESS, `ray start`), else a new one
    return True


_launches = iter(range(1_000_000))


def worker_names(count: int) -> list[str]:
    """The actors' names in the cluster (and their worker ids in rows): unique per driver and launch, so a
    launch never meets the actors of an earlier one that are still being torn down."""
    launch = next(_launches)
    return [f"skipbench-{os.getpid()}-{launch}-w{index}" for index in range(count)]


def run(options: LaunchOptions, setup: Setup, cells: list[Cell], out_dir: Path, *, force: bool,
        board: Board) -> Launched:
    ray = require("ray")
    started = connect(ray, options.address)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if setup.device != "cpu" else 0
        if setup.device.startswith("cuda") and not gpus:
            raise LaunchError(f"--device {setup.device}, but the Ray cluster has no GPUs")
        per_worker = options.gpus_per_worker if gpus else 0
        fit = gpus // per_worker if per_worker else None
        workers = options.workers or fit or 2
        if fit is not None and workers > fit:
            board.note(f"note: {fit} worker(s) of {per_worker} GPU(s) fit the cluster's {gpus} GPUs, not {workers}")
            workers = fit
        if not workers:
            raise LaunchError(f"the Ray cluster's {gpus} GPU(s) hold no worker of {per_worker} GPUs")
        # CPU workers: a CPU each while the cluster has them; threads split the machine as a local run would.
        cpus = min(1.0, float(resources.get("CPU", 1)) / workers)
        threads = None if per_worker else max(1, machine.default_threads() // workers)
        launch = {"launcher": "ray", "workers": workers, "gpus_per_worker": per_worker}
        session = Session(setup, cells, out_dir, launch=launch, force=force, board=board)
        with session.open():
            board.start(sum(cell.method.speculates for cell in cells),
                        f"ray: {len(cells)} cell(s) of {setup.model} -> {out_dir}, {workers} "
                        f"{'GPU' if per_worker else 'CPU'} worker(s)")
            groups = session.pending(plan_groups(session.store, setup, cells, workers))
            if groups:
                actor = ray.remote(Worker)
                names = worker_names(min(workers, len(groups)))
                actors = {name: actor.options(name=name, num_gpus=per_worker, num_cpus=cpus, max_restarts=0)
                          .remote(asdict(setup), [asdict(cell) for cell in cells], name, threads)
                          for name in names}
                drive(ray, session, actors, groups, board)
        return Launched(session.store)
    finally:
        if started:
            ray.shutdown()


def drive(ray, session: Session, actors: dict, groups: list[Group], board: Board) -> None:
    """Each actor takes the next group while any is left; the main thread waits, so that Ctrl-C reaches it."""
    queue = deque(groups)
    take = threading.Lock()
    stop = threading.Event()
    fatal: list[BaseException] = []

    def serve(name: str, actor) -> None:
        while not stop.is_set():
            with take:
                if not queue:
                    return
                group = queue.popleft()
            try:
                stream = actor.run_group.options(num_returns="streaming").remote(
                    group.plain(), group.index, group.stored.rows)
                session.record(group, (ray.get(ref) for ref in stream), board.for_group(name, group.index))
            except UserError as error:  # the setup cannot run here (a worker's refusal): stop everything
                fatal.append(error)
                stop.set()
                return
            except ray.exceptions.RayActorError as error:
                if not stop.is_set():
                    session.lost(group, f"worker {name} died: {_last_line(error)}", name)
                return  # an actor that died takes no more groups
            except Exception as error:  # a worker's failure outside any cell: this group only
                if not stop.is_set():
                    session.lost(group, f"worker {name}: {_last_line(error)}", name)
            except BaseException as error:  # e.g. KeyboardInterrupt raised by a progress hook
                fatal.append(error)
                stop.set()
                return

    threads = [threading.Thread(target=serve, args=item, daemon=True) for item in actors.items()]
    try:
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(timeout=0.2)
            if stop.is_set():
                break
        if fatal:
            raise fatal[0]
    finally:
        stop.set()
        for actor in actors.values():  # Ctrl-C, a fatal error, or done: nothing of ours keeps running
            ray.kill(actor)
        for thread in threads:
            thread.join(timeout=30)
    for group in list(queue):  # every actor died before these groups were taken
        session.lost(group, "not measured: every worker died", "driver")


def _last_line(error: BaseException) -> str:
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
