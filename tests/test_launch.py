"""Launchers: groups of cells on Ray workers and Slurm array tasks (submitit), with the local launcher's
guarantees: the same counts and tokens, resume whichever worker wrote a cell, a lost worker costs only its
group in flight, Ctrl-C keeps every journaled row, and reports never divide times across devices."""

import json
import sys
import time

import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench import launch
from skipbench.cli import app
from skipbench.launch import LaunchError, LaunchOptions, local, options_from, partition, plan_groups
from skipbench.launch.progress import Board
from skipbench.measure import Progress
from skipbench.report import write_report
from skipbench.spec import Cell, Grid, Setup, SpecError, cell_key, load_sweep_file
from skipbench.store import RunStore
from skipbench.summary import MixedDevices, device_slug, load_summary, run_devices
from skipbench.tables import efficiency_markdown

SETUP = Setup(model="synthetic:tiny?agree=2", prompts=("one", "two three", "four five six"), max_new_tokens=8,
              warmup=0, repeats=2, threads=1)
CELLS = Grid(exits=(1, 2, 3), speculations=(2, 4)).expand()  # the baseline and 6 cells
COUNTS = ["new_tokens", "drafted", "accepted", "verify_steps"]


def first_rows(root) -> dict:
    """(cell identity, prompt) -> the counts and tokens of its first row: what must not depend on the worker."""
    frame = RunStore(root).read_cells()
    found = {}
    for row in frame.sort_values("round").to_dict("records"):
        found.setdefault((Cell.from_record(row).identity(), row["prompt_index"]),
                         (*(int(row[name]) for name in COUNTS), tuple(row["tokens"])))
    return found


def complete(root, setup=SETUP, cells=CELLS) -> bool:
    """Every cell holds `repeats` rows of every prompt (a baseline: in every group it was measured in)."""
    frame = RunStore(root).read_cells()
    for cell in cells:
        rows = frame[frame["cell_key"] == cell_key(setup, cell)]
        for _, group in rows.groupby("group"):
            if group.groupby("prompt_index").size().reindex(range(len(setup.prompts)), fill_value=0).min() \
                    < setup.repeats:
                return False
        if rows.empty:
            return False
    return True


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The local launcher's run of SETUP x CELLS."""
    root = tmp_path_factory.mktemp("local")
    local.run(SETUP, CELLS, root)
    return root


# --------------------------------------------------------------------------- groups and options


def test_partition_spreads_cells_round_robin_and_gives_every_group_its_baseline():
    baseline, *rest = CELLS
    groups = partition(CELLS, 2)
    assert groups == [[baseline, *rest[0::2]], [baseline, *rest[1::2]]]
    assert partition(CELLS, 1) == [CELLS] and len(partition(CELLS, 50)) == 6
    assert partition(CELLS, 3) == partition(CELLS, 3)  # deterministic: a rerun forms the same groups
    mixed = Grid(exits=(1,), speculations=(2, 4), backends=("native", "hf"), control=True).expand()
    for group in partition(mixed, 4):
        speculating = [cell for cell in group if cell.method.speculates]
        assert len(speculating) == 1
        backend = speculating[0].backend
        # Its backend's baseline and A/A control; an hf baseline's own speedup divides by the native one's.
        wanted = [Cell("autoregressive"), Cell("autoregressive", backend=backend)] if backend != "native" else [
            Cell("autoregressive")]
        assert group[:-1] == [*wanted, Cell("autoregressive", backend=backend, replica=1)]


