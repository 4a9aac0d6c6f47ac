"""Resume after an interruption, and a failing cell recorded while the sweep completes."""

import pytest

import skipbench.sweep as sweep_module
from skipbench.spec import Cell, Grid, Setup, cell_key
from skipbench.store import RunStore
from skipbench.sweep import Progress, RunError, execute

SETUP = Setup(model="synthetic:tiny", prompts=("one", "two"), max_new_tokens=6, warmup=0)
CELLS = Grid(exits=(1, 2, 3), speculations=(2,)).expand()


class Recorder(Progress):
    def __init__(self, stop_after: int | None = None):
        self.statuses, self.stop_after = [], stop_after

    def cell_done(self, cell, status):
        self.statuses.append((cell, status))
        if self.stop_after is not None and len(self.statuses) == self.stop_after:
            raise KeyboardInterrupt


def test_an_interrupted_sweep_resumes_without_losing_or_redoing_cells(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        execute(SETUP, CELLS, tmp_path, progress=Recorder(stop_after=2))
    store = RunStore(tmp_path)
    finished = {cell for cell in CELLS if store.has_cell(cell_key(SETUP, cell))}
    assert finished == set(CELLS[:2])
    stamps = {cell: store.cell_path(cell_key(SETUP, cell)).stat().st_mtime_ns for cell in finished}
    again = Recorder()
    execute(SETUP, CELLS, tmp_path, progress=again)
    assert [status for _, status in again.statuses] == ["skipped", "skipped", "done", "done"]
    assert {cell: store.cell_path(cell_key(SETUP, cell)).stat().st_mtime_ns for cell in finished} == stamps
    assert len(store.read_cells()) == len(CELLS) * len(SETUP.prompts)
    forced = Recorder()
    execute(SETUP, CELLS, tmp_path, progress=forced, force=True)
    assert [status for _, status in forced.statuses] == ["done"] * 4


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    real = sweep_module.run_cell
    broken = CELLS[2]

    def run_cell(cell, *args, **kwargs):
        if cell == broken:
            raise RuntimeError("CUDA out of memory (simulated)\nmore detail")
        return real(cell, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "run_cell", run_cell)
    progress = Recorder()
    store = execute(SETUP, CELLS, tmp_path, progress=progress)
    assert [s for _, s in progress.statuses].count("done") == 3
    assert store.errors() == [{"strategy": "self_speculative", "exit_layer": 2, "num_speculations": 2,
                               "draft_model": None, "backend": "native", "cell_key": cell_key(SETUP, broken),
                               "cell_label": broken.label(),
                               "error": "RuntimeError: CUDA out of memory (simulated)"}]
    monkeypatch.setattr(sweep_module, "run_cell", real)
    execute(SETUP, CELLS, tmp_path)  # a rerun retries the failed cell and clears its error
    assert store.errors() == [] and store.has_cell(cell_key(SETUP, broken))


def test_a_run_directory_of_other_settings_is_refused(tmp_path):
    execute(SETUP, CELLS[:1], tmp_path)
    other = Setup(model="synthetic:tiny", prompts=("three",), max_new_tokens=6, warmup=0)
    with pytest.raises(RunError, match="other settings"):
        execute(other, CELLS[:1], tmp_path)


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
