"""The native engine and the hf backend: token equality with autoregressive decoding, and exact counts."""

import pytest
import torch
from conftest import make_model

from skipbench.decoding.autoregressive import Autoregressive
from skipbench.decoding.layers import DecoderStack, EngineError, cache_keyword
from skipbench.decoding.loop import generate
from skipbench.decoding.sampling import Sampler
from skipbench.decoding.self_speculative import SelfSpeculative
from skipbench.decoding.speculative import TwoModel
from skipbench.hf import generate_hf
from skipbench.latency import gaps
from skipbench.models import load_model

PROMPT = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]
CPU = torch.device("cpu")
NEW = 30


def decode(strategy, k=0, prompt=PROMPT, new=NEW, eos=(), sampler=None):
    return generate(strategy, prompt, max_new_tokens=new, num_speculations=k, sampler=sampler or Sampler(),
                    eos_ids=list(eos), device=CPU)


def test_native_autoregressive_equals_transformers_generate(model):
    ours = decode(Autoregressive(DecoderStack(model)))
    theirs = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert ours.tokens == theirs
    assert ours.verify_steps == NEW and ours.drafted == 0


def check_counts(record, k):
    assert record.accepted <= record.drafted
    assert all(step.accepted <= step.drafted <= k for step in record.steps)
    # No EOS is given, so nothing is cut: every step's drafts-kept plus its own token are all output.
    assert record.stop_reason == "length"
    assert record.new_tokens == record.accepted + record.verify_steps == NEW


def test_self_speculative_equals_autoregressive_for_every_exit_and_k(model):
    stack = DecoderStack(model)
    reference = decode(Autoregressive(stack)).tokens
    for exit_layer in range(1, stack.num_layers):
        for k in range(1, 7):
            record = decode(SelfSpeculative(stack, exit_layer), k)
            assert record.tokens == reference, (exit_layer, k)
            check_counts(record, k)


def test_two_model_speculative_equals_autoregressive(model):
    stack = DecoderStack(model)
    reference = decode(Autoregressive(stack)).tokens
    unrelated = make_model("gqa", seed=7, vocab_size=model.config.vocab_size)
    for draft in (DecoderStack(model), DecoderStack(unrelated)):
        for k in range(1, 7):
            record = decode(TwoModel(stack, draft), k)
            assert record.tokens == reference, k
            check_counts(record, k)


def test_a_draft_that_is_the_target_itself_is_always_accepted(model):
    stack = DecoderStack(model)
    record = decode(TwoModel(stack, DecoderStack(model)), 4)
    assert record.accepted == record.drafted > 0


def steps_of(record):
    return [(step.drafted, step.accepted) for step in record.steps]


def test_hf_backend_equals_autoregressive_with_the_native_engines_counts(model):
    """transformers' generate() is an independent implementation: same tokens, and step for step the same
    drafted and accepted counts as skipbench's engine on the same greedy run."""
    stack = DecoderStack(model)
    reference = decode(Autoregressive(stack)).tokens
    common = dict(max_new_tokens=NEW, sampler=Sampler(), eos_ids=[], device=CPU)
    plain = generate_hf(model, PROMPT, **common)
    assert plain.tokens == reference and plain.verify_steps == NEW and plain.drafted == 0
    for exit_layer in range(1, stack.num_layers):
        for k in (1, 3):
            theirs = generate_hf(model, PROMPT, exit_layer=exit_layer, num_speculations=k, **common)
            ours = decode(SelfSpeculative(stack, exit_layer), k)
            assert theirs.tokens == reference, (exit_layer, k)
            assert steps_of(theirs) == steps_of(ours), (exit_layer, k)
    draft = make_model("gqa", seed=3, vocab_size=model.config.vocab_size)
    theirs = generate_hf(model, PROMPT, draft=draft, num_speculations=4, **common)
    ours = decode(TwoModel(stack, DecoderStack(draft)), 4)
    assert theirs.tokens == reference and steps_of(theirs) == steps_of(ours)


def test_eos_stops_is_excluded_and_counts_as_the_steps_output():
    model = make_model("gqa")
    stack = DecoderStack(model)
    reference = decode(Autoregressive(stack)).tokens
    eos = reference[7]  # pretend the 8th token is EOS
    cut = reference[: reference.index(eos)]
    ar = decode(Autoregressive(stack), eos=[eos])
    assert ar.tokens == cut and ar.stop_reason == "eos"
    assert ar.verify_steps == len(cut) + 1  # EOS is the last step's output: one token per step
    for strategy, k in ((SelfSpeculative(stack, 2), 4), (TwoModel(stack, DecoderStack(model)), 3)):
        record = decode(strategy, k, eos=[eos])
        assert record.tokens == cut and record.stop_reason == "eos"
        # Drafts kept past the EOS were never emitted and do not count as accepted: the EOS (emitted) is a
        # kept draft or the last step's own token, so the steps' outputs add up to the cut plus EOS.
        emitted = len(cut) + 1
        assert emitted in (record.accepted + record.verify_steps, record.accepted + record.verify_steps - 1)


