"""Draft policies: they change how many tokens a round drafts and from which exit, never which tokens come out.

Greedy output equals autoregressive decoding for every policy on checkpoints of unusual shape; the hf backend
runs confidence and heuristic through transformers' own options with step-for-step equal counts; the extra work
(the dynamic-exit policy's shadow head rows) is recorded and counted exactly (FlopCounterMode).
"""

import pytest
import torch
from conftest import CONFIGS, make_model
from test_costs import counter, rotary_flops

from skipbench import spec
from skipbench.costs import ModelShape, costs_of_passes, pass_frame
from skipbench.decoding import policy as policies
from skipbench.decoding.autoregressive import Autoregressive
from skipbench.decoding.layers import DecoderStack
from skipbench.decoding.loop import agreement, generate
from skipbench.decoding.sampling import Sampler
from skipbench.decoding.self_speculative import SelfSpeculative
from skipbench.decoding.speculative import TwoModel
from skipbench.errors import SpecError
from skipbench.hf import generate_hf
from skipbench.models import load_model

PROMPT = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]
CPU = torch.device("cpu")
NEW = 30
POLICIES = ("confidence:0.3", "confidence:0.8", "heuristic", "dynamic-exit")


def head_layers(stack: DecoderStack) -> float:
    return stack.lm_head.weight.numel() / sum(weight.numel() for weight in stack.layers[0].parameters())


def decode(strategy, k, name="static", stack=None, sampler=None, new=NEW, prompt=PROMPT):
    layers = stack.num_layers if stack else 0
    policy = policies.build(name, k, layers, head_layers(stack) if stack else 0.0)
    return generate(strategy, prompt, max_new_tokens=new, num_speculations=k, sampler=sampler or Sampler(),
                    eos_ids=[], device=CPU, policy=policy)


def steps_of(record):
    return [(step.drafted, step.accepted) for step in record.steps]


def heuristic_schedule(record, start: int) -> list[int]:
    """The K transformers' heuristic plans before each step, replayed from the steps' counts."""
    planned, k = [], start
    for step in record.steps:
        planned.append(k)
        k = k + 2 if step.accepted == step.drafted else max(1, k - 1)
    return planned


