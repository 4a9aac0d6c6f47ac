"""Tests for skipbench.flops: hand-worked counts, FlopCounterMode agreement, strategy accounting."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from skipbench.flops import (
    Costs,
    ModelShape,
    forward_bytes,
    forward_flops,
    generation_costs,
    generation_passes,
    kv_cache_bytes,
    layer_flops,
    lm_head_flops,
    params_resident,
    predicted_speedup,
    roofline,
)

# hidden 8, 2 layers, 2 heads (head_dim 4, q_dim 8), 1 kv head (kv_dim 4), intermediate 16, vocab 10.
HAND = ModelShape(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)

# --------------------------------------------------------------------------- hand-worked counts


def test_from_config_reads_fields() -> None:
    cfg = LlamaConfig(
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=16,
        vocab_size=10,
    )
    assert ModelShape.from_config(cfg) == HAND  # head_dim = 8 // 2, untied, default 2 bytes
    tied = ModelShape.from_config(
        dict(cfg.to_dict(), tie_word_embeddings=True, dtype="float32", head_dim=6), bytes_per_param=None
    )
    assert (tied.tied_embeddings, tied.bytes_per_param, tied.head_dim) == (True, 4, 6)
    assert ModelShape.from_config(cfg, bytes_per_param=1).bytes_per_param == 1
    assert ModelShape.from_config(LlamaConfig(**CONFIGS["tiny"], dtype="float32")).bytes_per_param == 4
    assert ModelShape.from_config({**CONFIGS["tiny"], "torch_dtype": "float16"}).bytes_per_param == 2


def test_params_hand_worked() -> None:
    p = HAND.params()
    assert p.embedding == 10 * 8 == 80
    # q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192; mlp 3*8*16 = 384; two norms 2*8 = 16
    assert p.per_layer == 192 + 384 + 16 == 592
    assert p.layers == 2 * 592 == 1184
    assert p.final_norm == 8
    assert p.lm_head == 80
    assert p.total == 80 + 1184 + 8 + 80 == 1352
    tied = replace(HAND, tied_embeddings=True)
    assert tied.params().lm_head == 0
    assert tied.params().total == 1352 - 80
    assert params_resident(HAND) == 1352
    assert params_resident(HAND, tied) == 1352 + 1272
    assert params_resident(HAND, in_bytes=True) == 2 * 1352


@pytest.mark.parametrize("name", ["tiny", "tiny_hd"])
def test_params_match_real_model(name: str) -> None:
    model = make_model(name)
    shape = ModelShape.from_config(model.config)
    assert shape.params().total == sum(p.numel() for p in model.parameters())  # tied counted once


def test_forward_flops_hand_worked() -> None:
    # Prefill n=3, c=0, per layer:
    #   projections 2*3*8*(8+4+4+8) = 1152, attention 2*2 * heads 2 * 3 * (0+3) * 4 = 288,
    #   mlp 2*3*3*8*16 = 2304  -> 3744
    assert layer_flops(HAND, 3, 0) == 1152 + 288 + 2304 == 3744
    assert forward_flops(HAND, 3, 0) == 2 * 3744 == 7488
    # LM head on one position: 2*8*10 = 160
    assert lm_head_flops(HAND, 1) == 160
    assert forward_flops(HAND, 3, 0, head_positions=1) == 7488 + 160
    # Decode n=1, c=5: projections 2*8*24 = 384, attention 4*2*1*6*4 = 192, mlp 2*3*8*16 = 768
    assert layer_flops(HAND, 1, 5) == 384 + 192 + 768 == 1344
    assert forward_flops(HAND, 1, 5, head_positions=1) == 2 * 1344 + 160 == 2848
    # Spans: layer 1 alone, and the empty span with only the head.
    assert forward_flops(HAND, 1, 5, start=1, end=2) == 1344
    assert forward_flops(HAND, 1, 5, start=2, end=2, head_positions=1) == 160
    # Verify-like n=5, c=4: proj 2*5*8*24 = 1920, attn 4*2*5*9*4 = 1440, mlp 2*5*384 = 3840
    assert forward_flops(HAND, 5, 4, head_positions=5) == 2 * (1920 + 1440 + 3840) + 5 * 160 == 15200
    with pytest.raises(ValueError):
        forward_flops(HAND, 1, 0, start=1, end=3)
    with pytest.raises(ValueError):
        forward_flops(HAND, 1, 0, head_positions=2)


def test_forward_bytes_hand_worked() -> None:
    # Decode n=1, c=5 with head, 2 bytes/param:
    #   weights: 2 layers * 592 + final norm 8 + head 10*8 = 1272 params -> 2544 bytes
    #   KV per layer: (k+v) 2 * kv_dim 4 * 2 bytes = 16 B/position, read 6 + write 1 -> 112; 2 layers -> 224
    assert forward_bytes(HAND, 1, 5, head_positions=1) == 2544 + 224 == 2768
    # Without head, one layer: 592*2 + 112
    assert forward_bytes(HAND, 1, 5, start=0, end=1) == 1184 + 112
    # Tied head is still read when it runs.
    tied = replace(HAND, tied_embeddings=True)
    assert forward_bytes(tied, 1, 5, head_positions=1) == 2768
    assert forward_bytes(HAND, 0, 5) == 0
    # Full cache of 10 tokens: 10 * 2 layers * 2 * 4 * 2 bytes
    assert kv_cache_bytes(HAND, 10) == 320


def test_generation_costs_autoregressive_hand_worked() -> None:
    costs = generation_costs(
        HAND, strategy="autoregressive", prompt_tokens=4, steps=[(3, 0, 0), (4, 0, 0)], new_tokens=2
    )
    # prefill 3 positions, all layers: 2 * 3744
    assert costs.flops.prefill == 7488
    # step c=3: per layer 384 + 4*2*1*4*4=128 + 768 = 1280; c=4: 384 + 160 + 768 = 1312; + head 160 each
    assert costs.flops.verify == (2 * 1280 + 160) + (2 * 1312 + 160) == 5504
    assert costs.flops.draft == costs.flops.wasted == 0
    assert costs.flops.total == 7488 + 5504
    assert costs.flops_per_token == (7488 + 5504) / 2
    # prefill bytes: 1184 params * 2 + KV 2 layers * 16 * (3 + 3)
    assert costs.bytes.prefill == 2368 + 2 * 16 * 6


def test_generation_costs_self_speculative_hand_worked() -> None:
    # P=4, exit layer 1 of 2, one step at context 3 drafting 2 and keeping 1.
    costs = generation_costs(
        HAND,
        strategy="self_speculative",
        prompt_tokens=4,
        steps=[(3, 2, 1)],
        exit_layer=1,
        new_tokens=2,
    )
    assert costs.flops.prefill == 7488
    # draft 0: layer 0 on 1 position at c=3 (1280) + exit head 160 = 1440, all kept
    # draft 1: layer 0 at c=4 (1312) + head 160 = 1472; its draft was rejected -> head 160 wasted
    assert costs.flops.draft == 1440 + 1472
    # verify: layer 0 on the last draft at c=5 (1344, rejected position: wasted)
    #   layer 1 on 3 positions at c=3: proj 1152 + attn 4*2*3*6*4 = 576 + mlp 2304 = 4032, head 3*160
    #   kept part: 2 positions at c=3: proj 768 + attn 4*2*2*5*4 = 320 + mlp 1536 = 2624, head 2*160
    assert costs.flops.verify == 1344 + 4032 + 480
    assert costs.flops.wasted == 160 + 1344 + (4032 + 480 - 2624 - 320)
    assert costs.flops.wasted_share == pytest.approx(3072 / (2912 + 5856))


def test_step_records_accept_mappings_and_objects() -> None:
    class Step:
        def __init__(self, context: int, drafted: int, accepted: int) -> None:
            self.context, self.drafted, self.accepted = context, drafted, accepted

    kw = dict(strategy="self_speculative", prompt_tokens=4, exit_layer=1, new_tokens=2)
    a = generation_costs(HAND, steps=[(3, 2, 1)], **kw)
    b = generation_costs(HAND, steps=[{"context": 3, "drafted": 2, "accepted": 1}], **kw)
    c = generation_costs(HAND, steps=[Step(3, 2, 1)], **kw)
    assert a == b == c
    with pytest.raises(ValueError):
        generation_costs(HAND, steps=[(3, 2, 3)], **kw)
    with pytest.raises(ValueError, match="prefill"):
        generation_costs(HAND, steps=[(0, 2, 1)], **kw)  # hf-style record on the native convention


def test_as_dict_and_zero_tokens() -> None:
    costs = generation_costs(HAND, strategy="autoregressive", prompt_tokens=1, steps=[], new_tokens=0)
    assert isinstance(costs, Costs)
    assert costs.flops.total == 0  # P == 1: no prefill
    assert math.isnan(costs.flops_per_token)
    row = generation_costs(
        HAND, strategy="autoregressive", prompt_tokens=4, steps=[(3, 0, 0)], new_tokens=1
    ).as_dict()
    assert row["flops_total"] == row["flops_prefill"] + row["flops_verify"]
    assert row["bytes_per_token"] == row["bytes_total"]


# --------------------------------------------------------------------------- real models


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode has no formula for the CPU SDPA kernel; give it the standard one.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def counter() -> FlopCounterMode:
    mapping = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


CONFIGS = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=128,
    ),
    # head_dim * heads != hidden, and tied embeddings
    "tiny_hd": dict(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=80,
        vocab_size=96,
        tie_word_embeddings=True,
    ),
    "medium": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=688,
        vocab_size=2048,
    ),
}


def make_model(name: str, attn: str = "sdpa", **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**CONFIGS[name], **overrides}, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


class KV:
    """Minimal KV cache (the only method decoder layers call is ``update``)."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self.kv:
            old_k, old_v = self.kv[layer_idx]
            k, v = torch.cat([old_k, k], dim=-2), torch.cat([old_v, v], dim=-2)
        self.kv[layer_idx] = (k, v)
        return k, v

    def length(self, layer_idx: int) -> int:
        return self.kv[layer_idx][0].shape[-2] if layer_idx in self.kv else 0

    def crop(self, length: int) -> None:
        self.kv = {i: (k[..., :length, :], v[..., :length, :]) for i, (k, v) in self.kv.items()}