def stop_inside_a_block(tokens, tokenizer, k):
    """A stop sequence that first appears in the middle of a speculative block (after some text)."""
    for end in range(3, len(tokens) - 1):
        if end % (k + 1) not in (0, k):  # not the first or last token of a fully accepted block
            text = tokenizer.decode(tokens[:end])
            stop = tokenizer.decode(tokens[end - 1 : end])
            if stop.strip() and text.index(stop) == len(text) - len(stop) and text.strip() != stop.strip():
                return stop
    raise AssertionError("no stop found")


def test_a_stop_inside_an_accepted_block_cuts_every_strategy_at_the_same_token():
    """Every draft is accepted (agree=2), so a stop lands inside a block: the tokens after it are computed
    but never emitted, and a speculative row equals the autoregressive one."""
    from skipbench.measure import stop_rule
    from skipbench.prompts import PromptSet

    loaded = load_model("synthetic:tiny?agree=2")
    stack = DecoderStack(loaded.model)
    reference = decode(Autoregressive(stack)).tokens
    stop = stop_inside_a_block(reference, loaded.tokenizer, 4)
    rule = stop_rule(PromptSet([], None, NEW, (stop,)), loaded.tokenizer)
    common = dict(max_new_tokens=NEW, num_speculations=4, sampler=Sampler(), eos_ids=[], device=CPU, stop=rule)
    ar = generate(Autoregressive(stack), PROMPT, **{**common, "num_speculations": 0})
    assert ar.stop_reason == "stop" and len(ar.tokens) < NEW and ar.verify_steps == ar.new_tokens
    for strategy in (SelfSpeculative(stack, 2), TwoModel(stack, DecoderStack(loaded.model))):
        record = generate(strategy, PROMPT, **common)
        assert record.tokens == ar.tokens and record.stop_reason == "stop"
        assert record.accepted + record.verify_steps - 1 <= record.new_tokens <= record.accepted + record.verify_steps
        assert record.steps[-1].accepted < record.steps[-1].drafted  # the cut fell inside the last block
    theirs = generate_hf(loaded.model, PROMPT, max_new_tokens=NEW, sampler=Sampler(), eos_ids=[], device=CPU,
                         exit_layer=2, num_speculations=4, stop=rule)
    assert theirs.tokens == ar.tokens and theirs.stop_reason == "stop"
    assert steps_of(theirs) == steps_of(generate(SelfSpeculative(stack, 2), PROMPT, **common))


def positions_seen(model):
    """Forward hooks on every layer, recording the positions each processes."""
    seen = {i: [] for i in range(model.config.num_hidden_layers)}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: seen[i].extend(kwargs["position_ids"][0].tolist()), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)]
    return seen, hooks


@pytest.mark.parametrize("k", [1, 3, 5])
def test_agreeing_model_accepts_everything_and_each_layer_sees_each_position_once(k):
    loaded = load_model("synthetic:tiny?agree=2")
    stack = DecoderStack(loaded.model)
    reference = decode(Autoregressive(stack)).tokens
    for exit_layer in range(2, stack.num_layers):
        seen, hooks = positions_seen(loaded.model)
        record = decode(SelfSpeculative(stack, exit_layer), k)
        for hook in hooks:
            hook.remove()
        assert record.tokens == reference
        assert record.accepted == record.drafted == NEW - record.verify_steps
        # Prefill covers the prompt but its last token; then every output token but the last is fed once.
        expected = list(range(len(PROMPT) - 1 + NEW - 1 + 1))
        for layer, positions in seen.items():
            assert sorted(positions) == expected, (exit_layer, layer)


def test_below_the_agreeing_layer_acceptance_is_lower():
    stack = DecoderStack(load_model("synthetic:tiny?agree=3").model)
    low = decode(SelfSpeculative(stack, 1), 4)
    assert low.accepted < low.drafted


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(EngineError, match="GPT2LMHeadModel"):
        DecoderStack(model)


