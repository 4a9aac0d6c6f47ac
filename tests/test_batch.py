"""The batched engine: every row decodes as the same prompt alone (greedy), whatever its neighbours do."""

import pytest
import torch
from conftest import make_model

from skipbench.decoding.autoregressive import Autoregressive
from skipbench.decoding.batch import BatchEngine, generate_batch
from skipbench.decoding.batch_stack import BatchStack
from skipbench.decoding.layers import DecoderStack
from skipbench.decoding.loop import generate
from skipbench.decoding.sampling import Sampler
from skipbench.decoding.self_speculative import SelfSpeculative
from skipbench.decoding.speculative import TwoModel

CPU = torch.device("cpu")
NEW = 16
# Different lengths, one of a single token (nothing to prefill), more rows than a typical batch of 4.
PROMPTS = [[1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100], [1, 5], [1, 40, 41, 42, 43, 44, 45],
           [7], [1, 90, 91, 92, 93], [1, 200, 201], [1, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26], [3, 4, 5, 6]]


def strategies(model, draft_model):
    """(name, batch-1 strategy, batched engine, K) for every strategy, on one target stack."""
    stack, draft = DecoderStack(model), DecoderStack(draft_model)
    batched, batched_draft = BatchStack(stack), BatchStack(draft)
    return [("autoregressive", Autoregressive(stack), BatchEngine(batched), 0),
            ("self_speculative", SelfSpeculative(stack, 2), BatchEngine(batched, "exit", 2), 3),
            ("self_speculative E=1", SelfSpeculative(stack, 1), BatchEngine(batched, "exit", 1), 5),
            ("speculative", TwoModel(stack, draft), BatchEngine(batched, "draft_model", draft=batched_draft), 4),
            ("speculative (self draft)", TwoModel(stack, stack), BatchEngine(batched, "draft_model", draft=batched),
             3)]


def alone(strategy, prompt, k, eos):
    return generate(strategy, prompt, max_new_tokens=NEW, num_speculations=k, sampler=Sampler(), eos_ids=eos,
                    device=CPU)


def steps(record):
    return [(step.context, step.drafted, step.accepted) for step in record.steps]


@pytest.mark.parametrize("shape", ["odd", "gqa"])
@pytest.mark.parametrize("size", [4, 8])
def test_every_row_equals_its_prompt_decoded_alone(shape, size):
    model = make_model(shape)
    draft_model = make_model(shape, seed=3)
    prompts = PROMPTS[:size]
    reference = [alone(Autoregressive(DecoderStack(model)), prompt, 0, []) for prompt in prompts]
    eos = [reference[0].tokens[5]]  # row 0 stops after 5 tokens; others at other steps or at the budget
    for name, strategy, engine, k in strategies(model, draft_model):
        singles = [alone(strategy, prompt, k, eos) for prompt in prompts]
        rows, wall = generate_batch(engine, prompts, max_new_tokens=NEW, num_speculations=k,
                                    samplers=[Sampler()] * len(prompts), eos_ids=eos, device=CPU)
        assert wall > 0
        for index, (row, single) in enumerate(zip(rows, singles, strict=True)):
            assert row.tokens == single.tokens, (name, index)
            assert steps(row) == steps(single), (name, index)
            assert row.stop_reason == single.stop_reason
            assert len(row.token_times) == row.new_tokens
            assert row.token_times == sorted(row.token_times) and row.time_s <= wall
        lengths = {len(row.steps) for row in rows}
        assert len(lengths) > 1, name  # rows finished at different steps