class Runner:
    """Drives a model layer by layer, measuring each call with FlopCounterMode under a tag."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model
        self.flops: dict[str, int] = {}

    def _count(self, tag: str, fn):
        with torch.no_grad(), counter() as fc:
            out = fn()
        self.flops[tag] = self.flops.get(tag, 0) + fc.get_total_flops()
        return out

    def embed(self, n: int) -> torch.Tensor:
        ids = torch.randint(0, self.model.config.vocab_size, (1, n))
        with torch.no_grad():
            return self.model.model.embed_tokens(ids)

    def layers(self, tag: str, cache: KV, hidden: torch.Tensor, start: int, end: int, context: int):
        n = hidden.shape[1]
        pos = torch.arange(context, context + n)[None]
        mask = torch.zeros(1, 1, n, context + n)
        mask[0, 0] = mask[0, 0].masked_fill(pos[0, :, None] < torch.arange(context + n)[None], float("-inf"))
        with torch.no_grad():
            rope = self.model.model.rotary_emb(hidden, pos)

        def run():
            h = hidden
            for layer in self.model.model.layers[start:end]:
                h = layer(
                    h,
                    attention_mask=mask,
                    position_ids=pos,
                    past_key_values=cache,
                    use_cache=True,
                    position_embeddings=rope,
                )
                h = h[0] if isinstance(h, tuple) else h
            return h

        return self._count(tag, run)

    def head(self, tag: str, hidden: torch.Tensor, last: int) -> torch.Tensor:
        return self._count(tag, lambda: self.model.lm_head(self.model.model.norm(hidden[:, -last:])))

    @property
    def total(self) -> int:
        return sum(self.flops.values())


def close(measured: int, predicted: int) -> bool:
    return abs(measured - predicted) <= 0.02 * measured


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_forward_matches_flop_counter(name: str, attn: str) -> None:
    model = make_model(name, attn)
    shape = ModelShape.from_config(model.config)
    cache = DynamicCache(config=model.config)
    vocab = model.config.vocab_size
    for n, c in [(7, 0), (1, 7), (5, 8)]:  # prefill, decode, verify-like
        with torch.no_grad(), counter() as fc:
            model(torch.randint(0, vocab, (1, n)), past_key_values=cache, use_cache=True)
        # transformers computes logits for every position by default.
        predicted = forward_flops(shape, n, c, head_positions=n)
        assert close(fc.get_total_flops(), predicted), (n, c, fc.get_total_flops(), predicted)
        # The attention term on its own (everything but the linear layers' mm), so the
        # tolerance cannot hide it on configs where it is a small share.
        by_op = {str(op): v for op, v in fc.get_flop_counts()["Global"].items()}
        attention = sum(v for op, v in by_op.items() if op not in ("aten.mm", "aten.addmm"))
        assert close(attention, shape.layers * 4 * shape.heads * n * (c + n) * shape.head_dim)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_spans_match_flop_counter(name: str, attn: str) -> None:
    model = make_model(name, attn)
    shape = ModelShape.from_config(model.config)
    n_layers = shape.layers
    cases = [
        (6, 0, 0, n_layers, 0),  # prefill, no head
        (1, 6, 0, 1, 1),  # decode through an exit layer plus head
        (5, 6, 1, n_layers, 5),  # verify-like upper span, head on all
        (1, 11, 0, n_layers, 1),  # decode through the whole model
    ]
    runner = Runner(model)
    for i, (n, c, start, end, head) in enumerate(cases):
        cache = KV()
        if c:
            Runner(model).layers("fill", cache, runner.embed(c), 0, n_layers, 0)  # not measured
        tag = f"case{i}"
        hidden = runner.layers(tag, cache, runner.embed(n), start, end, c)
        if head:
            runner.head(tag, hidden, head)
        predicted = forward_flops(shape, n, c, start=start, end=end, head_positions=head)
        assert close(runner.flops[tag], predicted), (i, runner.flops[tag], predicted)


# --------------------------------------------------------------------------- scripted generations

PROMPT = 5
SPEC_STEPS = [(4, 3, 3), (8, 3, 1), (10, 2, 0), (11, 0, 0), (12, 3, 2), (15, 3, 3)]
AR_STEPS = [(c, 0, 0) for c in range(4, 12)]


def run_autoregressive(model, prompt: int, steps, prefill: int) -> Runner:
    r = Runner(model)
    cache = KV()
    L = model.config.num_hidden_layers
    if prefill:
        r.layers("prefill", cache, r.embed(prefill), 0, L, 0)
    for j, (c, _, _) in enumerate(steps):
        m = prompt - prefill if j == 0 else 1
        h = r.layers("low", cache, r.embed(m), 0, 1, c)
        h = r.layers("high", cache, h, 1, L, c)
        r.head("head", h, 1)
    return r


def run_self_speculative(model, prompt: int, steps, exit_layer: int) -> Runner:
    """The native engine: low layers shared with the verifier, exit-query cache for layer E."""
    r = Runner(model)
    cache = KV()
    L = model.config.num_hidden_layers
    r.layers("prefill", cache, r.embed(prompt - 1), 0, L, 0)
    for c, k, a in steps:
        exit_states = []
        for i in range(k):
            h = r.layers("low", cache, r.embed(1), 0, exit_layer, c + i)
            exit_states.append(h)
            r.head("draft_head", h, 1)
        exit_states.append(r.layers("low", cache, r.embed(1), 0, exit_layer, c + k))
        h = r.layers("high", cache, torch.cat(exit_states, dim=1), exit_layer, L, c)
        r.head("head", h, k + 1)
        cache.crop(c + 1 + a)
    return r


def run_two_model(target, draft, prompt: int, steps, prefill: int, draft_layers: int | None = None) -> Runner:
    """Two caches; ``draft_layers`` set means the draft is the target's own first layers (hf early exit)."""
    r = Runner(target)
    d = Runner(draft)
    t_cache, d_cache = KV(), KV()
    L = target.config.num_hidden_layers
    LD = draft_layers or draft.config.num_hidden_layers
    if prefill:
        r.layers("prefill", t_cache, r.embed(prefill), 0, L, 0)
        d.layers("prefill", d_cache, d.embed(prefill), 0, LD, 0)
    for j, (c, k, a) in enumerate(steps):
        m = prompt - prefill if j == 0 else 1
        for i in range(k):
            have = d_cache.length(0)
            # First pass feeds everything the draft cache lacks, up to and including the input.
            n = c + m - have if i == 0 else 1
            h = d.layers("draft", d_cache, d.embed(n), 0, LD, have)
            d.head("draft", h, 1)
        h = r.layers("verify", t_cache, r.embed(m + k), 0, L, c)
        r.head("verify", h, k + 1)
        t_cache.crop(c + m + a)
        d_cache.crop(c + m + a)
    # Merge the draft runner's counts into the target runner under "draft_" tags.
    for tag, value in d.flops.items():
        r.flops["draft_" + tag] = value
    return r


