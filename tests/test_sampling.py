"""Speculative sampling must leave the target's distribution unchanged."""

import pytest
import torch
from conftest import make_model

from skipbench.decoding import policy as policies
from skipbench.decoding.layers import DecoderStack
from skipbench.decoding.loop import generate
from skipbench.decoding.sampling import Sampler
from skipbench.decoding.speculative import TwoModel

P = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
Q = torch.tensor([0.05, 0.05, 0.1, 0.1, 0.2, 0.5])


def chi_square_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Chi-square goodness of fit, categories with an expected count below 5 pooled (into the smallest
    category when the pool alone would still be below 5), as the test requires."""
    from scipy.stats import chisquare

    expected = expected_probs.double() * observed.sum()
    order = torch.argsort(expected)
    pool = torch.zeros_like(expected, dtype=torch.bool)
    total = 0.0
    for index in order.tolist():  # pool the rarest categories until the pool reaches 5
        if expected[index] >= 5 and total >= 5:
            break
        pool[index] = True
        total += float(expected[index])
    groups = [observed[~pool].double(), observed[pool].double().sum(0, keepdim=True)]
    expecteds = [expected[~pool], expected[pool].sum(0, keepdim=True)]
    return float(chisquare(torch.cat(groups).numpy(), torch.cat(expecteds).numpy()).pvalue)


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().sum() / 2)


def first_token_histogram(rule, draws: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sampler = Sampler(sample=True, generator=generator)
    target_logits = P.log().repeat(2, 1)
    counts = torch.zeros(len(P))
    for _ in range(draws):
        draft = torch.multinomial(Q, 1, generator=generator)
        kept, token = rule(sampler, draft, Q[None], target_logits).tolist()
        counts[int(draft) if kept else token] += 1
    return counts / draws


def test_acceptance_rule_reproduces_the_target_distribution():
    assert total_variation(P, Q) > 0.5  # the draft is far from the target: a broken rule shows
    observed = first_token_histogram(Sampler.accept, 20000)
    assert total_variation(observed, P) < 0.02


def test_a_broken_rule_would_fail_this_test():
    def always_accept(sampler, drafts, draft_probs, target_logits):
        return torch.tensor([len(drafts), int(sampler.draw(sampler.probs(target_logits)[-1:])[0])])

    def resample_from_target(sampler, drafts, draft_probs, target_logits):
        p = sampler.probs(target_logits)[0]
        if torch.rand((), generator=sampler.generator) < min(1.0, float(p[drafts[0]] / draft_probs[0][drafts[0]])):
            return torch.tensor([1, 0])
        return torch.tensor([0, int(sampler.draw(p[None])[0])])

    assert total_variation(first_token_histogram(always_accept, 5000), P) > 0.2
    assert total_variation(first_token_histogram(resample_from_target, 5000), P) > 0.05


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    sampler = Sampler(sample=True, top_p=0.75)
    probs = sampler.probs(P.log()[None])[0]
    assert torch.allclose(probs, torch.tensor([0.625, 0.25, 0.125, 0, 0, 0]))


def test_two_model_sampling_matches_the_target_distribution_end_to_end():
    vocab = 12
    target, draft = make_model("gqa", seed=1, vocab_size=vocab), make_model("gqa", seed=2, vocab_size=vocab)
    with torch.no_grad():  # sharpen both heads so the two distributions differ a lot
        target.lm_head.weight.mul_(25)
        draft.lm_head.weight.mul_(25)
    prompt = [1, 5, 7, 3]
    with torch.no_grad():
        p = torch.softmax(target(torch.tensor([prompt])).logits[0, -1].double(), -1)
        q = torch.softmax(draft(torch.tensor([prompt])).logits[0, -1].double(), -1)
    assert total_variation(p, q) > 0.3
    strategy = TwoModel(DecoderStack(target), DecoderStack(draft))
    counts = torch.zeros(vocab, dtype=torch.float64)
    draws = 800
    for seed in range(draws):
        sampler = Sampler(sample=True, generator=torch.Generator().manual_seed(seed))
        record = generate(strategy, prompt, max_new_tokens=2, num_speculations=1, sampler=sampler, eos_ids=[],
                          device=torch.device("cpu"))
        counts[record.tokens[0]] += 1
    assert chi_square_pvalue(counts, p) > 0.001
    # The draft alone would be a different distribution: this test can fail.
    assert chi_square_pvalue(counts, q) < 1e-6


VOCAB = 6  # small enough that a joint distribution of two tokens can be sampled densely


def sharp_model():
    """A tiny model whose sharpened heads make the exit at layer 1 disagree with the last layer."""
    model = make_model("gqa", seed=4, vocab_size=VOCAB)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


def joint_of(model, prompt: list[int]) -> torch.Tensor:
    """The target's exact joint p(t1) p(t2 | t1) of the first two tokens after `prompt`, flattened."""
    def next_probs(tokens):
        with torch.no_grad():
            return torch.softmax(model(torch.tensor([tokens])).logits[0, -1].double(), -1)

    first = next_probs(prompt)
    return torch.stack([first[a] * next_probs([*prompt, a]) for a in range(VOCAB)]).flatten()


