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
