"""Fault injection on real sweeps: kill -9 and Ctrl-C mid-sweep, damaged cell files, two sweeps on one
directory, failing cells, --force. Whatever happens, no finished generation is lost, nothing is counted
twice, no cell mixes rows of another cell or setup, and the user sees a line, never a traceback.

The tiny synthetic model keeps each sweep to seconds; every wait on a subprocess is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench.cli import app

runner = CliRunner()
PROMPTS = ("alpha", "beta", "gamma")
REPEATS = 3
# 4 cells (the baseline and 3 exits) x 3 prompts x 3 rounds = 36 generations of up to 12 tokens.
SWEEP = ("sweep", "--model", "synthetic:tiny", "--exits", "1..3", "--speculations", "2",
         *[arg for prompt in PROMPTS for arg in ("-p", prompt)], "--max-new-tokens", "12", "--warmup", "0",
         "--repeats", str(REPEATS), "--threads", "1", "--no-report")
CELLS = 4
GENERATIONS = CELLS * len(PROMPTS) * REPEATS
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
SKIPBENCH = Path(sys.executable).with_name("skipbench")
COMMAND = [str(SKIPBENCH)] if SKIPBENCH.is_file() else [sys.executable, "-m", "skipbench.cli"]
# The command line with one change: generation number SKIPBENCH_TEST_GATE waits until the file
# SKIPBENCH_TEST_RELEASE exists, so a test can act while the sweep is surely mid-way, on any machine.
GATED = """
import os, sys, time
import skipbench.measure as measure
real, count = measure.CellRunner.generate, [0]
def generate(self, prompt):
    count[0] += 1
    if count[0] == int(os.environ["SKIPBENCH_TEST_GATE"]):
        deadline = time.monotonic() + 120
        while not os.path.exists(os.environ["SKIPBENCH_TEST_RELEASE"]) and time.monotonic() < deadline:
            time.sleep(0.01)
    return real(self, prompt)
measure.CellRunner.generate = generate
sys.argv = ["skipbench", *sys.argv[1:]]
from skipbench.cli import main
main()
"""


def start(out: Path, *extra, gate: int | None = None, stderr=subprocess.PIPE) -> subprocess.Popen:
    """`skipbench sweep` of SWEEP into `out`; with `gate`, held before that generation until `release(out)`."""
    command, env = COMMAND, ENV
    if gate is not None:
        command = [sys.executable, "-c", GATED]
        env = {**ENV, "SKIPBENCH_TEST_GATE": str(gate), "SKIPBENCH_TEST_RELEASE": str(release_file(out))}
        release_file(out).unlink(missing_ok=True)
    return subprocess.Popen([*command, *SWEEP, *extra, "-o", str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)


def release_file(out: Path) -> Path:
    return out.parent / f"{out.name}.release"


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"skipbench did not finish in {timeout} s:\n{stderr}")
    return process.returncode, stdout or "", stderr or ""


def journal(out: Path) -> list[dict]:
    """The journal's whole lines (a line torn by a kill is not a finished generation)."""
    path = out / "cells" / "journal-g0.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def wait_for_journal(process: subprocess.Popen, out: Path, lines: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(journal(out)) < lines:
        if process.poll() is not None:
            pytest.fail(f"skipbench ended (exit {process.returncode}) before {lines} generations were journaled:\n"
                        f"{process.stderr.read() if process.stderr else ''}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"fewer than {lines} generations journaled in {timeout} s")
        time.sleep(0.02)


def cells(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(path) for path in sorted((out / "cells").glob("*.parquet"))],
                     ignore_index=True)