def test_sampled_self_speculation_keeps_the_targets_joint_distribution():
    """Chi-square of the first two tokens against the target's exact joint p(t1) p(t2 | t1). With K=1 the
    second token is the verifier's bonus token whenever the draft is kept, so that path is exercised too."""
    from skipbench.decoding.self_speculative import SelfSpeculative

    vocab, model, prompt = VOCAB, sharp_model(), [1, 5, 3]
    joint = joint_of(model, prompt)
    strategy = SelfSpeculative(DecoderStack(model), exit_layer=1)
    counts, bonus, draws = torch.zeros(vocab * vocab), 0, 1500
    for seed in range(draws):
        sampler = Sampler(sample=True, generator=torch.Generator().manual_seed(seed))
        record = generate(strategy, prompt, max_new_tokens=2, num_speculations=1, sampler=sampler, eos_ids=[],
                          device=torch.device("cpu"))
        counts[record.tokens[0] * vocab + record.tokens[1]] += 1
        bonus += record.steps[0].accepted == 1
    assert 0.2 * draws < bonus < 0.9 * draws  # both the bonus path and the rejection path ran often
    assert chi_square_pvalue(counts, joint) > 0.001
    # The exit head alone would be a different distribution: this test can fail.
    exit_only = torch.zeros(vocab * vocab)
    for seed in range(draws):
        sampler = Sampler(sample=True, generator=torch.Generator().manual_seed(seed))
        stack = DecoderStack(model)
        cache = stack.new_cache(16)
        stack.run(stack.ids(prompt[:-1]), cache, 0, 1)
        _, logits = stack.run(stack.ids(prompt[-1:]), cache, 0, 1, head=1)
        a, _ = sampler.choose(logits)
        _, logits = stack.run(a, cache, 0, 1, head=1)
        b, _ = sampler.choose(logits)
        exit_only[int(a) * vocab + int(b)] += 1
    assert chi_square_pvalue(exit_only, joint) < 1e-6


@pytest.mark.parametrize("policy", ["confidence:0.5", "heuristic", "dynamic-exit"])
def test_sampled_draft_policies_keep_the_targets_joint_distribution(policy):
    """A policy changes how many tokens a round drafts and from which exit, never the distribution: chi-square of
    the first two of three tokens against the target's exact joint, for each policy (K=2, so a round may draft
    both, one, or, ended by low confidence, fewer than planned)."""
    from skipbench.decoding.self_speculative import SelfSpeculative

    vocab, model, prompt = VOCAB, sharp_model(), [1, 5, 3]
    joint = joint_of(model, prompt)
    stack = DecoderStack(model)
    strategy = SelfSpeculative(stack, exit_layer=1)
    counts, draws, drafted = torch.zeros(vocab * vocab), 1200, set()
    for seed in range(draws):
        sampler = Sampler(sample=True, generator=torch.Generator().manual_seed(seed))
        record = generate(strategy, prompt, max_new_tokens=3, num_speculations=2, sampler=sampler, eos_ids=[],
                          device=torch.device("cpu"), policy=policies.build(policy, 2, stack.num_layers, 1.0))
        counts[record.tokens[0] * vocab + record.tokens[1]] += 1
        drafted.add(tuple(step.drafted for step in record.steps))
    assert len(drafted) > 1  # the policy really varied the rounds
    assert chi_square_pvalue(counts, joint) > 0.001


def test_sampled_batches_keep_each_rows_joint_distribution():
    """Batched (B = 4, prompts of different lengths in one batch): every row's first two tokens still follow the
    target's joint distribution for its own prompt, through the per-row acceptance rule, each row with its own
    generator. Two strategies in one: self-speculative (K=2, so some rows draft past their budget) and two-model."""
    from skipbench.decoding.batch import BatchEngine, generate_batch
    from skipbench.decoding.batch_stack import BatchStack

    vocab, model = VOCAB, sharp_model()
    prompts = [[1, 5, 3], [2, 4], [1, 5, 3, 0, 2, 1], [3]]
    joints = [joint_of(model, prompt) for prompt in prompts]
    stack = BatchStack(DecoderStack(model))
    draft = BatchStack(DecoderStack(make_model("gqa", seed=9, vocab_size=vocab)))
    for engine, k in ((BatchEngine(stack, "exit", 1), 2), (BatchEngine(stack, "draft_model", draft=draft), 1)):
        counts = torch.zeros(len(prompts), vocab * vocab)
        for seed in range(800):
            samplers = [Sampler(sample=True, generator=torch.Generator().manual_seed(seed * 10 + row))
                        for row in range(len(prompts))]
            rows, _ = generate_batch(engine, prompts, max_new_tokens=2, num_speculations=k, samplers=samplers,
                                     eos_ids=[], device=torch.device("cpu"))
            for index, row in enumerate(rows):
                counts[index, row.tokens[0] * vocab + row.tokens[1]] += 1
        for index, joint in enumerate(joints):
            assert chi_square_pvalue(counts[index], joint) > 0.001, (engine.drafter, index)
        # A wrong row's distribution would fail: row 0's counts against row 1's prompt.
        assert chi_square_pvalue(counts[0], joints[1]) < 1e-6
