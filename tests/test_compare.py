"""Tests for skipbench.compare: the regression gate on a real run and on doctored copies of it."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench.ci_reports import junit, markdown
from skipbench.cli import app
from skipbench.compare import CompareError, Comparison, compare_runs, comparison_text, format_comparison
from skipbench.spec import Cell, Setup, with_baseline
from skipbench.store import RunStore
from skipbench.sweep import execute

FAST = "self_speculative E=2 K=4"  # accepts everything: a cell well above 1x
SLOWER = "self_speculative E=1 K=2"


SETUP = Setup(model="synthetic:tiny?agree=2", prompts=("hello", "world wide", "abc", "a b c d"), max_new_tokens=12,
              warmup=1, repeats=3, threads=1)
CELLS = with_baseline([Cell("self_speculative", exit_layer=1, num_speculations=2),
                       Cell("self_speculative", exit_layer=2, num_speculations=4)])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return execute(SETUP, CELLS, tmp_path_factory.mktemp("compare") / "base").root


def copy_run(run, tmp_path, name="new", steady=False):
    """A copy of the run; `steady`: with times proportional to each cell's verify steps, plus 1% noise, so
    that a doctored slowdown is judged against known intervals, not against this machine's load."""
    target = tmp_path / name
    shutil.copytree(run, target)
    if not steady:
        return target
    rng = np.random.default_rng(0)
    for path in sorted((target / "cells").glob("*.parquet")):
        frame = pd.read_parquet(path)
        frame["time_s"] = 0.01 * frame["verify_steps"] * rng.uniform(0.99, 1.01, len(frame))
        steady_latency(frame, rng)
        frame.to_parquet(path, index=False)
    return target


def steady_latency(frame, rng) -> None:
    """Latency columns of known spread: a first token after ~20 ms, then one every ~10 ms (1% noise each)."""
    first = 0.02 * rng.uniform(0.99, 1.01, len(frame))
    gap = 0.01 * rng.uniform(0.99, 1.01, len(frame))
    times = [[t + g * i for i in range(int(n))] for t, g, n in zip(first, gap, frame["new_tokens"], strict=True)]
    frame["ttft_s"], frame["token_times"] = first, times
    frame["e2e_s"] = [row[-1] if row else t for row, t in zip(times, first, strict=True)]


def later_first_token(factor):
    """A cell edit: every request's first token (and so every later one) comes `factor` times later."""
    def change(frame):
        shift = frame["ttft_s"] * (factor - 1)
        frame["token_times"] = [[t + s for t in row] for row, s in zip(frame["token_times"], shift, strict=True)]
        frame["ttft_s"] += shift
        frame["e2e_s"] += shift

    return change


def cell_file(root, label):
    for path in (root / "cells").glob("*.parquet"):
        if pd.read_parquet(path, columns=["cell_label"])["cell_label"].iloc[0] == label:
            return path
    raise KeyError(label)


def edit_cell(root, label, change) -> None:
    path = cell_file(root, label)
    frame = pd.read_parquet(path)
    change(frame)
    frame.to_parquet(path, index=False)


def edit_manifest(root, change) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def not_deterministic(manifest) -> None:
    manifest["provenance"]["device"] = "NVIDIA H100 80GB HBM3"
    manifest["provenance"]["dtype"] = "bfloat16"


def test_identical_runs_pass(run) -> None:
    result = compare_runs(run, run)
    assert result.ok and result.problems == [] and result.deterministic
    assert set(result.rows["verdict"]) == {"ok"}
    fast = result.rows[result.rows["cell"] == FAST].iloc[0]
    assert fast["speedup_ratio"] == pytest.approx(1.0)
    assert fast["speedup_ratio_low"] == pytest.approx(1.0) and fast["speedup_ratio_high"] == pytest.approx(1.0)
    assert "OK" in comparison_text(result)
    assert format_comparison(result).renderables[1].row_count == 3
    assert result.environment == []
    assert comparison_text(result).splitlines()[0].startswith("environment: the same")