def test_launch_options_are_checked_and_a_sweep_file_may_hold_them(tmp_path):
    assert options_from({}) == LaunchOptions()
    assert options_from({"launcher": "ray", "workers": 4, "address": "auto"}).workers == 4
    for values, message in [({"launcher": "rya"}, "launcher must be one of local, ray, slurm"),
                            ({"launcher": "ray", "partition": "gpu"}, "--partition is an option of the slurm"),
                            ({"launcher": "slurm", "workers": 0}, "--workers must be >= 1"),
                            ({"launcher": "slurm", "time_min": "1h"}, "time_min must be a whole number"),
                            ({"workers": 2}, "--workers needs --launcher ray or slurm"),
                            ({"launcher": "ray", "nodes": 2}, "unknown launch key(s) nodes")]:
        with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
            options_from(values)
    file = tmp_path / "sweep.toml"
    file.write_text('[setup]\nmodel = "synthetic:tiny"\n[launch]\nlauncher = "slurm"\npartition = "gpu"\n'
                    'max_parallel = 8\n')
    loaded = load_sweep_file(str(file))
    assert launch.merged(loaded.launch).partition == "gpu"
    # --launcher on the command line wins, and drops the file's options of other launchers.
    assert launch.merged(loaded.launch, launcher="ray", workers=2) == LaunchOptions("ray", workers=2)
    file.write_text('[launch]\nlauncher = "slurm"\npartition = 3\n')
    with pytest.raises(SpecError, match=r"sweep file .*: \[launch\] partition must be str"):
        load_sweep_file(str(file))


