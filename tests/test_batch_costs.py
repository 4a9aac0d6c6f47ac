"""Costs at batch B: FLOPs per row add up to what FlopCounterMode counts for the batch; weights read once."""

import pytest
import torch
from test_costs import TARGET, counter, rotary_flops, shape_of, synthetic

from skipbench.costs import costs_of_passes, pass_bytes, pass_flops, pass_frame
from skipbench.decoding.batch import BatchEngine, generate_batch
from skipbench.decoding.batch_stack import BatchStack
from skipbench.decoding.layers import DecoderStack
from skipbench.decoding.sampling import Sampler

CPU = torch.device("cpu")
PROMPTS = [[1, 5, 9, 12, 40, 41, 42], [1, 2], [1, 3, 4, 5], [8]]


def engine_for(kind: str, model):
    stack = BatchStack(DecoderStack(model))
    if kind == "self":
        return BatchEngine(stack, "exit", 1), 3
    if kind == "two":
        return BatchEngine(stack, "draft_model", draft=BatchStack(DecoderStack(synthetic("synthetic:tiny?layers=2",
                                                                                          "sdpa")))), 2
    return BatchEngine(stack), 0


@pytest.mark.parametrize("kind", ["autoregressive", "self", "two"])
def test_batched_passes_match_flop_counter(kind: str, monkeypatch) -> None:
    model = synthetic(TARGET, "sdpa")
    engine, k = engine_for(kind, model)
    shapes = {"target": shape_of(model)}
    if kind == "two":
        shapes["draft"] = shape_of(engine.draft_stack.stack.model)
    calls = []  # (model, rows, positions through layers) of every BatchStack.run: the rotary table it builds
    run = BatchStack.run

    def counted(self, inputs, cache, start, end, head=None, counts=None):
        calls.append((self.stack.model, inputs.shape[0], inputs.shape[1] if start < end else 0))
        return run(self, inputs, cache, start, end, head, counts)

    monkeypatch.setattr(BatchStack, "run", counted)
    with counter() as whole:
        rows, _ = generate_batch(engine, PROMPTS, max_new_tokens=10, num_speculations=k,
                                 samplers=[Sampler()] * len(PROMPTS), eos_ids=[], device=CPU)
    rotary = sum(rotary_flops(model, rows_ * n) for model, rows_, n in calls if n)  # (rows, n) positions at once
    analytical = sum(int(pass_flops(shapes[p.model], p.start, p.end, p.positions, p.context, p.head_positions,
                                    p.window)) for row in rows for p in row.passes)
    assert analytical == whole.get_total_flops() - rotary
    assert all(p.batch == len(PROMPTS) for row in rows for p in row.passes)
    # Weights are read once per pass for the whole batch: each row is charged a quarter.
    entry = rows[0].passes[-1]
    shape = shapes[entry.model]
    alone = pass_bytes(shape, entry.start, entry.end, entry.positions, entry.context, entry.head_positions,
                       entry.window)
    shared = pass_bytes(shape, entry.start, entry.end, entry.positions, entry.context, entry.head_positions,
                        entry.window, batch=4)
    kv = alone - (alone - shared) * 4 / 3
    assert shared < alone and abs((alone - kv) / 4 - (shared - kv)) < 1e-6 * alone
    total = sum(costs_of_passes(pass_frame(row.passes), shapes).bytes["total"] for row in rows)
    assert total > 0
