"""A run directory holds one setup: resume, refusal of other settings, --force, damaged cells, the lock."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pandas as pd
import pytest

from skipbench.measure import Progress
from skipbench.spec import Cell, Grid, Setup, cell_key
from skipbench.store import RunLocked, RunStore
from skipbench.sweep import RunError, execute

SETUP = Setup(model="synthetic:tiny", prompts=("one", "two"), max_new_tokens=6, warmup=0, repeats=2, threads=1)
CELLS = Grid(exits=(1, 2, 3), speculations=(2,)).expand()


class Count(Progress):
    def __init__(self):
        self.generations = 0

    def generation_done(self, cell, row):
        self.generations += 1


def test_a_finished_run_is_skipped_on_rerun(tmp_path):
    store = execute(SETUP, CELLS, tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in store.cells_dir.glob("*.parquet")}
    again = Count()
    execute(SETUP, CELLS, tmp_path, progress=again)
    assert again.generations == 0
    assert {p: p.stat().st_mtime_ns for p in store.cells_dir.glob("*.parquet")} == stamps


def test_a_run_directory_of_other_settings_is_refused_and_names_what_differs(tmp_path):
    execute(SETUP, CELLS[:1], tmp_path)
    other = replace(SETUP, prompts=("three",), max_new_tokens=7)
    with pytest.raises(RunError, match=r"max_new_tokens, prompts differ.*--force"):
        execute(other, CELLS[:1], tmp_path)
    # Timing-only settings (warm-up, repeats) are not a different setup.
    execute(replace(SETUP, warmup=1, repeats=1), CELLS[:1], tmp_path)


def test_force_restarts_clean_and_never_mixes_setups(tmp_path):
    execute(SETUP, CELLS, tmp_path)
    other = replace(SETUP, prompts=("three",))
    store = execute(other, CELLS[:2], tmp_path, force=True)
    frame = store.read_cells()
    assert set(frame["cell_key"]) == {cell_key(other, cell) for cell in CELLS[:2]}
    assert (frame["strategy"] == "autoregressive").sum() == 2  # one baseline, two repeats of one prompt


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "another cell"])
def test_a_damaged_cell_file_is_moved_aside_and_recomputed(tmp_path, damage):
    store = execute(SETUP, CELLS, tmp_path)
    victim, other = (store.cell_path(cell_key(SETUP, cell)) for cell in CELLS[1:3])
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:100])
    elif damage == "garbage":
        victim.write_bytes(os.urandom(2000))
    elif damage == "empty":
        victim.write_bytes(b"")
    else:
        victim.write_bytes(other.read_bytes())
    progress = Count()
    store = execute(SETUP, CELLS, tmp_path, progress=progress)
    assert progress.generations == 2 * 2 * 2  # the damaged cell and its baseline, 2 prompts, 2 repeats
    assert any("moved to" in problem for problem in store.problems)
    assert len(list((tmp_path / "cells" / "corrupt").iterdir())) == 1
    frame = pd.read_parquet(victim)
    assert set(frame["cell_key"]) == {cell_key(SETUP, CELLS[1])} and len(frame) == 4


def test_a_second_sweep_on_the_same_directory_is_refused_while_the_first_runs(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from skipbench.store import RunStore\n"
         "with RunStore(sys.argv[1]).lock():\n    print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=rf"in use by pid {holder.pid}"):
            execute(SETUP, CELLS[:1], tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    time.sleep(0.1)
    execute(SETUP, CELLS[:1], tmp_path)  # a killed holder leaves no stale lock


def test_models_load_once_per_sweep(tmp_path):
    from skipbench.models import load_model

    loads = []

    def loader(name, **kwargs):
        loads.append(name)
        return load_model(name, **kwargs)

    cells = [*CELLS, Cell("speculative", None, 2, "synthetic:tiny?layers=2"),
             Cell("speculative", None, 3, "synthetic:tiny?layers=2")]
    execute(SETUP, cells, tmp_path, loader=loader)
    assert loads == ["synthetic:tiny", "synthetic:tiny?layers=2"]


def test_rows_of_an_old_schema_are_refused_in_one_line(tmp_path):
    store = execute(SETUP, CELLS[:1], tmp_path)
    manifest = store.read_manifest()
    store.manifest_path().write_text(__import__("json").dumps({**manifest, "schema_version": 1}))
    with pytest.raises(Exception, match="older skipbench"):
        RunStore(tmp_path).read_manifest()


def test_a_prompt_file_changed_under_a_run_is_refused_on_resume(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "one two"}\n{"prompt": "three four"}\n')
    setup = Setup(model="synthetic:tiny", dataset=f"jsonl:{prompts}", max_new_tokens=4, warmup=0, repeats=1,
                  threads=1)
    execute(setup, CELLS[:2], tmp_path / "run")
    prompts.write_text('{"prompt": "one two"}\n{"prompt": "five six"}\n')
    with pytest.raises(RunError, match="inputs changed .* the prompts"):
        execute(setup, CELLS, tmp_path / "run")
    execute(setup, CELLS, tmp_path / "run", force=True)  # a clean restart is allowed