def test_environment_differences_are_printed_above_the_table(run, tmp_path) -> None:
    new = copy_run(run, tmp_path)

    def upgraded(manifest) -> None:
        manifest["provenance"]["transformers_version"] = "9.99.0"
        manifest["provenance"]["git_commit"] = "0123456789abcdef"
        manifest["provenance"]["cpu_threads"] = 7

    edit_manifest(new, upgraded)
    base_provenance = json.loads((run / "manifest.json").read_text())["provenance"]
    result = compare_runs(run, new)
    assert result.ok  # an environment change is information, not a regression
    assert result.environment == [
        ("skipbench commit", str(base_provenance["git_commit"])[:10], "0123456789"),
        ("transformers", base_provenance["transformers_version"], "9.99.0"),
        ("threads", str(base_provenance["cpu_threads"]), "7"),
    ]
    lines = comparison_text(result).splitlines()
    assert lines[:3] == [
        f"environment differs: skipbench commit {str(base_provenance['git_commit'])[:10]} -> 0123456789",
        f"environment differs: transformers {base_provenance['transformers_version']} -> 9.99.0",
        f"environment differs: threads {base_provenance['cpu_threads']} -> 7",
    ]
    assert lines[3].startswith("compare ")  # the table's title follows the environment lines


def test_thirty_percent_slowdown_fails(run, tmp_path) -> None:
    run, new = copy_run(run, tmp_path, "base", steady=True), copy_run(run, tmp_path, steady=True)

    def slow(frame):
        frame["time_s"] *= 1.3

    edit_cell(new, FAST, slow)
    result = compare_runs(run, new)
    assert not result.ok
    row = result.rows[result.rows["cell"] == FAST].iloc[0]
    assert row["verdict"] == "FAIL" and row["speedup_ratio"] == pytest.approx(1 / 1.3)
    assert row["new_speedup_high"] < row["base_speedup_low"] * 0.95 and row["speedup_ratio_high"] < 0.95
    assert len(result.problems) == 1 and result.problems[0].startswith(FAST)
    assert "slower" in result.problems[0]
    assert "FAIL" in comparison_text(result)
    # The other way round the new run is faster: reported, never a failure.
    reverse = compare_runs(new, run)
    assert reverse.ok and reverse.rows.set_index("cell").loc[FAST, "verdict"] == "faster"


def test_one_percent_noise_passes(run, tmp_path) -> None:
    run, new = copy_run(run, tmp_path, "base", steady=True), copy_run(run, tmp_path, steady=True)
    rng = np.random.default_rng(1)
    for path in (new / "cells").glob("*.parquet"):
        frame = pd.read_parquet(path)
        frame["time_s"] *= rng.uniform(0.99, 1.01, len(frame))
        frame.to_parquet(path, index=False)
    result = compare_runs(run, new)
    assert result.ok, result.problems
    ratios = result.rows["speedup_ratio"].dropna()
    assert len(ratios) == 2 and ((ratios > 0.97) & (ratios < 1.03)).all()


def test_changed_token_fails_exactly_when_deterministic(run, tmp_path) -> None:
    def change_token(frame):
        tokens = [list(t) for t in frame["tokens"]]
        tokens[0][5] = (tokens[0][5] + 1) % 300
        frame["tokens"] = tokens

    new = copy_run(run, tmp_path)
    edit_cell(new, FAST, change_token)
    result = compare_runs(run, new)
    assert not result.ok
    assert any("tokens differ from index 5" in p for p in result.problems)

    # The same change between two GPU bf16 runs is within noise: one prompt's losslessness.
    base = copy_run(run, tmp_path, "base_gpu")
    edit_manifest(base, not_deterministic)
    edit_manifest(new, not_deterministic)
    result = compare_runs(base, new)
    assert not result.deterministic
    assert result.ok, result.problems
    row = result.rows[result.rows["cell"] == FAST].iloc[0]
    assert row["base_lossless"] == 1.0 and row["new_lossless"] == pytest.approx(0.75)


def test_acceptance_drop_beyond_tolerance_fails_when_not_deterministic(run, tmp_path) -> None:
    base, new = copy_run(run, tmp_path, "base"), copy_run(run, tmp_path)
    for root in (base, new):
        edit_manifest(root, not_deterministic)

    def accept_less(frame):
        frame["accepted"] = frame["accepted"] - 1  # 9 drafted per prompt in this cell: 1.0 -> 0.889

    edit_cell(new, FAST, accept_less)
    result = compare_runs(base, new)
    assert not result.ok and "acceptance" in result.problems[0]
    assert compare_runs(base, new, max_acceptance_drop=0.2).ok


def test_quality_drop(run, tmp_path) -> None:
    base, new = copy_run(run, tmp_path, "base"), copy_run(run, tmp_path)

    def scores(values):
        def change(frame):
            frame["quality_exact_match"] = [values[int(i)] for i in frame["prompt_index"]]

        return change

    edit_cell(base, FAST, scores([1.0, 1.0, 1.0, 1.0]))
    edit_cell(new, FAST, scores([1.0, 1.0, 1.0, 0.0]))  # one prompt: within bootstrap noise
    assert compare_runs(base, new).ok
    edit_cell(new, FAST, scores([0.0, 0.0, 0.0, 0.0]))
    result = compare_runs(base, new)
    assert not result.ok and "exact_match" in result.problems[0]


