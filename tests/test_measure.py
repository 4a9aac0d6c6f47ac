"""Measurement: interleaved rounds with the baseline in each, repeats, the journal, and their guarantees."""

from collections import Counter
from dataclasses import replace

import pytest

import skipbench.measure as measure_module
from skipbench.measure import MeasurementError, Progress
from skipbench.spec import Cell, Grid, Setup, cell_key
from skipbench.store import RunStore
from skipbench.sweep import execute

SETUP = Setup(model="synthetic:tiny", prompts=("one", "two", "three"), max_new_tokens=6, warmup=0, repeats=3,
              threads=1)
CELLS = Grid(exits=(1, 2), speculations=(2,)).expand()


class Recorder(Progress):
    def __init__(self, stop_after: int | None = None):
        self.order, self.statuses, self.stop_after = [], [], stop_after

    def generation_done(self, cell, row):
        self.order.append((row["round"], row["prompt_index"], cell))
        if self.stop_after is not None and len(self.order) == self.stop_after:
            raise KeyboardInterrupt

    def cell_done(self, cell, status):
        self.statuses.append((cell, status))


def rows_of(store, setup=SETUP, cells=CELLS):
    return {cell: store.read_cell(cell_key(setup, cell)) for cell in cells}


def test_rounds_are_prompt_major_interleaved_with_the_baseline_and_rotated(tmp_path):
    progress = Recorder()
    store = execute(SETUP, CELLS, tmp_path, progress=progress)
    # Every round decodes every prompt with every cell once, the baseline included, prompt after prompt.
    assert Counter((r, p) for r, p, _ in progress.order) == {(r, p): 3 for r in range(3) for p in range(3)}
    assert [p for _, p, _ in progress.order] == [p for _ in range(3) for p in range(3) for _ in range(3)]
    orders = [tuple(cell for r, p, cell in progress.order if (r, p) == key) for key in sorted({(r, p) for r, p, _
                                                                                               in progress.order})]
    assert len(set(orders)) == 3 and all(set(order) == set(CELLS) for order in orders)  # rotated, never skipped
    for cell, frame in rows_of(store).items():
        assert sorted(zip(frame["prompt_index"], frame["round"], strict=True)) == [
            (p, r) for p in range(3) for r in range(3)], cell
        for _, prompt_rows in frame.groupby("prompt_index"):  # counts and tokens equal in every repeat
            assert prompt_rows["tokens"].map(list).map(tuple).nunique() == 1
            assert prompt_rows[["new_tokens", "drafted", "accepted", "verify_steps"]].nunique().max() == 1
            assert sorted(prompt_rows["repeat"]) == [0, 1, 2]