def assert_complete_and_unmixed(out: Path, cells_expected: int = CELLS, prompts: int = len(PROMPTS)) -> pd.DataFrame:
    frame = cells(out)
    manifest = json.loads((out / "manifest.json").read_text())
    from skipbench.spec import Cell, Setup, cell_key

    setup = Setup(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["setup"].items()})
    keys = {cell_key(setup, Cell(**entry)) for entry in manifest["cells"]}
    assert set(frame["cell_key"]) == keys and len(keys) == cells_expected  # only this setup's cells
    for path in (out / "cells").glob("*.parquet"):  # each file holds its own cell only
        assert set(pd.read_parquet(path)["cell_key"]) == {path.stem}
    baseline = frame["strategy"] == "autoregressive"
    per_cell = frame[~baseline].groupby("cell_key").size()
    assert (per_cell == prompts * REPEATS).all(), per_cell
    # The baseline is timed with every (prompt, round) any cell is timed in, so a round cut short may leave
    # it a row more than the others (and a cell a row without its baseline partner): never fewer.
    assert (frame[baseline].groupby("prompt_index").size() >= REPEATS).all()
    assert not frame.duplicated(["cell_key", "prompt_index", "round"]).any()
    assert not frame.duplicated(["cell_key", "prompt_index", "repeat"]).any()
    assert not list(out.rglob("*.partial")) and not (out / ".lock").exists()
    assert not (out / "cells" / "journal-g0.jsonl").exists()  # merged into the cell files
    return frame


def assert_kept(frame: pd.DataFrame, journaled: list[dict]) -> None:
    """Every generation journaled before a fault is in the final cells, as it was measured (same time), but
    a cell's row whose baseline had not run in the same (prompt, round) when the fault came: that one cannot
    be compared, and is measured again."""
    kept = frame.set_index(["cell_key", "prompt_index", "round"])
    baselines = set(frame.loc[(frame["strategy"] == "autoregressive") & (frame["replica"] == 0), "cell_key"])
    timed = {(row["prompt_index"], row["round"]) for row in journaled if row["cell_key"] in baselines}
    survivors = [row for row in journaled
                 if row["cell_key"] in baselines or (row["prompt_index"], row["round"]) in timed]
    assert survivors
    for row in survivors:
        final = kept.loc[(row["cell_key"], row["prompt_index"], row["round"])]
        assert final["time_s"] == row["time_s"] and list(final["tokens"]) == row["tokens"]


# --------------------------------------------------------------------------- kill -9 and Ctrl-C


def test_kill_9_twice_mid_sweep_loses_no_generation_and_counts_none_twice(tmp_path):
    out = tmp_path / "run"
    journaled: list[dict] = []
    for lines in (3, 14):  # killed twice: the second time after resuming the first
        process = start(out, gate=lines + 1)
        wait_for_journal(process, out, lines)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        rows = journal(out)
        assert len(rows) >= lines
        journaled += rows
    log = tmp_path / "sweep.log"
    with open(log, "w") as handle:  # piped to a file, as in CI: plain lines, no bars, no escapes
        code, _, _ = finish(start(out, stderr=handle))
    stderr = log.read_text()
    assert code == 0, stderr
    assert "Traceback" not in stderr and "\x1b[" not in stderr
    assert re.search(r"^\[ *\d+ s\] round \d+/\d+ done: \d+/\d+ generations$", stderr, re.M), stderr
    frame = assert_complete_and_unmixed(out)
    assert_kept(frame, journaled)
    assert len(frame) >= GENERATIONS
    report = runner.invoke(app, ["report", str(out)])
    assert report.exit_code == 0, report.output
    assert (out / "tables" / "efficiency.md").is_file()


@pytest.mark.parametrize("sent, code, last_line", [
    (signal.SIGINT, 130, "interrupted: finished work is kept; rerun the same command to resume"),
    # Slurm sends SIGTERM at preemption and at the time limit: handled like Ctrl-C.
    (signal.SIGTERM, 143, "terminated (SIGTERM): finished work is kept; rerun the same command to resume"),
], ids=["ctrl-c", "sigterm"])
def test_a_signal_mid_sweep_keeps_finished_work_says_how_to_resume_and_the_rerun_completes(tmp_path, sent, code,
                                                                                            last_line):
    out = tmp_path / "run"
    process = start(out, gate=6)
    wait_for_journal(process, out, 5)
    process.send_signal(sent)
    exit_code, _, stderr = finish(process, timeout=60)
    assert exit_code == code, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == last_line
    assert not (out / ".lock").exists()
    journaled = journal(out)
    assert len(journaled) == 5
    exit_code, _, stderr = finish(start(out))
    assert exit_code == 0, stderr
    assert_kept(assert_complete_and_unmixed(out), journaled)