def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    with pytest.raises(LaunchError, match=r"^the ray launcher needs Ray: pip install 'skipbench\[ray\]'$"):
        launch.require("ray")
    result = CliRunner().invoke(app, ["sweep", "--model", "synthetic:tiny", "-p", "x", "--exits", "1",
                                      "--launcher", "ray", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "the ray launcher needs Ray: pip install 'skipbench[ray]'" in " ".join(result.output.split())
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- Slurm, through submitit


@pytest.fixture
def submitit():
    return pytest.importorskip("submitit", reason="the slurm extra is not installed: pip install -e '.[slurm]'")


def slurm(root, **options):
    return launch.run(LaunchOptions(launcher="slurm", **options), SETUP, CELLS, root, force=False)


def test_slurm_tasks_through_submitits_debug_executor_match_the_local_launcher(submitit, tmp_path, reference):
    launched = slurm(tmp_path, cluster="debug", workers=2)
    assert launched.running == 0 and complete(tmp_path)
    assert first_rows(tmp_path) == first_rows(reference)  # counts and tokens do not depend on the launcher
    manifest = RunStore(tmp_path).read_manifest()
    assert set(manifest["groups"]) == {"0", "1"} and manifest["models"]["target"]["synthetic"]
    assert manifest["launch"]["launcher"] == "slurm" and not (tmp_path / "launch" / "slurm.json").exists()
    frame = RunStore(tmp_path).read_cells()
    assert set(frame["group"]) == {0, 1} and frame["worker"].notna().all() and "device_uuid" in frame
    assert RunStore(tmp_path).errors() == []


def test_finished_cells_are_skipped_whatever_launcher_or_group_count_comes_next(submitit, tmp_path):
    slurm(tmp_path, cluster="debug", workers=2)
    store = RunStore(tmp_path)
    stamps = {path: path.stat().st_mtime_ns for path in store.cells_dir.glob("*.parquet")}
    # Three groups now: every cell stays in the group that holds its rows, so nothing is measured again.
    planned = plan_groups(store, SETUP, CELLS, 3)
    assert sorted(planned) == [0, 1] and planned == dict(enumerate(partition(CELLS, 2)))
    slurm(tmp_path, cluster="debug", workers=3)

    class Count(Progress):
        generations = 0

        def generation_done(self, cell, row):
            Count.generations += 1

    local.run(SETUP, CELLS, tmp_path, progress=Count())  # the local launcher skips the other group's cells too
    assert Count.generations == 0
    assert {path: path.stat().st_mtime_ns for path in store.cells_dir.glob("*.parquet")} == stamps
    assert set(RunStore(tmp_path).read_manifest()["groups"]) == {"0", "1"}


def test_a_detached_submission_is_reported_and_collected_by_a_later_sweep(submitit, tmp_path, reference):
    launched = slurm(tmp_path, cluster="local", workers=2, detach=True)
    assert launched.running == 2 and "rerun the same command" in launched.note
    record = json.loads((tmp_path / "launch" / "slurm.json").read_text())
    assert [task["group"] for task in record["tasks"]] == [0, 1]
    tasks = launch.slurm.rebuild(submitit, record, SETUP)
    deadline = time.monotonic() + 120
    while not all(task.finished() for task in tasks) and time.monotonic() < deadline:
        time.sleep(0.5)
    # The tasks wrote their cells and the manifest themselves: `report` reads them before any collection.
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "self E=1 K=2" in result.output and "self E=3 K=4" in result.output  # both groups' cells
    again = slurm(tmp_path, cluster="local", workers=2)  # collects: nothing left to submit
    assert again.running == 0 and not (tmp_path / "launch" / "slurm.json").exists()
    assert complete(tmp_path) and first_rows(tmp_path) == first_rows(reference)


def test_the_sweep_command_launches_on_slurm(submitit, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPBENCH_SUBMITIT_CLUSTER", "debug")
    args = ["sweep", "--model", "synthetic:tiny?agree=2", "-p", "one", "-p", "two", "--max-new-tokens", "6",
            "--exits", "1,2", "--speculations", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--out", str(tmp_path), "--no-report"]
    result = CliRunner().invoke(app, [*args, "--launcher", "slurm", "--workers", "2", "--time-min", "30"])
    assert result.exit_code == 0, result.output
    assert "self E=2 K=2" in result.output and set(RunStore(tmp_path).read_cells()["group"]) == {0, 1}
    refused = CliRunner().invoke(app, [*args, "--launcher", "ray", "--partition", "gpu"])
    assert refused.exit_code == 2 and "--partition is an option of the slurm launcher" in refused.output


# --------------------------------------------------------------------------- reports by device


def test_a_run_timed_on_two_devices_is_reported_per_device(submitit, tmp_path):
    slurm(tmp_path, cluster="debug", workers=2)
    store = RunStore(tmp_path)
    cpu = run_devices(tmp_path)[0]
    for path in store.cells_dir.glob("*-g1.parquet"):  # group 1 "ran" on a GPU
        frame = pd.read_parquet(path).assign(device="NVIDIA H100 80GB HBM3")
        key = path.name.split("-g")[0]
        store.write_cell(key, Cell.from_record(frame.iloc[0]), frame.drop(columns=list(Cell.__dataclass_fields__)
                                                                           + ["cell_key", "cell_label", "group"]), 1)
    assert run_devices(tmp_path) == [cpu, "NVIDIA H100 80GB HBM3"]
    with pytest.raises(MixedDevices, match="2 devices"):
        load_summary(tmp_path)
    by_device = {device: load_summary(tmp_path, device=device)[0] for device in run_devices(tmp_path)}
    # Each device's table holds its own cells and its own baseline: no time is divided across devices.
    assert list(by_device["NVIDIA H100 80GB HBM3"]["cell_label"]) == [cell.label() for cell in partition(CELLS, 2)[1]]
    assert list(by_device[cpu]["cell_label"]) == [cell.label() for cell in partition(CELLS, 2)[0]]
    assert load_summary(tmp_path, device="NVIDIA H100 80GB HBM3")[1]["provenance"]["device"] == "NVIDIA H100 80GB HBM3"
    files = {path.name for path in write_report(tmp_path, plots=False)}
    for slug in ("nvidia-h100-80gb-hbm3", device_slug(cpu)):
        assert {f"efficiency_{slug}.md", f"grid_speedup_native_{slug}.csv", f"summary_{slug}.csv"} <= files
    assert "efficiency.md" not in files and "summary.csv" not in files
    assert "one table per device" in efficiency_markdown(tmp_path)
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    text = " ".join(result.output.split())  # a title may wrap at the console's width
    assert result.exit_code == 0 and "one table per device" in text and "on NVIDIA H100 80GB HBM3" in text


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


class Hook(Board):
    """A board that calls `action(worker, group, the group's rows so far)` after each generation."""

    def __init__(self, action):
        self.action, self.workers = action, set()

    def for_group(self, worker, group):
        action = self.action
        self.workers.add(worker)

        class Hooked(Progress):
            rows = 0

            def generation_done(self, cell, row):
                self.rows += 1
                action(worker, group, self.rows)

        return Hooked()


def ray_run(root, board=None, **options):
    return launch.run(LaunchOptions(launcher="ray", **options), SETUP, CELLS, root, force=False, board=board)


def test_two_ray_cpu_workers_match_the_local_launcher(ray_cluster, tmp_path, reference):
    board = Hook(lambda *_: None)
    ray_run(tmp_path, board, workers=2)
    assert complete(tmp_path) and first_rows(tmp_path) == first_rows(reference)
    frame = RunStore(tmp_path).read_cells()
    assert set(frame["group"]) == {0, 1} and set(frame["worker"]) == board.workers and len(board.workers) == 2
    manifest = RunStore(tmp_path).read_manifest()
    assert {entry["worker"] for entry in manifest["groups"].values()} == board.workers
    assert manifest["prompts"]["prompts"] == 3 and RunStore(tmp_path).errors() == []
    assert not load_summary(tmp_path)[0].empty  # one device: one summary, speedups within each group


def test_a_killed_ray_worker_loses_only_its_group_in_flight_and_a_rerun_completes(ray_cluster, tmp_path):
    def kill(worker, group, rows):
        if group == 1 and rows >= 6 and not killed:
            killed.append(worker)
            ray_cluster.kill(ray_cluster.get_actor(worker))

    killed = []
    ray_run(tmp_path, Hook(kill), workers=2)
    store = RunStore(tmp_path)
    lost = {cell.label() for cell in partition(CELLS, 2)[1] if cell.method.speculates}
    errors = store.errors()
    assert killed and {error["cell_label"] for error in errors} == lost
    assert all("died" in error["error"] for error in errors)
    kept = store.read_cells()
    assert set(kept[kept["group"] == 0]["cell_label"]) == {cell.label() for cell in partition(CELLS, 2)[0]}
    before = set(zip(kept["cell_key"], kept["group"], kept["round"], kept["prompt_index"], kept["time_s"],
                     strict=True))
    # What group 1 measured before its worker died is kept (but a cell's row whose baseline had not yet run in
    # the same round: it cannot be compared, and is measured again).
    assert (kept["group"] == 1).sum() >= 4
    ray_run(tmp_path, workers=2)
    after = store.read_cells()
    assert complete(tmp_path) and store.errors() == []
    assert before <= set(zip(after["cell_key"], after["group"], after["round"], after["prompt_index"],
                             after["time_s"], strict=True))


def test_ctrl_c_stops_the_ray_workers_and_keeps_every_journaled_row(ray_cluster, tmp_path):
    def interrupt(worker, group, rows):
        if group == 1 and rows == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ray_run(tmp_path, Hook(interrupt), workers=2)
    store = RunStore(tmp_path)
    journaled = sum(len(store.read_journal(group)) for group in (0, 1))
    # Group 0 may have finished its cells before group 1's fifth row (a loaded machine): those are files.
    finished = len(store.read_cells()) if store.has_cells() else 0
    assert journaled + finished >= 5 and len(store.read_journal(1)) >= 1 and store.errors() == []
    alive = [actor for actor in ray_cluster.util.list_named_actors() if actor.startswith("skipbench-")]
    time.sleep(1)
    assert all(_gone(ray_cluster, name) for name in alive)
    ray_run(tmp_path, workers=1)  # another number of workers: the groups stay where their rows are
    assert complete(tmp_path) and store.read_journal(0) == [] and store.read_journal(1) == []


def _gone(ray, name: str) -> bool:
    try:
        actor = ray.get_actor(name)
        ray.get(actor.__ray_ready__.remote(), timeout=5)
    except Exception:
        return True
    return False


def test_a_setup_a_worker_refuses_stops_the_launch_with_its_error(ray_cluster, tmp_path):
    from skipbench.errors import UserError

    cells = [Cell("autoregressive"), Cell("speculative", None, 2, "synthetic:smollm2-135m?layers=1")]
    with pytest.raises(UserError, match="has a vocabulary of 49152 tokens"):  # found once the models load
        launch.run(LaunchOptions(launcher="ray", workers=1), SETUP, cells, tmp_path, force=False)
    assert ray_cluster.util.list_named_actors() == [] or all(
        _gone(ray_cluster, name) for name in ray_cluster.util.list_named_actors())