def test_autoregressive_generation_matches_flop_counter() -> None:
    model = make_model("tiny")
    shape = ModelShape.from_config(model.config)
    r = run_autoregressive(model, PROMPT, AR_STEPS, PROMPT - 1)
    costs = generation_costs(
        shape, strategy="autoregressive", prompt_tokens=PROMPT, steps=AR_STEPS, new_tokens=len(AR_STEPS)
    )
    assert close(r.flops["prefill"], costs.flops.prefill)
    assert close(r.total - r.flops["prefill"], costs.flops.verify)
    assert close(r.total, costs.flops.total)


def test_autoregressive_hf_folded_prefill_matches_flop_counter() -> None:
    model = make_model("tiny")
    shape = ModelShape.from_config(model.config)
    steps = [(0, 0, 0)] + [(c, 0, 0) for c in range(PROMPT, PROMPT + 4)]
    r = run_autoregressive(model, PROMPT, steps, prefill=0)
    costs = generation_costs(
        shape, strategy="autoregressive", prompt_tokens=PROMPT, steps=steps, backend="hf", new_tokens=5
    )
    assert costs.flops.prefill == 0
    assert close(r.total, costs.flops.verify)


@pytest.mark.parametrize("exit_layer", [1, 2])
def test_self_speculative_generation_matches_flop_counter(exit_layer: int) -> None:
    model = make_model("tiny")
    shape = ModelShape.from_config(model.config)
    r = run_self_speculative(model, PROMPT, SPEC_STEPS, exit_layer)
    costs = generation_costs(
        shape,
        strategy="self_speculative",
        prompt_tokens=PROMPT,
        steps=SPEC_STEPS,
        exit_layer=exit_layer,
        new_tokens=sum(a + 1 for _, _, a in SPEC_STEPS),
    )
    assert close(r.flops["prefill"], costs.flops.prefill)
    assert close(r.total, costs.flops.total)
    # Layer-<E work is split across draft and verify; the exit heads are draft work.
    passes = generation_passes(
        shape, strategy="self_speculative", prompt_tokens=PROMPT, steps=SPEC_STEPS, exit_layer=exit_layer
    )
    low = sum(p.flops(shape) - lm_head_flops(shape, p.head_positions) for p in passes if p.end == exit_layer)
    assert close(r.flops["low"], low)