def test_compiled_batches_equal_each_prompt_decoded_alone_and_compile_nothing_while_decoding():
    """Compiled (static slots, one graph per (rows, positions)): at B = 4 and 16 every row's tokens and step counts
    equal its prompt decoded alone, for every strategy, with rows stopping at different steps; each batch runs the
    graphs warmed for it and compiles nothing more."""
    from torch._dynamo.utils import counters

    model, draft_model = make_model("odd"), make_model("odd", seed=3)
    prompts = [*PROMPTS, *[[1, *range(30 + row, 30 + row + row % 5)] for row in range(8)]]  # 16 rows
    k = 3
    capacity = max(map(len, prompts)) + NEW + k + 1
    stack = DecoderStack(model, compile=True, capacity=capacity)
    draft = DecoderStack(draft_model, compile=True, capacity=capacity)
    batched, batched_draft = BatchStack(stack), BatchStack(draft)
    eos = [alone(Autoregressive(DecoderStack(model)), prompts[0], 0, []).tokens[5]]
    cases = [(Autoregressive(DecoderStack(model)), BatchEngine(batched), Autoregressive(stack), 0),
             (SelfSpeculative(DecoderStack(model), 2), BatchEngine(batched, "exit", 2), SelfSpeculative(stack, 2), k),
             (SelfSpeculative(DecoderStack(model), 1), BatchEngine(batched, "exit", 1), SelfSpeculative(stack, 1), k),
             (TwoModel(DecoderStack(model), DecoderStack(draft_model)),
              BatchEngine(batched, "draft_model", draft=batched_draft), TwoModel(stack, draft), k)]
    for size in (4, 16):
        for _, _, shaped, drafts in cases:
            for compiled_stack, role, shapes in shaped.shapes(drafts, size):
                compiled_stack.warm(shapes, role)
    graphs, allocated = counters["stats"]["unique_graphs"], dict(stack._slots)
    assert set(allocated) == {("target", 4), ("target", 16)}  # the static slots, allocated while warming up
    for size in (4, 16):
        for eager, engine, _, drafts in cases:
            singles = [alone(eager, prompt, drafts, eos) for prompt in prompts[:size]]
            rows, _ = generate_batch(engine, prompts[:size], max_new_tokens=NEW, num_speculations=drafts,
                                     samplers=[Sampler()] * size, eos_ids=eos, device=CPU)
            for index, (row, single) in enumerate(zip(rows, singles, strict=True)):
                assert row.tokens == single.tokens, (type(eager).__name__, size, index)
                assert steps(row) == steps(single), (type(eager).__name__, size, index)
            assert {entry.window for row in rows for entry in row.passes if entry.start < entry.end} == {capacity}
            assert len({len(row.steps) for row in rows}) > 1
    assert counters["stats"]["unique_graphs"] == graphs and stack._slots == allocated
    # One graph per unit (pass inputs, a layer, the head) and pass shape, whatever the exits: E=1 and E=2 share.
    assert stack.compiled_graphs == len({("inputs", rows, n) for rows in (4, 16) for n in (1, k + 1)}) * 3


def test_a_finished_rows_work_is_recorded_as_wasted():
    model = make_model("tied")
    stack = BatchStack(DecoderStack(model))
    prompts = [PROMPTS[0], PROMPTS[2]]
    reference = alone(Autoregressive(DecoderStack(model)), prompts[0], 0, [])
    eos = [reference.tokens[2]]
    rows, _ = generate_batch(BatchEngine(stack, "exit", 1), prompts, max_new_tokens=NEW, num_speculations=2,
                             samplers=[Sampler(), Sampler()], eos_ids=eos, device=CPU)
    short = min(rows, key=lambda row: len(row.steps))
    after = [entry for entry in short.passes if entry.step >= len(short.steps)]
    assert after and all(entry.kept_positions == 0 and entry.kept_head_positions == 0 for entry in after)
    assert all(entry.batch == 2 for entry in short.passes)