def test_a_base_run_without_cells_is_refused(run, tmp_path) -> None:
    empty = copy_run(run, tmp_path, "empty")
    for path in (empty / "cells").glob("*.parquet"):
        path.unlink()
    with pytest.raises(CompareError, match="base run .* holds no finished cells"):
        compare_runs(empty, run)


def test_missing_and_extra_cells(run, tmp_path) -> None:
    new = copy_run(run, tmp_path)
    cell_file(new, SLOWER).unlink()
    result = compare_runs(run, new)
    assert not result.ok and "missing from the new run" in result.problems[0]
    assert result.rows.set_index("cell").loc[SLOWER, "verdict"] == "missing in new"
    assert compare_runs(run, new, allow_missing=True).ok
    # A cell only in the new run is reported, not a failure.
    extra = compare_runs(new, run)
    assert extra.ok and any("only in the new run" in note for note in extra.notes)
    # A cell that failed in the new run says so.
    RunStore(new).write_error("broken", Cell("self_speculative", 1, 2), "RuntimeError: boom")
    assert "failed in the new run (RuntimeError: boom)" in compare_runs(run, new).problems[0]


def test_matching_ignores_cell_keys(run, tmp_path) -> None:
    new = copy_run(run, tmp_path)
    for path in (new / "cells").glob("*.parquet"):
        frame = pd.read_parquet(path)
        frame["cell_key"] = "other-" + frame["cell_key"]
        frame.to_parquet(path, index=False)
        path.rename(path.with_name("other-" + path.name))
    assert compare_runs(run, new).ok


def test_refuses_incomparable_runs(run, tmp_path) -> None:
    other_prompts = copy_run(run, tmp_path, "prompts")
    edit_manifest(other_prompts, lambda m: m["prompts"].update(prompt_set_hash="0000000000000000"))
    with pytest.raises(CompareError, match="different prompt sets"):
        compare_runs(run, other_prompts)
    other_model = copy_run(run, tmp_path, "model")
    edit_manifest(other_model, lambda m: m["models"]["target"].update(name="synthetic:other"))
    with pytest.raises(CompareError, match="different models"):
        compare_runs(run, other_model)


def test_a_prompt_paired_in_one_run_only_is_left_out_of_the_ratio_not_a_crash(run, tmp_path) -> None:
    """A cell's rows of prompt 1 moved to rounds its baseline never ran (as after an interruption): the ratio
    is taken over the prompts both runs paired."""
    new = copy_run(run, tmp_path)

    def unpair(frame):
        frame.loc[frame["prompt_index"] == 1, "round"] += 100

    edit_cell(new, FAST, unpair)
    result = compare_runs(run, new)
    row = result.rows[result.rows["cell"] == FAST].iloc[0]
    assert row["speedup_ratio"] == row["speedup_ratio"] and row["speedup_ratio_low"] <= row["speedup_ratio_high"]


def test_the_rerun_check_counts_ratio_intervals_that_hold_one():
    rows = pd.DataFrame({"speedup_ratio_low": [0.9, 1.05, np.nan, 1.0, 0.7],
                         "speedup_ratio_high": [1.1, 1.20, np.nan, 1.0, 0.95]})
    comparison = Comparison(Path("a"), Path("b"), rows)
    # [0.9, 1.1] holds 1; [1.05, 1.2] and [0.7, 0.95] do not; no interval and a zero-width one are not counted.
    assert comparison.coverage == (1, 3)


# --------------------------------------------------------------------------- latency percentiles