def test_two_model_generation_matches_flop_counter() -> None:
    target = make_model("medium")
    draft = make_model(
        "medium", num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4
    )
    shape, dshape = ModelShape.from_config(target.config), ModelShape.from_config(draft.config)
    r = run_two_model(target, draft, PROMPT, SPEC_STEPS, PROMPT - 1)
    costs = generation_costs(
        shape,
        strategy="speculative",
        prompt_tokens=PROMPT,
        steps=SPEC_STEPS,
        draft_shape=dshape,
        new_tokens=sum(a + 1 for _, _, a in SPEC_STEPS),
    )
    assert close(r.flops["prefill"] + r.flops["draft_prefill"], costs.flops.prefill)
    assert close(r.flops["draft_draft"], costs.flops.draft)
    assert close(r.flops["verify"], costs.flops.verify)
    assert close(r.total, costs.flops.total)
    # The draft model's cost is included, and fully accepted steps make the next first pass feed 2 tokens.
    passes = generation_passes(
        shape, strategy="speculative", prompt_tokens=PROMPT, steps=SPEC_STEPS, draft_shape=dshape
    )
    first = {}
    for p in passes:
        if p.phase == "draft":
            first.setdefault(p.step, p.positions)
    # Step 1 follows a fully accepted step; step 4 follows a k=0 step (draft cache 2 behind).
    assert first == {0: 1, 1: 2, 2: 1, 4: 2, 5: 1}
    assert costs.flops.draft > 0 and costs.bytes.draft > 0