def test_exit_layer_must_be_inside_the_model():
    stack = DecoderStack(make_model("gqa"))
    for bad in (0, 4, 9):
        with pytest.raises(EngineError, match="outside 1..3"):
            SelfSpeculative(stack, bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_float32_self_speculation_still_equals_autoregressive():
    cuda = torch.device("cuda")
    loaded = load_model("synthetic:tiny?agree=2", dtype="float32", device="cuda")
    stack = DecoderStack(loaded.model)
    common = dict(max_new_tokens=NEW, sampler=Sampler(), eos_ids=[], device=cuda)
    reference = generate(Autoregressive(stack), PROMPT, num_speculations=0, **common).tokens
    for exit_layer in range(1, stack.num_layers):
        assert generate(SelfSpeculative(stack, exit_layer), PROMPT, num_speculations=4, **common).tokens == reference


def test_cache_keyword_follows_the_installed_layer_signature() -> None:
    """transformers 5.25 renamed the layers' past_key_values= to cache=: the engine asks the signature."""

    class NewLayer(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, **kwargs):
            return hidden_states

    class OldLayer(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
            return hidden_states

    class AlienLayer(torch.nn.Module):
        def forward(self, hidden_states, kv_state=None):
            return hidden_states

    assert cache_keyword(NewLayer()) == "cache"
    assert cache_keyword(OldLayer()) == "past_key_values"
    with pytest.raises(EngineError, match=r"^transformers .* changed how a decoder layer takes its KV cache .*"
                                          r"supports transformers 4\.56 to 5\.25"):
        cache_keyword(AlienLayer())


def test_engine_makes_no_deprecated_call(model, recwarn) -> None:
    """The engine calls each layer with the keyword the installed transformers takes: no FutureWarning."""
    stack = DecoderStack(model)
    decode(Autoregressive(stack), new=4)
    decode(SelfSpeculative(stack, 1), k=3, new=6)
    deprecated = [w for w in recwarn if issubclass(w.category, FutureWarning)]
    assert deprecated == [], [str(w.message) for w in deprecated]


class RecordingDrafts(SelfSpeculative):
    """Self-speculation that keeps each round's drafted ids (the test reads them; the engine does not)."""

    def __init__(self, stack, exit_layer):
        super().__init__(stack, exit_layer)
        self.rounds: list[list[int]] = []

    def draft(self, last, count, sampler, **options):
        drafts, probs = super().draft(last, count, sampler, **options)
        self.rounds.append(drafts.tolist())
        return drafts, probs


def test_a_drafted_eos_ends_the_rounds_proposals_in_both_backends():
    """transformers' drafter stops a round once it proposes EOS; the native engine drafts all K but counts only
    the proposals up to that EOS: step for step the same drafted and accepted counts, and the same tokens."""
    model = make_model("gqa")
    stack = DecoderStack(model)
    k, exercised = 4, 0
    recorder = RecordingDrafts(stack, 1)
    decode(recorder, k)
    reference = decode(Autoregressive(stack)).tokens
    # Tokens the draft proposes before the last position of a round: as EOS they cut a round short.
    candidates = list(dict.fromkeys(token for drafts in recorder.rounds for token in drafts[:-1]))[:6]
    assert candidates
    for eos in candidates:
        ours = decode(SelfSpeculative(stack, 1), k, eos=[eos])
        theirs = generate_hf(model, PROMPT, exit_layer=1, num_speculations=k, max_new_tokens=NEW, sampler=Sampler(),
                             eos_ids=[eos], device=CPU)
        assert theirs.tokens == ours.tokens == reference[: len(ours.tokens)], eos
        assert steps_of(theirs) == steps_of(ours), eos
        exercised += any(step.drafted < k for step in ours.steps[:-1])
    assert exercised  # some round's drafts held an EOS before the round's last draft


def test_hf_backend_records_when_each_token_was_emitted():
    """generate_hf times its tokens as the native loop does: one time per new token autoregressively, one per
    verify round for assisted generation (a round's tokens are a burst), within the generation's time."""
    model = make_model("gqa")
    common = dict(max_new_tokens=NEW, sampler=Sampler(), eos_ids=[], device=CPU)
    plain = generate_hf(model, PROMPT, **common)
    times = plain.token_times
    assert len(times) == plain.new_tokens == NEW and len(set(times)) == NEW  # a step, a token, a time
    assert 0 < times[0] == plain.prefill_s and times == sorted(times) and times[-1] <= plain.time_s
    assert gaps(times) and min(gaps(times)) > 0  # ITL is measured now
    same_weights = make_model("gqa")  # a draft that is always accepted
    for options in (dict(exit_layer=3, num_speculations=3), dict(draft=same_weights, num_speculations=4)):
        assisted = generate_hf(model, PROMPT, **common, **options)
        times = assisted.token_times
        assert len(times) == assisted.new_tokens == NEW and times == sorted(times) and times[-1] <= assisted.time_s
        assert assisted.accepted > 0 and len(set(times)) == assisted.verify_steps < NEW  # bursts
        bursts = [times.count(at) for at in dict.fromkeys(times)]
        assert bursts == [step.accepted + 1 for step in assisted.steps], options
    # Cut at EOS: the times cover the emitted tokens only.
    cut = generate_hf(model, PROMPT, **(common | dict(eos_ids=[plain.tokens[7]])))
    assert cut.new_tokens == len(cut.token_times) < NEW and cut.stop_reason == "eos"