def test_an_interrupted_session_resumes_from_its_journal_and_loses_no_generation(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        execute(SETUP, CELLS, tmp_path, progress=Recorder(stop_after=10))
    store = RunStore(tmp_path)
    journal = store.read_journal()
    assert len(journal) == 10 and not store.has_cells()
    again = Recorder()
    execute(SETUP, CELLS, tmp_path, progress=again)
    # Only what was missing, plus the baseline wherever a cell needs its time from the same round.
    assert 27 - 10 <= len(again.order) <= 27 - 10 + len(SETUP.prompts)
    assert store.read_journal() == []
    stored = {(row["cell_key"], row["prompt_index"], row["round"], row["time_s"])
              for frame in rows_of(store).values() for row in frame.to_dict("records")}
    assert {(row["cell_key"], row["prompt_index"], row["round"], row["time_s"]) for row in journal} <= stored
    for cell, frame in rows_of(store).items():
        counts = frame.groupby("prompt_index").size().tolist()
        assert counts == [3, 3, 3] if cell.method.speculates else min(counts) == 3, (cell, counts)
    finished = Recorder()
    execute(SETUP, CELLS, tmp_path, progress=finished)
    assert finished.order == [] and {status for _, status in finished.statuses} == {"skipped"}


def test_more_repeats_later_extend_every_cell_in_new_rounds(tmp_path):
    execute(replace(SETUP, repeats=2), CELLS, tmp_path)
    progress = Recorder()
    store = execute(SETUP, CELLS, tmp_path, progress=progress)
    assert {r for r, _, _ in progress.order} == {2} and len(progress.order) == 9
    for frame in rows_of(store).values():
        assert sorted(set(frame["round"])) == [0, 1, 2]


def test_greedy_decoding_that_changes_between_repeats_is_a_loud_error(tmp_path, monkeypatch):
    real = measure_module.CellRunner.generate
    calls = Counter()

    def flaky(self, prompt):
        generation = real(self, prompt)
        calls[self.cell] += 1
        if self.cell == CELLS[1] and calls[self.cell] == 5:
            generation.tokens = generation.tokens[:-1] + [generation.tokens[-1] + 1]
        return generation

    monkeypatch.setattr(measure_module.CellRunner, "generate", flaky)
    with pytest.raises(MeasurementError, match="decoded differently"):
        execute(SETUP, CELLS, tmp_path)


def test_where_kernels_may_not_repeat_a_changed_greedy_decode_is_a_note_and_a_flagged_row(tmp_path, monkeypatch):
    """On a GPU (here: the check told it is not on a CPU) the run goes on: one note for the cell, its changed rows
    flagged `repeat_changed`, every other row not."""
    real, check = measure_module.CellRunner.generate, measure_module._check_repeat
    calls = Counter()

    def flaky(self, prompt):
        generation = real(self, prompt)
        calls[self.cell] += 1
        if self.cell == CELLS[1] and calls[self.cell] in (5, 8):
            generation.tokens = generation.tokens[:-1] + [generation.tokens[-1] + 1]
        return generation

    class Notes(Recorder):
        def __init__(self):
            super().__init__()
            self.notes = []

        def note(self, text):
            self.notes.append(text)

    monkeypatch.setattr(measure_module.CellRunner, "generate", flaky)
    monkeypatch.setattr(measure_module, "_check_repeat", lambda *args, exact: check(*args, exact=False))
    progress = Notes()
    store = execute(SETUP, CELLS, tmp_path, progress=progress)
    changed = [note for note in progress.notes if "decoded differently" in note]
    assert len(changed) == 1 and CELLS[1].label() in changed[0] and "repeat_changed" in changed[0]
    rows = rows_of(store)
    assert rows[CELLS[1]]["repeat_changed"].sum() == 2 and len(rows[CELLS[1]]) == 9
    assert not any(rows[cell]["repeat_changed"].any() for cell in CELLS if cell != CELLS[1])


def test_a_failing_cell_is_recorded_and_the_others_finish(tmp_path, monkeypatch):
    real = measure_module.CellRunner.generate
    broken = CELLS[2]

    def generate(self, prompt):
        if self.cell == broken:
            raise RuntimeError("CUDA out of memory (simulated)\nmore detail")
        return real(self, prompt)

    monkeypatch.setattr(measure_module.CellRunner, "generate", generate)
    progress = Recorder()
    store = execute(SETUP, CELLS, tmp_path, progress=progress)
    assert [c for c, status in progress.statuses if status == "done"] == [CELLS[0], CELLS[1]]
    assert store.errors() == [{"strategy": "self_speculative", "exit_layer": 2, "num_speculations": 2,
                               "draft_model": None, "backend": "native", "replica": 0, "draft_policy": "static",
                               "cell_key": cell_key(SETUP, broken), "cell_label": broken.label(),
                               "error": "RuntimeError: CUDA out of memory (simulated)"}]
    monkeypatch.setattr(measure_module.CellRunner, "generate", real)
    retry = Recorder()
    execute(SETUP, CELLS, tmp_path, progress=retry)  # a rerun retries the failed cell and clears its error
    assert store.errors() == [] and store.has_cell(cell_key(SETUP, broken))
    assert {cell for _, _, cell in retry.order} == {CELLS[0], broken}  # with its baseline in the same rounds


def test_a_failing_baseline_fails_the_group(tmp_path, monkeypatch):
    def generate(self, prompt):
        raise RuntimeError("broken baseline")

    monkeypatch.setattr(measure_module.CellRunner, "generate", generate)
    with pytest.raises(MeasurementError, match="baseline"):
        execute(SETUP, CELLS, tmp_path)


def test_a_stop_sequence_ends_generation_and_cuts_the_completion(tmp_path):
    free = Setup(model="synthetic:tiny", prompts=("def fibonacci(n):",), max_new_tokens=40, warmup=0, repeats=1)
    cells = [Cell("autoregressive"), Cell("self_speculative", 2, 4)]
    text = execute(free, cells[:1], tmp_path / "free").read_cell(cell_key(free, cells[0]))["text"][0]
    stop = text[10:12]
    expected = text[: text.index(stop)]
    assert expected.strip()  # the stop sits after some text, so it must cut there
    stopped = replace(free, stop_sequences=(stop,))
    store = execute(stopped, cells, tmp_path / "stopped")
    for cell in cells:
        row = store.read_cell(cell_key(stopped, cell)).iloc[0]
        assert row["stop_reason"] == "stop" and row["completion"] == expected
        assert row["text"].startswith(text[: text.index(stop) + len(stop)]) and row["new_tokens"] < 40


def test_rows_hold_the_raw_counts_per_step_and_the_passes(tmp_path):
    setup = Setup(model="synthetic:tiny", prompts=("abc", "hello world"), max_new_tokens=12, warmup=1, repeats=1)
    cell = Cell("self_speculative", 1, 3)
    store = execute(setup, [Cell("autoregressive"), cell], tmp_path)
    for row in store.read_cell(cell_key(setup, cell)).to_dict("records"):
        assert row["drafted"] == sum(row["step_drafted"]) and row["accepted"] == sum(row["step_accepted"])
        assert row["verify_steps"] == len(row["step_context"]) == sum(p == "verify" and s == 1
                                                                      for p, s in zip(row["pass_phase"],
                                                                                      row["pass_start"],
                                                                                      strict=True))
        assert row["step_context"][0] == row["prompt_tokens"] - 1
        assert 0 < row["prefill_s"] < row["time_s"]
        assert list(row["pass_phase"]).count("draft") == row["drafted"]  # one exit-layer pass per draft


def test_a_cell_row_without_its_baselines_row_of_the_same_round_is_measured_again(tmp_path):
    """Interrupted between a cell's generation and its baseline's in the same slot: the cell's row cannot
    be paired, so resuming drops it and measures it again, with the baseline, in a new round."""
    setup = replace(SETUP, repeats=1)
    with pytest.raises(KeyboardInterrupt):
        execute(setup, CELLS, tmp_path, progress=Recorder(stop_after=7))
    store = RunStore(tmp_path)
    journal = store.read_journal()
    baseline_slots = {(row["prompt_index"], row["round"]) for row in journal
                      if row["cell_key"] == cell_key(setup, CELLS[0])}
    orphans = [row for row in journal if row["cell_key"] != cell_key(setup, CELLS[0])
               and (row["prompt_index"], row["round"]) not in baseline_slots]
    assert orphans  # the 7th generation of round 0 ran before its baseline did (prompt 2 rotates it first)
    execute(setup, CELLS, tmp_path)
    for cell, frame in rows_of(store, setup).items():
        if cell == CELLS[0]:
            continue
        base = rows_of(store, setup)[CELLS[0]]
        slots = set(zip(base["prompt_index"], base["round"], strict=True))
        assert set(zip(frame["prompt_index"], frame["round"], strict=True)) <= slots
        assert sorted(frame["prompt_index"]) == [0, 1, 2]


def test_resuming_a_narrower_grid_keeps_the_journal_rows_of_the_other_cells(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        execute(SETUP, CELLS, tmp_path, progress=Recorder(stop_after=5))
    store = RunStore(tmp_path)
    others = [row for row in store.read_journal() if row["cell_key"] == cell_key(SETUP, CELLS[2])]
    assert others
    execute(SETUP, CELLS[:2], tmp_path)  # the baseline and one cell only
    assert [row for row in store.read_journal() if row["cell_key"] == cell_key(SETUP, CELLS[2])] == others
    execute(SETUP, CELLS, tmp_path)  # the full grid again: those rows are used where they pair
    stored = store.read_cell(cell_key(SETUP, CELLS[2]))
    base = store.read_cell(cell_key(SETUP, CELLS[0]))
    slots = set(zip(base["prompt_index"], base["round"], strict=True))
    paired = {row["time_s"] for row in others if (row["prompt_index"], row["round"]) in slots}
    assert paired and paired <= set(stored["time_s"])


# --------------------------------------------------------------------------- a busy machine, generation by generation


class Notes(Progress):
    def __init__(self):
        self.notes = []

    def note(self, text):
        self.notes.append(text)


SPINNER = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
while True:  # bursts: spin 40 ms, rest 10 ms
    end = time.perf_counter() + 0.04
    while time.perf_counter() < end:
        pass
    time.sleep(0.01)
"""


def preempted_rows(store) -> tuple[int, int]:
    from skipbench.machine import preempted

    frame = store.read_cells()
    return sum(int(preempted(part).sum()) for _, part in frame.groupby("cell_key")), len(frame)


@pytest.fixture
def one_core():
    """This process on one core (the last it may use) for the test; the core's number."""
    import os

    allowed = os.sched_getaffinity(0)
    core = max(allowed)
    os.sched_setaffinity(0, {core})
    yield core
    os.sched_setaffinity(0, allowed)


def test_generations_preempted_by_a_bursty_load_on_their_core_are_flagged(tmp_path, one_core):
    import subprocess
    import sys

    setup = replace(SETUP, max_new_tokens=16)
    spinner = subprocess.Popen([sys.executable, "-c", SPINNER, str(one_core)])
    try:
        progress = Notes()
        store = execute(setup, CELLS, tmp_path, progress=progress)
    finally:
        spinner.kill()
        spinner.wait()
    flagged, rows = preempted_rows(store)
    assert flagged >= rows // 3, (flagged, rows)
    assert any(note.startswith("warning: the machine was busy during the measurement") for note in progress.notes)
    frame = store.read_cells()
    assert frame["cpu_s"].gt(0).all() and (frame["cpu_threads"] == 1).all()


def cpu_available(seconds: float = 0.5) -> float:
    """The share of a core this process gets while it spins: about 1.0 on a quiet core."""
    import time

    wall, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        pass
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


def test_a_quiet_generation_is_not_flagged(tmp_path, one_core):
    """On a quiet core nothing is flagged. This machine is shared, and a burst of someone else's work can land
    between the checks of the core before and after a run, so up to three runs are tried: a false positive of the
    rule would flag every one of them, a passing burst only one."""
    setup = replace(SETUP, max_new_tokens=16)
    seen = []
    for attempt in range(3):
        before = cpu_available()
        progress = Notes()
        store = execute(setup, CELLS, tmp_path / f"attempt{attempt}", progress=progress)
        flagged = preempted_rows(store)[0]
        busy_note = any(note.startswith("warning: the machine was busy during") for note in progress.notes)
        if flagged == 0 and not busy_note:
            return  # silent on a quiet run
        seen.append((flagged, busy_note, min(before, cpu_available())))
    if all(share >= 0.95 for *_, share in seen):
        pytest.fail(f"flagged on a core that was quiet before and after each of three runs: {seen}")
    pytest.skip(f"this core was busy with other work in each of three runs: {seen}")


def test_a_resume_with_nothing_left_to_measure_says_nothing_of_a_busy_machine(tmp_path, monkeypatch):
    from skipbench import machine

    monkeypatch.setattr(machine, "busy_warning", lambda snapshot, when: f"busy {when}")
    first = Notes()
    execute(SETUP, CELLS, tmp_path, progress=first)
    assert [note for note in first.notes if note.startswith("warning: busy")] == ["warning: busy before",
                                                                                 "warning: busy after"]
    again = Notes()
    execute(SETUP, CELLS, tmp_path, progress=again)  # every cell finished: nothing is timed
    assert not any("busy" in note for note in again.notes)
