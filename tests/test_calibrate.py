"""The time model per (positions x rows): a table per batch size, a batched pass predicted from its own table and
counted once for the batch, old calibrations (batch 1 only) still read, and a sweep's batched cells predicted."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import make_model

from skipbench import calibrate
from skipbench.decoding.layers import DecoderStack
from skipbench.spec import Grid, Setup
from skipbench.summary import _predicted_seconds, load_summary
from skipbench.sweep import execute

OLD = {"context": 8, "layer_seconds": {"1": 1.0, "2": 1.5, "4": 2.5}, "head_seconds": {"1": 0.5, "4": 1.1}}
BATCHED = OLD | {"batches": {"4": {"layer_seconds": {"1": 2.0, "2": 3.0, "4": 5.0, "8": 9.0},
                                   "head_seconds": {"1": 0.8, "2": 1.4, "6": 4.0}}}}


def test_the_rows_a_run_calibrates_are_each_batch_size_and_each_smaller_last_batch():
    assert calibrate.batch_rows([1], 16) == [1]
    assert calibrate.batch_rows([1, 4], 10) == [1, 2, 4]  # batches of 4, 4 and 2
    assert calibrate.batch_rows([4, 16], 16) == [1, 4, 16]


def test_a_batch_is_calibrated_at_the_window_its_furthest_row_sees():
    lengths = [10, 30, 20, 40, 5, 6]
    # 1 row: the median prompt; 2 rows: batches' longest 30, 40, 6 -> 30; 4 rows: 40 and 6 -> 40; + 8 // 2
    assert calibrate.batch_contexts(lengths, [1, 2, 4], 8) == {1: 20 + 4, 2: 30 + 4, 4: 40 + 4}


def test_calibration_holds_a_table_per_batch_size():
    stack = DecoderStack(make_model("gqa"))
    sizes = calibrate.block_sizes(9, 2)
    found = calibrate.measure(stack, sizes, context=6, rows={1: 6, 4: 7}, most_drafts=2)
    assert sorted(int(n) for n in found["layer_seconds"]) == sizes == sorted(int(n) for n in found["head_seconds"])
    assert list(found["batches"]) == ["4"]
    four = found["batches"]["4"]
    assert four["context"] == 7
    assert sorted(four["layer_seconds"]) == sizes
    assert sorted(four["head_seconds"]) == [1, 2, 3, 4]  # batched heads run on decode and verify blocks only
    assert all(seconds > 0 for seconds in [*four["layer_seconds"].values(), *four["head_seconds"].values()])
    assert calibrate.table(found, 4) is four and calibrate.table(found, 1) is found
    assert "batches" not in calibrate.measure(stack, sizes, context=6)  # batch 1 alone: stored as before batches


def test_a_batched_pass_is_predicted_from_its_own_table_and_counted_once_per_batch():
    # Two rows' traces of one batch of 4 (each pass is in every row's trace), and a batch-1 row.
    one_row = [dict(model="target", start=0, end=3, positions=6, head_positions=0),  # prefill, no head
               dict(model="target", start=0, end=2, positions=1, head_positions=1),  # a draft
               dict(model="target", start=2, end=3, positions=3, head_positions=3)]  # the verify above the exit
    passes = pd.DataFrame([entry | {"batch": 4} for entry in one_row * 2]
                          + [dict(model="target", start=0, end=3, positions=2, head_positions=1, batch=1)])
    predicted = calibrate.pass_seconds(BATCHED, passes["start"], passes["end"], passes["positions"],
                                       passes["head_positions"], passes["batch"])
    # B=4: layer(6) = 7.0 (between 4 -> 5.0 and 8 -> 9.0), head(3) = 2.05 (between 2 -> 1.4 and 6 -> 4.0)
    by_hand = [3 * 7.0, 2 * 2.0 + 0.8, 1 * 4.0 + 2.05]
    assert list(predicted) == pytest.approx(by_hand * 2 + [3 * 1.5 + 0.5])
    # The cell's time: each row is charged 1/4 of the batch's passes, so two rows' traces are half a batch.
    assert _predicted_seconds(passes, {"target": BATCHED}) == pytest.approx(sum(by_hand) * 2 / 4 + 5.0)


def test_what_was_not_calibrated_predicts_nan_never_another_tables_number():
    assert np.isnan(calibrate.pass_seconds(BATCHED, 0, 3, 1, 1, 2))  # 2 rows were never timed
    assert np.isnan(calibrate.pass_seconds(OLD, 0, 3, 1, 1, 4))  # an old calibration holds batch 1 only
    assert np.isnan(calibrate.pass_seconds(BATCHED, 0, 3, 16, 0, 4))  # beyond the B=4 table's largest block
    assert np.isnan(calibrate.pass_seconds(BATCHED, 3, 3, 0, 7, 4))  # a head beyond the B=4 heads timed
    assert calibrate.pass_seconds(OLD, 0, 3, 9, 0, clamp=True) == pytest.approx(3 * 2.5)  # dryrun's estimate


def test_an_old_calibration_and_old_passes_predict_batch_1():
    passes = pd.DataFrame([dict(model="target", start=0, end=3, positions=2, head_positions=1)])  # no batch
    assert _predicted_seconds(passes, {"target": OLD}) == pytest.approx(3 * 1.5 + 0.5)
    assert calibrate.pass_seconds(OLD, [0, 2], [3, 3], [4, 3], [0, 4]).tolist() == pytest.approx([7.5, 2.0 + 1.1])


@pytest.fixture(scope="module")
def batched_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("batched") / "run"
    setup = Setup(model="synthetic:tiny", prompts=("hello there", "a b c", "x", "one two three four"),
                  max_new_tokens=6, repeats=2, warmup=0, threads=1)
    cells = Grid(strategies=("self_speculative",), exits=(1,), speculations=(2,), batch_sizes=(1, 4)).expand()
    execute(setup, cells, out)
    return out


def test_a_sweep_predicts_its_batched_cells(batched_run):
    summary, manifest = load_summary(batched_run)
    calibration = manifest["models"]["target"]["calibration"]
    assert list(calibration["batches"]) == ["4"]
    assert len(summary) == 4 and sorted(summary["batch_size"].unique()) == [1, 4]
    assert summary["model_seconds_per_token"].map(np.isfinite).all()
    spec = summary[(summary["strategy"] == "self_speculative") & (summary["batch_size"] == 4)].iloc[0]
    base = summary[(summary["strategy"] == "autoregressive") & (summary["batch_size"] == 4)].iloc[0]
    assert np.isfinite(spec["predicted_speedup_time"]) and spec["predicted_speedup_time"] > 0
    assert spec["predicted_speedup_time"] == pytest.approx(base["model_seconds_per_token"]
                                                           / spec["model_seconds_per_token"])
    assert spec["measured_over_predicted"] == pytest.approx(spec["speedup"] / spec["predicted_speedup_time"])


def test_a_manifest_calibrated_before_batches_still_loads(batched_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(batched_run, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["models"]["target"]["calibration"]["batches"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    summary, _ = load_summary(copy)
    one = summary[summary["batch_size"] == 1]
    assert one["predicted_speedup_time"].map(np.isfinite).all()
    assert summary[summary["batch_size"] == 4]["model_seconds_per_token"].isna().all()  # not B=1's number


def test_the_batch_report_shows_the_prediction_next_to_the_measurement(batched_run):
    from skipbench.batch_report import speedup_lines, speedup_table

    summary, _ = load_summary(batched_run)
    (line,) = speedup_lines(summary)
    assert line["batch"] == [1, 4] and all(np.isfinite(line["predicted"]))
    text = speedup_table([line])
    assert "| cell | B | measured [95% interval] | predicted | measured / predicted |" in text
    assert f"| {line['predicted'][1]:.2f}x |" in text