def test_hf_early_exit_generation_matches_flop_counter() -> None:
    model = make_model("tiny")
    shape = ModelShape.from_config(model.config)
    # Prompt folded into step 0: its context is 0 and it feeds 5 prompt tokens + 3 drafts.
    steps = [(0, 3, 3)] + SPEC_STEPS[1:]
    r = run_two_model(model, model, PROMPT, steps, prefill=0, draft_layers=2)
    costs = generation_costs(
        shape,
        strategy="self_speculative",
        backend="hf",
        exit_layer=2,
        prompt_tokens=PROMPT,
        steps=steps,
        new_tokens=sum(a + 1 for _, _, a in steps),
    )
    assert costs.flops.prefill == 0
    assert close(r.flops["draft_draft"], costs.flops.draft)
    assert close(r.flops["verify"], costs.flops.verify)
    assert params_resident(shape) == shape.params().total  # shares weights: nothing extra


# --------------------------------------------------------------------------- waste and double counting


def _steps_with_acceptance(k: int, accepted: int, n_steps: int, start: int) -> list[tuple[int, int, int]]:
    steps, c = [], start
    for _ in range(n_steps):
        steps.append((c, k, accepted))
        c += 1 + accepted
    return steps


@pytest.mark.parametrize(
    "strategy, backend",
    [("self_speculative", "native"), ("self_speculative", "hf"), ("speculative", "native")],
)
def test_wasted_share_zero_at_full_acceptance_and_grows(strategy: str, backend: str) -> None:
    shape = ModelShape.from_config(CONFIGS["medium"])
    dshape = ModelShape.from_config({**CONFIGS["medium"], "num_hidden_layers": 1})
    prefill = 15 if backend == "native" else 0
    shares = []
    for accepted in range(4, -1, -1):
        steps = _steps_with_acceptance(4, accepted, 10, prefill)
        costs = generation_costs(
            shape,
            strategy=strategy,
            backend=backend,
            prompt_tokens=16,
            steps=steps,
            exit_layer=2,
            draft_shape=dshape if strategy == "speculative" else None,
            new_tokens=10 * (accepted + 1),
        )
        assert 0 <= costs.flops.wasted <= costs.flops.draft + costs.flops.verify
        assert 0 <= costs.bytes.wasted <= costs.bytes.draft + costs.bytes.verify
        shares.append(costs.flops.wasted_share)
    assert shares[0] == 0.0
    assert all(a < b for a, b in zip(shares, shares[1:], strict=False)), shares