def test_a_later_first_token_fails_the_latency_gate_naming_the_percentile(run, tmp_path) -> None:
    base, new = copy_run(run, tmp_path, "base", steady=True), copy_run(run, tmp_path, steady=True)
    edit_cell(new, FAST, later_first_token(1.5))
    assert compare_runs(base, new).ok  # off unless asked for: seconds from two machines are not comparable
    result = compare_runs(base, new, max_latency_increase=0.10)
    assert not result.ok and all(problem.startswith(f"{FAST}: ") for problem in result.problems)
    assert any("TTFT p50" in problem for problem in result.problems)
    assert not any("TPOT" in problem or "ITL" in problem for problem in result.problems)  # gaps unchanged
    message = next(problem for problem in result.problems if "TTFT p99" in problem)
    assert "ms [" in message and "(1.50x)" in message and "the 10% tolerance" in message
    row = result.rows.set_index("cell").loc[FAST]
    assert row["verdict"] == "FAIL" and row["latency_worst"].startswith("TTFT")
    assert row["latency_ratio"] == pytest.approx(1.5, rel=0.02)
    text = comparison_text(result, width=80)
    assert max(len(line) for line in text.splitlines() if line.startswith(("│", "┃"))) <= 80
    shown = next(line for line in text.splitlines() if line.startswith("│self E=2 K=4") and "TTFT p" in line)
    assert shown.rstrip("│ ").endswith("1.50x") and "rose most" in text and "raised by 10%" in text
    # The CI reports: the JUnit failure and the Markdown table name the percentile.
    failure = ET.fromstring(junit(result)).find("testcase[@name='self_speculative E=2 K=4']/failure")
    assert "TTFT p50" in failure.get("message") and "max latency increase 10%" in failure.get("message")
    summary = markdown(result)
    assert "latency new/base (largest)" in summary and "1.50x TTFT p" in summary and "**FAIL**" in summary
    assert "max latency increase" not in markdown(compare_runs(base, new))  # off: the reports are as before
    # Other cells kept their latency: judged and passed.
    others = result.rows[result.rows["cell"] != FAST]
    assert set(others["verdict"]) == {"ok"} and np.allclose(others["latency_ratio"], 1.0)
    # A tolerance wider than the increase passes; the reverse (lower latency) never fails.
    assert compare_runs(base, new, max_latency_increase=0.6).ok
    assert compare_runs(new, base, max_latency_increase=0.0).ok


def test_identical_and_noisy_latencies_pass_the_latency_gate(run, tmp_path) -> None:
    base = copy_run(run, tmp_path, "base", steady=True)
    same = compare_runs(base, copy_run(run, tmp_path, "same", steady=True), max_latency_increase=0.10)
    assert same.ok and same.problems == [] and set(same.rows["verdict"]) == {"ok"}
    assert np.allclose(same.rows["latency_ratio"], 1.0)
    # Every request's times moved by up to 2% either way: noise, on every percentile.
    noisy = copy_run(run, tmp_path, "noisy", steady=True)
    rng = np.random.default_rng(2)
    for path in (noisy / "cells").glob("*.parquet"):
        frame = pd.read_parquet(path)
        scale = rng.uniform(0.98, 1.02, len(frame))
        frame["token_times"] = [[t * s for t in row] for row, s in zip(frame["token_times"], scale, strict=True)]
        frame["ttft_s"] *= scale
        frame["e2e_s"] *= scale
        frame.to_parquet(path, index=False)
    for tolerance in (0.10, 0.05):
        result = compare_runs(base, noisy, max_latency_increase=tolerance)
        assert result.ok, result.problems
    assert ((result.rows["latency_ratio"] > 0.97) & (result.rows["latency_ratio"] < 1.05)).all()


def test_runs_without_latency_columns_are_skipped_with_a_note(run, tmp_path) -> None:
    old = copy_run(run, tmp_path, "old")
    for path in (old / "cells").glob("*.parquet"):
        frame = pd.read_parquet(path)
        frame.drop(columns=["ttft_s", "e2e_s", "token_times"]).to_parquet(path, index=False)
    result = compare_runs(old, run, max_latency_increase=0.10)
    assert result.ok, result.problems
    assert "latency_ratio" not in result.rows
    notes = [note for note in result.notes if note.startswith("latency not compared")]
    assert len(notes) == 1 and "3 cell(s)" in notes[0] and "no latency columns" in notes[0]
    assert "rose most" not in comparison_text(result)  # no latency table when no cell was judged


def test_the_compare_command_gates_latency_when_asked(run, tmp_path) -> None:
    base, new = copy_run(run, tmp_path, "base", steady=True), copy_run(run, tmp_path, steady=True)
    edit_cell(new, FAST, later_first_token(1.5))
    runner = CliRunner()
    assert runner.invoke(app, ["compare", str(base), str(new)]).exit_code == 0  # off by default
    result = runner.invoke(app, ["compare", str(base), str(new), "--max-latency-increase", "10%"],
                           env={"COLUMNS": "80"})
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "regression: self_speculative E=2 K=4: TTFT p50" in text and "10% tolerance" in text
    assert runner.invoke(app, ["compare", str(base), str(new), "--max-latency-increase", "0.6"]).exit_code == 0
    # A run from before the latency columns: a note, never a crash.
    smoke = Path(__file__).parent.parent / "results" / "ci-smoke"
    result = runner.invoke(app, ["compare", str(smoke), str(smoke), "--max-latency-increase", "10%"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "latency not compared in 20 cell(s)" in result.output, result.output
