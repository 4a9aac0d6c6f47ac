"""Records of one cell: stop sequences, warm-up, and the row's raw counts."""

from skipbench.measure import run_cell
from skipbench.models import load_model
from skipbench.prompts import build_prompts
from skipbench.spec import Cell, Setup

MODEL = "synthetic:tiny"


def rows_for(cell, setup):
    target = load_model(MODEL)
    return run_cell(cell, setup, target, None, build_prompts(setup, target.tokenizer))


def test_a_stop_sequence_ends_generation_and_cuts_the_completion():
    free = Setup(model=MODEL, prompts=("def fibonacci(n):",), max_new_tokens=40, warmup=0)
    text = rows_for(Cell("autoregressive"), free)[0]["text"]
    stop = text[10:12]
    expected = text[: text.index(stop)]
    assert expected.strip()  # the stop sits after some text, so it must cut there
    stopped = Setup(model=MODEL, prompts=free.prompts, max_new_tokens=40, warmup=0, stop_sequences=(stop,))
    for cell in (Cell("autoregressive"), Cell("self_speculative", 2, 4)):
        row = rows_for(cell, stopped)[0]
        assert row["stop_reason"] == "stop" and row["completion"] == expected
        assert row["text"].startswith(text[: text.index(stop) + len(stop)])
        assert row["new_tokens"] < 40


def test_rows_hold_the_raw_counts_per_step():
    setup = Setup(model=MODEL, prompts=("abc", "hello world"), max_new_tokens=12, warmup=1)
    rows = rows_for(Cell("self_speculative", 1, 3), setup)
    assert [row["prompt_index"] for row in rows] == [0, 1]
    for row in rows:
        assert row["drafted"] == sum(row["step_drafted"]) and row["accepted"] == sum(row["step_accepted"])
        assert row["verify_steps"] == len(row["step_context"])
        assert row["step_context"][0] == row["prompt_tokens"] - 1
        assert row["decode_s"] == row["time_s"] - row["prefill_s"] and row["prefill_s"] > 0