def test_self_speculative_does_not_double_count_low_layers() -> None:
    shape = ModelShape.from_config(CONFIGS["medium"])
    exit_layer, prompt = 2, 5
    spec_steps = [(4, 3, 3), (8, 3, 3), (12, 3, 3)]  # positions 4..15, all accepted
    ar_steps = [(c, 0, 0) for c in range(4, 16)]
    spec = generation_passes(
        shape, strategy="self_speculative", prompt_tokens=prompt, steps=spec_steps, exit_layer=exit_layer
    )
    ar = generation_passes(shape, strategy="autoregressive", prompt_tokens=prompt, steps=ar_steps)

    def low_flops(passes) -> int:
        return sum(
            forward_flops(shape, p.positions, p.context, start=0, end=exit_layer)
            for p in passes
            if p.phase != "prefill" and p.start == 0
        )

    assert low_flops(spec) == low_flops(ar)
    # Measured: the low layers do the same work in both engines.
    model = make_model("tiny")
    r_spec = run_self_speculative(model, prompt, spec_steps, 1)
    r_ar = run_autoregressive(model, prompt, ar_steps, prompt - 1)
    assert r_spec.flops["low"] == r_ar.flops["low"]
    # And nothing is wasted at full acceptance.
    costs = generation_costs(
        shape,
        strategy="self_speculative",
        prompt_tokens=prompt,
        steps=spec_steps,
        exit_layer=2,
        new_tokens=12,
    )
    assert costs.flops.wasted == costs.bytes.wasted == 0


# --------------------------------------------------------------------------- predictions


def test_predicted_speedup() -> None:
    # E[tokens/step] = 1 + 0.8 + 0.6 + 0.4 = 2.8; cost per step 3*1 + 10 = 13 vs 10 per AR token.
    assert predicted_speedup([0.8, 0.6, 0.4, 0.1], 3, 1.0, 10.0, 10.0) == pytest.approx(2.8 * 10 / 13)
    assert predicted_speedup([], 0, 1.0, 10.0, 10.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        predicted_speedup([0.5], 2, 1.0, 1.0, 1.0)


def test_roofline() -> None:
    r = roofline(bytes=2e9, flops=4e12, seconds=2.0, peak_bandwidth=2e9, peak_flops=1e13)
    assert r.bytes_per_second == 1e9
    assert r.flops_per_second == 2e12
    assert r.bandwidth_fraction == pytest.approx(0.5)
    assert r.compute_fraction == pytest.approx(0.2)
    assert r.arithmetic_intensity == pytest.approx(2000.0)
    assert r.ridge_intensity == pytest.approx(5000.0)
    assert r.bound == "memory"