def test_ctrl_c_after_a_force_restart_says_to_resume_without_force(tmp_path):
    out = tmp_path / "run"
    process = start(out, "--force", gate=3)
    wait_for_journal(process, out, 2)
    process.send_signal(signal.SIGINT)
    code, _, stderr = finish(process, timeout=60)
    assert code == 130 and "rerun the same command without --force to resume" in stderr, stderr


@pytest.mark.parametrize("delay", [0.25, 0.5, 1.0, 2.0])
def test_ctrl_c_while_starting_is_exit_130_without_a_traceback(tmp_path, delay):
    process = start(tmp_path / "run")
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    code, stdout, stderr = finish(process, timeout=60)
    # 130, or killed by SIGINT before Python ran a line of skipbench (a shell shows that as 130 too).
    assert code in (130, -signal.SIGINT), stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.strip() in ("", "interrupted") or stderr.strip().endswith("rerun the same command to resume"), stderr


# --------------------------------------------------------------------------- damaged cell files


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    result = runner.invoke(app, [*SWEEP, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def damage(out: Path, how: str) -> tuple[Path, Path]:
    """Damage the file of one self-speculative cell; return it and another cell's file."""
    frame = cells(out)
    keys = list(dict.fromkeys(frame[frame["strategy"] == "self_speculative"]["cell_key"]))
    victim, other = (out / "cells" / f"{key}.parquet" for key in keys[:2])
    if how == "truncated":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif how == "garbage":
        victim.write_bytes(os.urandom(4096))
    elif how == "zero bytes":
        victim.write_bytes(b"")
    else:  # a valid parquet file, of another cell, under this cell's name
        victim.write_bytes(other.read_bytes())
    return victim, other


DAMAGES = ["truncated", "garbage", "zero bytes", "another cell"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_cell_file_is_set_aside_recomputed_and_not_mixed(finished, tmp_path, how):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    victim, other = damage(out, how)
    untouched = {path: path.stat().st_mtime_ns for path in (out / "cells").glob("*.parquet")
                 if path not in (victim,) and set(pd.read_parquet(path)["strategy"]) == {"self_speculative"}}
    result = runner.invoke(app, [*SWEEP, "-o", str(out)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())  # notes wrap at the terminal's width
    assert f"cell file {victim.name}" in said and "moved to cells/corrupt/" in said, result.stderr
    assert len(list((out / "cells" / "corrupt").iterdir())) == 1
    frame = assert_complete_and_unmixed(out)
    recomputed = pd.read_parquet(victim)
    assert set(recomputed["cell_key"]) == {victim.stem} and len(recomputed) == len(PROMPTS) * REPEATS
    assert {path: path.stat().st_mtime_ns for path in untouched} == untouched  # the other cells were kept
    assert len(frame) >= GENERATIONS


def test_report_names_a_cell_that_lacks_a_prompts_rows_and_how_to_finish_it(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    frame = cells(out)
    key = list(dict.fromkeys(frame[frame["strategy"] == "self_speculative"]["cell_key"]))[0]
    label = frame.loc[frame["cell_key"] == key, "cell_label"].iloc[0]
    rows = pd.read_parquet(out / "cells" / f"{key}.parquet")
    rows[rows["prompt_index"] != 1].to_parquet(out / "cells" / f"{key}.parquet")
    result = runner.invoke(app, ["report", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if label in line and "incomplete" in line]
    assert warned and "2 of 3 prompts" in warned[0] and "rerun" in warned[0], result.output


@pytest.mark.parametrize("how", DAMAGES)
def test_report_on_a_damaged_run_warns_in_one_line_and_reports_the_rest(finished, tmp_path, how):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    victim, _ = damage(out, how)
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and victim.name in warnings[0] and "moved to" in warnings[0], result.stderr
    assert "Traceback" not in result.output
    assert (out / "tables" / "efficiency.md").is_file()
    again = runner.invoke(app, [*SWEEP, "-o", str(out)])  # the sweep then recomputes the cell set aside
    assert again.exit_code == 0, again.output
    assert_complete_and_unmixed(out)


# --------------------------------------------------------------------------- two sweeps, one directory


def test_a_second_sweep_on_a_busy_directory_exits_2_naming_the_first(tmp_path):
    out = tmp_path / "run"
    first = start(out, gate=2)
    try:
        wait_for_journal(first, out, 1)
        code, stdout, stderr = finish(start(out), timeout=120)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2, stderr
        assert lines[-1].startswith("error: ") and all(line.startswith("sweep: ") for line in lines[:-1]), stderr
        assert f"is in use by pid {first.pid}" in lines[-1] and "Traceback" not in stderr
    finally:
        release_file(out).touch()
        code, _, first_stderr = finish(first)
    assert code == 0, first_stderr
    frame = assert_complete_and_unmixed(out)
    assert len(frame) == GENERATIONS  # the refused sweep measured and wrote nothing


# --------------------------------------------------------------------------- --force and failing cells


def test_force_after_changing_the_setup_restarts_clean(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, [*SWEEP, "-o", str(out)]).exit_code == 0
    changed = [*SWEEP, "-p", "delta", "-o", str(out)]  # a fourth prompt
    refused = runner.invoke(app, changed)
    assert refused.exit_code == 2 and "other settings (prompts differ)" in refused.stderr
    result = runner.invoke(app, [*changed, "--force"])
    assert result.exit_code == 0, result.output
    assert_complete_and_unmixed(out, prompts=len(PROMPTS) + 1)
    assert json.loads((out / "manifest.json").read_text())["setup"]["prompts"] == [*PROMPTS, "delta"]


def failing(monkeypatch, which):
    import skipbench.measure as measure_module

    real = measure_module.CellRunner.generate

    def generate(self, prompt):
        if which(self.cell):
            raise RuntimeError(f"injected fault in {self.cell.label()}")
        return real(self, prompt)

    monkeypatch.setattr(measure_module.CellRunner, "generate", generate)


def test_a_sweep_whose_every_speculative_cell_fails_exits_3_listing_each(tmp_path, monkeypatch):
    out = tmp_path / "run"
    failing(monkeypatch, lambda cell: cell.strategy != "autoregressive")
    result = runner.invoke(app, [*SWEEP[:-1], "--report", "-o", str(out)])  # with the report, too
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    for exit_layer in (1, 2, 3):
        assert f"failed self_speculative E={exit_layer} K=2: RuntimeError: injected fault" in result.stdout
    assert "3 cell(s) failed" in result.stderr
    monkeypatch.undo()
    retried = runner.invoke(app, [*SWEEP, "-o", str(out)])  # the rerun retries only the failed cells
    assert retried.exit_code == 0, retried.output
    assert "failed" not in retried.stdout
    assert_complete_and_unmixed(out)


def test_a_sweep_whose_baseline_fails_too_is_one_line_exit_2(tmp_path, monkeypatch):
    failing(monkeypatch, lambda cell: True)
    result = runner.invoke(app, [*SWEEP, "-o", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the baseline autoregressive failed" in errors[0]
    assert "Traceback" not in result.output


def test_an_hf_cell_that_raises_in_a_native_and_hf_sweep_fails_alone(tmp_path, monkeypatch):
    import skipbench.hf as hf

    real = hf.generate_hf

    def generate_hf(*args, **kwargs):
        if kwargs.get("exit_layer") is not None:
            raise ValueError("injected fault in generate()")
        return real(*args, **kwargs)

    monkeypatch.setattr(hf, "generate_hf", generate_hf)
    out = tmp_path / "run"
    args = ["sweep", "--model", "synthetic:tiny", "--exits", "2", "--speculations", "2", "-p", "x",
            "--backends", "native,hf", "--max-new-tokens", "6", "--warmup", "0", "--repeats", "1", "--threads", "1",
            "--no-report", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    assert "failed self_speculative (hf) E=2 K=2: ValueError: injected fault in generate()" in result.stdout
    assert len(list((out / "cells").glob("*.parquet"))) == 3  # both baselines and the native cell
    assert "Traceback" not in result.output