@pytest.mark.parametrize("name", [*CONFIGS, "sharp"])
def test_every_policy_is_lossless_for_both_strategies(name):
    model = sharp_agreeing_model() if name == "sharp" else make_model(name)
    stack = DecoderStack(model)
    reference = decode(Autoregressive(stack), 0).tokens
    draft = DecoderStack(make_model("gqa", seed=7, vocab_size=model.config.vocab_size))
    for policy in POLICIES:
        for k in (1, 3, 5):
            strategies = [TwoModel(stack, draft), *(SelfSpeculative(stack, exit_layer)
                                                    for exit_layer in range(1, stack.num_layers))]
            for strategy in strategies:
                if policy == "dynamic-exit" and not isinstance(strategy, SelfSpeculative):
                    continue
                record = decode(strategy, k, policy, stack)
                assert record.tokens == reference, (name, policy, k)
                assert record.new_tokens == record.accepted + record.verify_steps == NEW
                remaining = [NEW - sum(s.accepted + 1 for s in record.steps[:i]) - 1 for i in range(len(record.steps))]
                if policy == "heuristic":
                    planned = heuristic_schedule(record, k)
                    expected = [min(p, r) for p, r in zip(planned, remaining, strict=True)]
                    assert [s.drafted for s in record.steps] == expected
                else:
                    assert all(s.drafted <= k for s in record.steps)
                if policy == "dynamic-exit":
                    candidates = range(1, stack.num_layers // 2 + 1)
                    assert all(s.exit_layer in candidates for s in record.steps)
                    assert record.steps[0].exit_layer == max(candidates)


def test_a_high_confidence_floor_drafts_less_than_a_low_one():
    model = make_model("odd")
    stack = DecoderStack(model)
    low = decode(SelfSpeculative(stack, 2), 5, "confidence:0.000001", stack)
    high = decode(SelfSpeculative(stack, 2), 5, "confidence:0.99", stack)
    static = decode(SelfSpeculative(stack, 2), 5, "static", stack)
    assert steps_of(low) == steps_of(static)  # no draft is that unsure
    assert high.drafted < static.drafted and all(s.drafted <= 1 for s in high.steps)


def test_dynamic_exit_statistics_are_the_greedy_agreement_of_each_exit():
    assert agreement([5, 6, 7, 5, 9, 7], (1, 2), [5, 6, 7]) == {1: (3, 3), 2: (2, 3)}
    policy = policies.DynamicExit(4, num_layers=8, head_layers=0.0)
    assert policy.candidates == (1, 2, 3, 4) and policy.plan().exit_layer == 4 and policy.plan().count == 1
    # Layer 2 always agrees, the others never: the cheapest exact exit with the longest draft wins.
    policy.observe(1, 1, {1: (0, 2), 2: (2, 2), 3: (0, 2), 4: (0, 2)})
    assert (policy.plan().exit_layer, policy.plan().count) == (2, 4)
    # Nobody agrees: draft one token from the cheapest exit (the least wasted work).
    policy.observe(4, 0, {layer: (0, 50) for layer in policy.candidates})
    assert policy.plan().count == 1


def sharp_agreeing_model():
    """Layers >= 3 of 4 add nothing, and a sharpened head: drafts are sometimes sure, sometimes not, and
    sometimes kept, so confidence floors and the heuristic schedule both have something to decide."""
    model = load_model("synthetic:tiny?agree=3").model
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


@pytest.mark.parametrize("name", ["odd", "sharp"])
def test_hf_confidence_and_heuristic_count_what_the_native_engine_counts(name):
    """transformers' assistant_confidence_threshold and heuristic schedule against skipbench's engine: the same
    tokens and, step for step, the same drafted and accepted counts."""
    try:
        import sklearn  # noqa: F401
        pytest.skip("scikit-learn makes transformers re-tune a draft model's confidence threshold")
    except ImportError:
        pass
    model = sharp_agreeing_model() if name == "sharp" else make_model(name)
    stack = DecoderStack(model)
    reference = decode(Autoregressive(stack), 0).tokens
    common = dict(max_new_tokens=NEW, sampler=Sampler(), eos_ids=[], device=CPU)
    draft = make_model("gqa", seed=3, vocab_size=model.config.vocab_size)
    for policy in ("confidence:0.3", "confidence:0.6", "heuristic"):
        for k in (1, 3):
            for exit_layer in range(1, stack.num_layers):
                theirs = generate_hf(model, PROMPT, exit_layer=exit_layer, num_speculations=k, draft_policy=policy,
                                     **common)
                ours = decode(SelfSpeculative(stack, exit_layer), k, policy, stack)
                assert theirs.tokens == reference and steps_of(theirs) == steps_of(ours), (policy, k, exit_layer)
            theirs = generate_hf(model, PROMPT, draft=draft, num_speculations=k, draft_policy=policy, **common)
            ours = decode(TwoModel(stack, DecoderStack(draft)), k, policy, stack)
            assert theirs.tokens == reference and steps_of(theirs) == steps_of(ours), (policy, k)


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_costs_match_flop_counter(policy):
    """Every matrix multiply of a generation, the shadow head rows included, is in its recorded passes."""
    model = make_model("odd")
    stack = DecoderStack(model)
    with counter() as whole:
        record = decode(SelfSpeculative(stack, 2), 3, policy, stack)
    costs = costs_of_passes(pass_frame(record.passes), {"target": ModelShape.from_config(model.config)})
    # Each pass over layers computes the rotary table once: a matmul before transformers 5, none after.
    rotary = sum(rotary_flops(model, entry.positions) for entry in record.passes if entry.start < entry.end)
    assert costs.flops["total"] == whole.get_total_flops() - rotary
    shadow = [entry for entry in record.passes if entry.start == entry.end == stack.num_layers]
    assert bool(shadow) == (policy == "dynamic-exit")
    if shadow:  # one pass per round: every candidate's row at each of its positions; the committed ones kept
        assert len(shadow) == record.verify_steps
        for entry, step in zip(shadow, record.steps, strict=True):
            assert entry.head_positions == 2 * (step.drafted + 1)  # "odd": 5 layers, candidates 1 and 2
            assert entry.kept_head_positions == 2 * (step.accepted + 1)


def test_policy_specs_are_checked_and_leave_static_keys_alone():
    setup = spec.Setup(prompts=("x",))
    static = spec.Cell("self_speculative", 4, 3)
    assert static.identity() == ("self_speculative", 4, 3, None, "native", 0)
    assert spec.cell_key(setup, static) == spec.cell_key(setup, spec.Cell("self_speculative", 4, 3,
                                                                          draft_policy="static"))
    dynamic = spec.Cell("self_speculative", None, 3, draft_policy="dynamic-exit")
    dynamic.check(8)
    assert dynamic.identity()[-1] == "dynamic-exit" and "dynamic-exit" in dynamic.label()
    assert spec.Cell.from_record({"strategy": "self_speculative", "exit_layer": 4, "num_speculations": 3,
                                  "draft_model": None, "backend": "native"}) == static
    for cell, message in [
        (spec.Cell("speculative", None, 3, "d", draft_policy="dynamic-exit"), "self_speculative"),
        (spec.Cell("self_speculative", 2, 3, draft_policy="dynamic-exit"), "no --exit-layer"),
        (spec.Cell("self_speculative", 2, 3, backend="compiled", draft_policy="heuristic"), "static"),
        (spec.Cell("self_speculative", None, 3, backend="hf", draft_policy="dynamic-exit"), "native"),
        (spec.Cell("self_speculative", 2, 3, draft_policy="confidence"), "confidence:T"),
        (spec.Cell("self_speculative", 2, 3, draft_policy="confidence:2"), "between 0 and 1"),
        (spec.Cell("self_speculative", 2, 3, draft_policy="eager"), "unknown draft policy"),
        (spec.Cell("autoregressive", draft_policy="heuristic"), "drafts nothing"),
    ]:
        with pytest.raises(SpecError, match=message):
            cell.check(8)
    grid = spec.grid_from({"exits": "1,2", "speculations": "2,4", "draft_policies": "static,dynamic-exit"})
    cells = grid.expand()
    assert sum(cell.draft_policy == "dynamic-exit" for cell in cells) == 2
    assert all(cell.exit_layer is None for cell in cells if cell.draft_policy == "dynamic-exit")


def test_sharp_model_exercises_every_policy():
    """On the sharpened agreeing model each policy really varies what it varies (else the tests above prove little)."""
    stack = DecoderStack(sharp_agreeing_model())
    confident = decode(SelfSpeculative(stack, 1), 4, "confidence:0.3", stack)
    assert len({step.drafted for step in confident.steps}) > 1
    heuristic = decode(SelfSpeculative(stack, 1), 4, "heuristic", stack)
    assert max(step.drafted for step in heuristic.steps) > 4 and min(step.drafted for step in heuristic.steps) == 1
    dynamic = decode(SelfSpeculative(stack, 1), 4, "dynamic-exit", stack)
    assert len({(step.exit_layer, step.drafted) for step in dynamic.steps}) > 2