def test_hf_batched_autoregressive_equals_each_prompt_alone():
    from skipbench.hf import generate_hf
    from skipbench.hf_batch import generate_hf_batch

    model = make_model("gqa")
    prompts = PROMPTS[:4]
    reference = generate_hf(model, prompts[0], max_new_tokens=NEW, sampler=Sampler(), eos_ids=[], device=CPU)
    eos = [reference.tokens[4]]
    singles = [generate_hf(model, prompt, max_new_tokens=NEW, sampler=Sampler(), eos_ids=eos, device=CPU)
               for prompt in prompts]
    rows, wall = generate_hf_batch(model, prompts, max_new_tokens=NEW, sampler=Sampler(), eos_ids=eos, device=CPU)
    for row, single in zip(rows, singles, strict=True):
        assert row.tokens == single.tokens and row.stop_reason == single.stop_reason
        assert row.verify_steps == single.verify_steps
        assert len(row.token_times) == row.new_tokens and row.time_s <= wall
    assert {row.stop_reason for row in rows} == {"eos", "length"}


def test_a_batch_transformers_cannot_decode_is_recorded_as_unsupported(tmp_path):
    """Assisted generation at B = 4: an unsupported record with the reason, in the tables; everything else runs
    and the sweep does not count it as a failure."""
    from skipbench.spec import Cell, Grid, Setup
    from skipbench.store import RunStore
    from skipbench.sweep import execute

    setup = Setup(model="synthetic:tiny", prompts=("hello there", "a b c", "x", "one two three four"),
                  max_new_tokens=4, repeats=1, warmup=0, threads=1)
    cells = Grid(strategies=("self_speculative",), exits=(1,), speculations=(2,), backends=("native", "hf"),
                 batch_sizes=(1, 4)).expand()
    assert Cell("self_speculative", 1, 2, backend="hf", batch_size=4) in cells
    assert Cell("autoregressive", batch_size=4) in cells and Cell("autoregressive") in cells
    store = execute(setup, cells, tmp_path / "run")
    errors = RunStore(tmp_path / "run").errors()
    assert [(error["cell_label"], error.get("unsupported")) for error in errors] == [
        ("self_speculative (hf) E=1 K=2 B=4", True)]
    assert "assisted generation" in errors[0]["error"]
    frame = store.read_cells()
    assert sorted(frame["batch_size"].unique()) == [1, 4]
    batched = frame[(frame["batch_size"] == 4) & (frame["strategy"] == "autoregressive")]
    assert len(batched) == 8  # native and hf, four prompts each, one batch
    from skipbench.report import write_report

    write_report(tmp_path / "run")
    table = (tmp_path / "run" / "tables" / "efficiency.md").read_text()
    assert "unsupported at batch 4" in table


def test_latency_columns_and_the_batch_report():
    import pandas as pd

    from skipbench.batch_report import latency_table, speedup_lines
    from skipbench.latency import latency_columns, tpot

    rows = [{"ttft_s": 0.1, "e2e_s": 0.4, "new_tokens": 4, "token_times": [0.1, 0.1, 0.3, 0.4]},
            {"ttft_s": 0.2, "e2e_s": 0.2, "new_tokens": 1, "token_times": [0.2]}]
    columns = latency_columns(rows)
    assert columns["ttft_p50_s"] == pytest.approx(0.15) and columns["e2e_p99_s"] == pytest.approx(0.398)
    assert columns["tpot_p50_s"] == pytest.approx(tpot(0.1, 0.4, 4)) == pytest.approx(0.1)  # one request of >1
    assert columns["itl_p50_s"] == pytest.approx(0.1)  # gaps 0 (a burst), 0.2, 0.1
    assert latency_columns([{"new_tokens": 3}]) == {}  # rows of runs before latency columns
    summary = pd.DataFrame([dict(cell_label=f"self_speculative E=1 K=2 B={b}", strategy="self_speculative",
                                 exit_layer=1, num_speculations=2, draft_model=None, backend="native", replica=0,
                                 draft_policy="static", batch_size=b, is_baseline=False, speedup=s, speedup_low=lo,
                                 speedup_high=hi, **columns)
                            for b, s, lo, hi in ((1, 1.5, 1.2, 1.8), (4, 1.1, 0.9, 1.3), (16, 0.7, 0.6, 0.8))])
    (line,) = speedup_lines(summary)
    assert line["stops_paying"] == 16 and line["batch"] == [1, 4, 16]
    assert "TTFT p50" in latency_table(summary)
