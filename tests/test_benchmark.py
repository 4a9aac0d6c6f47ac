import json

from skipbench.benchmark import filler_prompt, run_benchmark
from skipbench.models import ByteTokenizer
from skipbench.store import RunStore
from skipbench.summary import load_summary


def test_filler_prompt_is_long_enough_to_cut_to_the_asked_length():
    assert len(ByteTokenizer().encode(filler_prompt(64))) > 64


def test_benchmark_covers_every_path_and_writes_its_table(tmp_path):
    result = run_benchmark("synthetic:tiny?agree=2", "synthetic:tiny?agree=2&layers=2", [1, 2], [2], tmp_path,
                           prompt_tokens=24, new_tokens=10, prompts=2, repeats=2, device="cpu", threads=1,
                           compiled=False)
    rows = result["rows"]
    labels = [row["decoding"] for row in rows]
    assert labels == ["autoregressive", "self_speculative E=1 K=2", "self_speculative E=2 K=2",
                      "speculative draft=synthetic:tiny?agree=2&layers=2 K=4", "autoregressive (hf)",
                      "autoregressive (hf_static)", "self_speculative (hf) E=1 K=4", "self_speculative (hf) E=2 K=4",
                      "speculative (hf) draft=synthetic:tiny?agree=2&layers=2 K=4"]
    assert rows[0]["speedup_vs_native_ar"] == 1.0 and rows[0]["tokens_per_verify_step"] == 1.0
    summary = json.loads((tmp_path / "benchmark.json").read_text())
    assert summary["roofline_tokens_per_s"] > 0 and len(summary["rows"]) == len(rows)
    assert (tmp_path / "benchmark.md").read_text().count("\n| ") == len(rows) + 1
    frame = RunStore(tmp_path).read_cells()
    exact = frame[frame["cell_label"].isin(["self_speculative E=2 K=2", "self_speculative (hf) E=2 K=4"])]
    assert (exact["accepted"] == exact["drafted"]).all()  # agree=2: exit 2 is the final layer in disguise
    assert (frame.groupby("cell_label")["prompt_tokens"].max() == 24).all()
    # One speedup definition: the benchmark's native rows are the summary's speedups (same baseline).
    summary_frame, _ = load_summary(tmp_path)
    native = summary_frame[summary_frame["backend"] == "native"].set_index("cell_label")["speedup"]
    for row in rows:
        if row["decoding"] in native:
            assert row["speedup_vs_native_ar"] == native[row["decoding"]]


def test_the_benchmark_command_prints_a_table_that_fits_80_columns(tmp_path):
    from typer.testing import CliRunner

    from skipbench.cli import app

    result = CliRunner().invoke(app, ["benchmark", "--model", "synthetic:tiny?agree=2", "--draft-model",
                                      "synthetic:tiny?agree=2&layers=2", "--exits", "1", "--speculations", "2",
                                      "--prompt-tokens", "16", "--new-tokens", "6", "--prompts", "2", "--repeats",
                                      "2", "--no-compiled", "--device", "cpu", "--threads", "1",
                                      "--out", str(tmp_path / "b")], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    text = " ".join(result.output.split())
    assert "self_speculative E=1 K=2" in text and "d1: draft model synthetic:tiny?agree=2&layers=2" in text
    assert "benchmark.md" in text and "| " not in result.output  # the wide Markdown table stays in the file
