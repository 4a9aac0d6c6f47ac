"""Tests for skipbench.costs: hand-worked formulas, and the recorded passes of real generations checked
against independent references (FlopCounterMode around the calls that really ran, the engines' own KV caches).

FLOP agreement is exact everywhere: both sides count only matrix multiplies (the module's convention) and CPU
SDPA gets the standard dense formula below. The one matmul that is not model work, the rotary embedding's angle
table (a matmul in transformers 4.x, a broadcast multiply from 5.0), is measured on the model's own rotary
module and taken out of each measurement (`rotary_flops`; 0 on transformers 5).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from skipbench import calibrate
from skipbench.costs import (
    PASS_FIELDS,
    ModelShape,
    costs_of_passes,
    final_cache_tokens,
    forward_bytes,
    forward_flops,
    kv_cache_bytes,
    layer_flops,
    lm_head_flops,
    params_resident,
    pass_flops,
    pass_frame,
    pass_table,
)
from skipbench.decoding.autoregressive import Autoregressive
from skipbench.decoding.layers import DecoderStack, cache_keyword
from skipbench.decoding.loop import generate
from skipbench.decoding.record import PHASES, Pass
from skipbench.decoding.sampling import Sampler
from skipbench.decoding.self_speculative import SelfSpeculative
from skipbench.decoding.speculative import TwoModel
from skipbench.hf import generate_hf
from skipbench.methods import REGISTRY, BuildContext
from skipbench.models import LoadedModel, load_model

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
    # The vectorised per-pass formula agrees with the checked one, element by element.
    assert pass_flops(HAND, np.array([0, 1]), np.array([2, 2]), np.array([3, 1]), np.array([0, 5]),
                      np.array([1, 0])).tolist() == [7488 + 160, 1344]
    with pytest.raises(ValueError):
        forward_flops(HAND, 1, 0, start=1, end=3)
    with pytest.raises(ValueError):
        forward_flops(HAND, 1, 0, head_positions=2)
    with pytest.raises(ValueError):
        forward_flops(HAND, 1, -1)


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
    # Full cache of 10 tokens: 10 * 2 layers * 2 * 4 * 2 bytes; the exit layers' share of it.
    assert kv_cache_bytes(HAND, 10) == 320
    assert kv_cache_bytes(HAND, 10, layers=1) == 160


def hand_self_speculative_passes() -> list[Pass]:
    """P=4, exit layer 1 of 2, one step at context 3 drafting 2 and keeping 1 (cache keeps 3 + 1 + 1 = 5)."""
    passes = [
        Pass("prefill", "target", 0, 2, 3, 0, 0, kept_positions=3),
        Pass("draft", "target", 0, 1, 1, 3, 1, step=0),
        Pass("draft", "target", 0, 1, 1, 4, 1, step=0),
        Pass("verify", "target", 0, 1, 1, 5, 0, step=0),  # the last draft through layer 0
        Pass("verify", "target", 1, 2, 3, 3, 3, step=0),
    ]
    for entry in passes[1:]:
        entry.settle(5)
    return passes


def test_settle_and_costs_of_passes_hand_worked() -> None:
    passes = hand_self_speculative_passes()
    # Draft 0 (index 0 <= a=1): layer kept, head kept (0 < 1). Draft 1: layer kept, head wasted (its draft
    # was rejected). The last draft's layer-0 pass: rejected position. Upper pass: a+1 = 2 rows of 3.
    assert [(p.kept_positions, p.kept_head_positions) for p in passes] == [(3, 0), (1, 1), (1, 0), (0, 0), (2, 2)]
    costs = costs_of_passes(pass_frame(passes), {"target": HAND})
    assert costs.flops["prefill"] == 7488
    # draft 0: layer 0 at c=3 (1280) + exit head 160; draft 1: layer 0 at c=4 (1312) + head 160
    assert costs.flops["draft"] == 1440 + 1472
    # verify: layer 0 on the last draft at c=5 (1344, wasted)
    #   layer 1 on 3 positions at c=3: proj 1152 + attn 4*2*3*6*4 = 576 + mlp 2304 = 4032, head 3*160
    #   kept part: 2 positions at c=3: proj 768 + attn 4*2*2*5*4 = 320 + mlp 1536 = 2624, head 2*160
    assert costs.flops["verify"] == 1344 + 4032 + 480
    assert costs.flops["wasted"] == 160 + 1344 + (4032 + 480 - 2624 - 320) == 3072
    assert costs.flops["total"] == 7488 + 2912 + 5856
    # Bytes (2 per param, 16 B of KV per position per layer; a head reads norm 8 + matrix 80 params):
    #   prefill 2*592*2 + 2*16*(3+3) = 2560; drafts (592+88)*2 + 16*(4+1) = 1440 and 1360 + 16*6 = 1456;
    #   last draft through layer 0: 1184 + 16*7 = 1296; upper pass 1360 + 16*(6+3) = 1504.
    assert (costs.bytes["prefill"], costs.bytes["draft"], costs.bytes["verify"]) == (2560, 1440 + 1456, 1296 + 1504)
    # wasted: draft 1's head 176; the rejected position's layer-0 pass 1296; upper pass KV 16*(9 - 7) = 32
    assert costs.bytes["wasted"] == 176 + 1296 + 32
    # The time model: layers x the measured time of a layer for the block, plus the head for its rows.
    calibration = {"layer_seconds": {"1": 1.0, "2": 1.5, "4": 2.5}, "head_seconds": {"1": 0.5, "4": 1.1}}
    frame = pass_frame(passes)
    predicted = calibrate.pass_seconds(calibration, frame["start"], frame["end"], frame["positions"],
                                       frame["head_positions"])
    # prefill: 2 layers x 3 positions (interpolated: 2.0); drafts: 1 layer + head of 1; last draft: 1 layer;
    # upper pass: 1 layer x 3 positions (2.0) + head of 3 rows (interpolated: 0.9)
    assert list(predicted) == pytest.approx([4.0, 1.5, 1.5, 1.0, 2.0 + 0.9])


def test_pass_table_matches_pass_frame() -> None:
    passes = hand_self_speculative_passes()
    rows = pd.DataFrame([{f"pass_{name}": [getattr(p, name) for p in chunk] for name in PASS_FIELDS}
                         for chunk in (passes[:2], passes[2:])])
    table = pass_table(rows)
    assert table["row"].tolist() == [0, 0, 1, 1, 1]
    pd.testing.assert_frame_equal(table.drop(columns="row"), pass_frame(passes), check_dtype=False)
    assert costs_of_passes(table, {"target": HAND}) == costs_of_passes(pass_frame(passes), {"target": HAND})
    assert final_cache_tokens(table, "target") == 5  # prefill 3 + two kept positions
    assert final_cache_tokens(table, "target", end=1) == 5 and final_cache_tokens(table, "draft") == 0


# --------------------------------------------------------------------------- single forwards vs FlopCounterMode


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode has no formula for the CPU SDPA kernel; give it the standard one.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def counter() -> FlopCounterMode:
    mapping = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


_ROTARY: dict[tuple[int, int], int] = {}


def rotary_flops(model: LlamaForCausalLM, positions: int) -> int:
    """What FlopCounterMode sees in the model's rotary embedding for `positions` tokens (call it outside any
    other counter): 0 on transformers 5, head_dim * positions where the angles come from a matmul."""
    rotary = model.model.rotary_emb
    key = (rotary.inv_freq.numel(), positions)  # all it can depend on
    if key not in _ROTARY:
        with torch.no_grad(), counter() as fc:
            rotary(torch.zeros(1, positions, model.config.hidden_size), torch.arange(positions)[None])
        _ROTARY[key] = fc.get_total_flops()
    return _ROTARY[key]


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
                    use_cache=True,
                    position_embeddings=rope,
                    **{cache_keyword(layer): cache},
                )
                h = h[0] if isinstance(h, tuple) else h
            return h

        return self._count(tag, run)

    def head(self, tag: str, hidden: torch.Tensor, last: int) -> torch.Tensor:
        return self._count(tag, lambda: self.model.lm_head(self.model.model.norm(hidden[:, -last:])))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_forward_matches_flop_counter(name: str, attn: str) -> None:
    model = make_model(name, attn)
    shape = ModelShape.from_config(model.config)
    cache = DynamicCache(config=model.config)
    vocab = model.config.vocab_size
    for n, c in [(7, 0), (1, 7), (5, 8)]:  # prefill, decode, verify-like
        with torch.no_grad(), counter() as fc:
            model(torch.randint(0, vocab, (1, n)), use_cache=True, **{cache_keyword(model): cache})
        # transformers computes logits for every position by default.
        predicted = forward_flops(shape, n, c, head_positions=n)
        rotary = rotary_flops(model, n)
        measured = fc.get_total_flops() - rotary
        assert measured == predicted, (n, c, measured, predicted)
        # The attention term on its own (everything but the linear layers' mm).
        by_op = {str(op): v for op, v in fc.get_flop_counts()["Global"].items()}
        attention = sum(v for op, v in by_op.items() if op not in ("aten.mm", "aten.addmm")) - rotary
        assert attention == shape.layers * 4 * shape.heads * n * (c + n) * shape.head_dim


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
        assert runner.flops[tag] == predicted, (i, runner.flops[tag], predicted)


# --------------------------------------------------------------------------- real generations

CPU = torch.device("cpu")
PROMPT = [1, 72, 104, 108, 111, 32, 119]
NEW = 12
# Layers >= 3 add nothing: exit 2 accepts some drafts and rejects others (on PROMPT: 2, 0, 0, 1, 0, 2 of 3).
TARGET = "synthetic:tiny?agree=3"
# A draft of another shape than the target (a shape mix-up in the costs would show), unrelated weights.
SMALL_DRAFT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=48, vocab_size=320)


def synthetic(name: str, attn: str = "sdpa") -> LlamaForCausalLM:
    model = load_model(name, dtype="float32", device="cpu").model
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    return model


def small_draft() -> LlamaForCausalLM:
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(**SMALL_DRAFT, attn_implementation="sdpa")).eval()


def shape_of(model: LlamaForCausalLM) -> ModelShape:
    return ModelShape.from_config(model.config, bytes_per_param=4)  # every model here runs in float32


def prompt_for(model: LlamaForCausalLM) -> list[int]:
    return [token % model.config.vocab_size for token in PROMPT]


def decode_native(strategy, model: LlamaForCausalLM, k: int):
    return generate(strategy, prompt_for(model), max_new_tokens=NEW, num_speculations=k, sampler=Sampler(),
                    eos_ids=[], device=CPU)


def decode_hf(model: LlamaForCausalLM, **kwargs):
    return generate_hf(model, prompt_for(model), max_new_tokens=NEW, sampler=Sampler(), eos_ids=[], device=CPU,
                       **kwargs)


def analytical(shapes: dict[str, ModelShape], entry: Pass) -> int:
    return int(pass_flops(shapes[entry.model], entry.start, entry.end, entry.positions, entry.context,
                          entry.head_positions, entry.window))


def native_setup(kind: str, arg, k: int, attn: str = "sdpa"):
    """-> (strategy, target model, shapes by model name, K)."""
    if kind == "tied":  # head_dim * heads != hidden, tied embeddings
        target = make_model("tiny_hd", attn)
        return SelfSpeculative(DecoderStack(target), arg), target, {"target": shape_of(target)}, k
    target = synthetic(TARGET, attn)
    shapes = {"target": shape_of(target)}
    if kind == "autoregressive":
        return Autoregressive(DecoderStack(target)), target, shapes, 0
    if kind == "self":
        return SelfSpeculative(DecoderStack(target), arg), target, shapes, k
    draft = small_draft() if arg == "small" else synthetic(arg, attn)
    return TwoModel(DecoderStack(target), DecoderStack(draft)), target, shapes | {"draft": shape_of(draft)}, k


def native_caches(strategy) -> dict:
    if isinstance(strategy, TwoModel):
        return {"target": strategy.target.cache, "draft": strategy.drafter.cache}
    return {"target": strategy.cache}


NATIVE_CASES = [
    pytest.param("autoregressive", None, 0, "sdpa", id="autoregressive"),
    pytest.param("autoregressive", None, 0, "eager", id="autoregressive-eager"),
    pytest.param("self", 1, 3, "sdpa", id="self-E1-K3"),
    pytest.param("self", 2, 1, "sdpa", id="self-E2-K1"),
    pytest.param("self", 2, 3, "sdpa", id="self-E2-K3"),
    pytest.param("self", 2, 3, "eager", id="self-E2-K3-eager"),
    pytest.param("self", 3, 2, "sdpa", id="self-E3-K2"),
    pytest.param("tied", 1, 2, "sdpa", id="self-tied-E1-K2"),
    pytest.param("two", "synthetic:tiny?layers=2", 3, "sdpa", id="two-model-layers2-K3"),
    pytest.param("two", "synthetic:tiny?layers=2", 3, "eager", id="two-model-layers2-K3-eager"),
    pytest.param("two", "small", 2, "sdpa", id="two-model-small-K2"),
]


class StackRuns:
    """FlopCounterMode around every DecoderStack.run call (one recorded pass; a greedy draft phase, `chain`, is
    one run per draft), in call order."""

    def __init__(self, monkeypatch) -> None:
        # (model, positions through layers of each pass it records, FLOPs)
        self.raw: list[tuple[LlamaForCausalLM, list[int], int]] = []
        run = DecoderStack.run

        def counted_run(stack, inputs, cache, start, end, head=0):
            with counter() as fc:
                out = run(stack, inputs, cache, start, end, head)
            positions = inputs.shape[-2] if inputs.dim() == 3 else inputs.shape[-1]  # states (1, n, d) or ids (n,)
            self.raw.append((stack.model, [positions if start < end else 0], fc.get_total_flops()))
            return out

        monkeypatch.setattr(DecoderStack, "run", counted_run)

    def flops(self) -> list[int]:
        """Per call, less the rotary table each layer span builds (see `rotary_flops`)."""
        return [flops - sum(rotary_flops(model, n) for n in passes if n) for model, passes, flops in self.raw]

    def per_call(self, passes: list[Pass]) -> list[list[Pass]]:
        """The recorded passes grouped by the call that ran them."""
        groups, at = [], 0
        for _, counts, _ in self.raw:
            groups.append(passes[at : at + len(counts)])
            at += len(counts)
        assert at == len(passes)
        return groups


@pytest.mark.parametrize("kind, arg, k, attn", NATIVE_CASES)
def test_native_passes_match_flop_counter(kind: str, arg, k: int, attn: str, monkeypatch) -> None:
    strategy, target, shapes, k = native_setup(kind, arg, k, attn)
    runs = StackRuns(monkeypatch)
    with counter() as whole:  # the whole generation: nothing outside the passes multiplies matrices
        record = decode_native(strategy, target, k)
    measured = runs.flops()
    rotary = sum(raw for _, _, raw in runs.raw) - sum(measured)
    assert len(measured) > 0
    for index, (group, flops) in enumerate(zip(runs.per_call(record.passes), measured, strict=True)):
        assert sum(analytical(shapes, entry) for entry in group) == flops, (index, group)
    costs = costs_of_passes(pass_frame(record.passes), shapes)
    assert costs.flops["total"] == sum(measured) == whole.get_total_flops() - rotary
    for phase in PHASES:
        assert costs.flops[phase] == sum(analytical(shapes, p) for p in record.passes if p.phase == phase)
    assert costs.flops["prefill"] > 0 and record.new_tokens == NEW
    assert (costs.flops["draft"] > 0) == (k > 0)
    if kind == "two":
        assert {p.model for p in record.passes if p.phase == "draft"} == {"draft"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's imports warn about torch.jit
def test_static_cache_passes_match_flop_counter(monkeypatch) -> None:
    target = synthetic(TARGET)
    # compile=True selects static caches; nothing is warmed, so every pass runs the static path eagerly (no
    # compiler needed): the same computation the compiled passes run.
    stack = DecoderStack(target, compile=True, capacity=len(PROMPT) + NEW + 3 + 1)
    runs = StackRuns(monkeypatch)
    record = decode_native(SelfSpeculative(stack, 2), target, 3)
    shapes = {"target": shape_of(target)}
    assert len(runs.raw) > 0
    assert [sum(analytical(shapes, entry) for entry in group) for group in runs.per_call(record.passes)] == runs.flops()


class ModelCalls:
    """FlopCounterMode around every top-level forward call of `target` (and `draft`), via hooks.

    A call is a draft call when it runs on the draft model, or on the target while transformers has lowered
    its config.num_hidden_layers for assistant_early_exit: known without reading skipbench's records.
    """

    def __init__(self, target: LlamaForCausalLM, draft: LlamaForCausalLM | None = None) -> None:
        self.target, self.layers = target, target.config.num_hidden_layers
        self.models = [target] if draft is None else [target, draft]
        self.raw: list[tuple[bool, LlamaForCausalLM, int, int]] = []  # (draft call, model, positions, FLOPs)
        self.spans: list[tuple[bool, int, int]] = []  # (draft call, its cache's length before it, positions)
        self.caches: dict[bool, object] = {}  # the KV cache each kind of call last returned
        self.open: list[tuple[FlopCounterMode, bool]] = []
        self.hooks = []

    def _before(self, module, args, kwargs) -> None:
        drafting = module is not self.target or module.config.num_hidden_layers < self.layers
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        ids = kwargs.get("input_ids", args[0] if args else None)
        positions = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        self.spans.append((drafting, cache.get_seq_length() if cache is not None else 0, positions))
        mode = counter()
        mode.__enter__()
        self.open.append((mode, drafting))

    def _after(self, module, args, kwargs, output) -> None:
        mode, drafting = self.open.pop()
        mode.__exit__(None, None, None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        positions = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        self.raw.append((drafting, module, positions, mode.get_total_flops()))
        self.caches[drafting] = output.past_key_values

    @property
    def calls(self) -> list[tuple[bool, int]]:
        """(draft call, FLOPs less the call's rotary table) per forward call; read after generation."""
        return [(drafting, flops - rotary_flops(model, n)) for drafting, model, n, flops in self.raw]

    def __enter__(self) -> ModelCalls:
        for model in self.models:
            self.hooks.append(model.register_forward_pre_hook(self._before, with_kwargs=True))
            self.hooks.append(model.register_forward_hook(self._after, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        while self.open:  # a failed forward leaves its counter entered
            self.open.pop()[0].__exit__(None, None, None)


def hf_setup(kind: str, arg, k: int, attn: str = "sdpa"):
    """-> (target, generate_hf keyword arguments, shapes, draft model or None)."""
    target = synthetic(TARGET, attn)
    shapes = {"target": shape_of(target)}
    if kind == "autoregressive":
        return target, {}, shapes, None
    if kind == "early_exit":
        return target, {"exit_layer": arg, "num_speculations": k}, shapes, None
    draft = small_draft() if arg == "small" else synthetic(arg, attn)
    return target, {"draft": draft, "num_speculations": k}, shapes | {"draft": shape_of(draft)}, draft


HF_CASES = [
    pytest.param("autoregressive", None, 0, "sdpa", id="autoregressive"),
    pytest.param("early_exit", 1, 3, "sdpa", id="assistant_early_exit-E1-K3"),
    pytest.param("early_exit", 2, 3, "sdpa", id="assistant_early_exit-E2-K3"),
    pytest.param("early_exit", 2, 3, "eager", id="assistant_early_exit-E2-K3-eager"),
    pytest.param("assistant", "synthetic:tiny?layers=2", 3, "sdpa", id="assistant_model-layers2-K3"),
    pytest.param("assistant", "small", 2, "sdpa", id="assistant_model-small-K2"),
]


@pytest.mark.parametrize("kind, arg, k, attn", HF_CASES)
def test_hf_passes_match_flop_counter(kind: str, arg, k: int, attn: str) -> None:
    target, kwargs, shapes, draft = hf_setup(kind, arg, k, attn)
    with counter() as whole, ModelCalls(target, draft) as watched:
        record = decode_hf(target, **kwargs)
    calls = watched.calls
    rotary = sum(raw for *_, raw in watched.raw) - sum(f for _, f in calls)
    assert len(record.passes) == len(calls) > 0
    for index, (entry, (drafting, flops)) in enumerate(zip(record.passes, calls, strict=True)):
        assert analytical(shapes, entry) == flops, (index, entry)
        assert (entry.phase == "draft") == drafting, (index, entry)
    costs = costs_of_passes(pass_frame(record.passes), shapes)
    assert costs.flops["total"] == sum(f for _, f in calls) == whole.get_total_flops() - rotary
    assert costs.flops["prefill"] == 0  # generate() folds the prompt into step 0
    # hf drafter: the recorded draft passes cost what the draft forward calls really ran.
    assert costs.flops["draft"] == sum(f for drafting, f in calls if drafting)
    assert costs.flops["verify"] == sum(f for drafting, f in calls if not drafting)
    assert (costs.flops["draft"] > 0) == (kind != "autoregressive")
    assert record.new_tokens == NEW


@pytest.mark.parametrize("kind, arg", [("early_exit", 2), ("assistant", "synthetic:tiny?layers=2")])
def test_hf_drafter_reprocessing_is_counted(kind: str, arg) -> None:
    """However far transformers rolls its drafter's cache back (5.24 fed the second-last token again after each
    step, 5.25 does not), draft work on a position the drafter computes again later is waste: checked against
    the drafter's real cache length before each of its calls, and at the real cost of each call."""
    target, kwargs, shapes, draft = hf_setup(kind, arg, 3)
    with ModelCalls(target, draft) as calls:
        record = decode_hf(target, **kwargs)
    drafts = [p for p in record.passes if p.phase == "draft"]
    spans = [(start, positions) for drafting, start, positions in calls.spans if drafting]
    assert [(p.context, p.positions) for p in drafts] == spans
    assert any(s.accepted < s.drafted for s in record.steps[:-1])  # rejections: the drafter must roll back
    last_step = len(record.steps) - 1
    for index, entry in enumerate(drafts):
        # Where the drafter's cache stood when it next drafted (the spans above are its real cache lengths).
        resumed = min((later.context for later in drafts[index + 1 :] if later.step > entry.step), default=None)
        if entry.step == last_step or resumed is None:
            continue  # the generation ends: nothing computes it again
        assert entry.kept_positions == max(0, min(entry.positions, resumed - entry.context)), (index, entry)
    drafted = [f for drafting, f in calls.calls if drafting]
    recorded = [analytical(shapes, p) for p in drafts]
    assert recorded == drafted


# --------------------------------------------------------------------------- wasted work


def wasted_case(backend: str, kind: str, arg, target_name: str):
    """Run one generation with K=3 -> (record, shapes)."""
    target = synthetic(target_name)
    shapes = {"target": shape_of(target)}
    draft = None
    if kind == "two":
        draft = small_draft() if arg == "small" else synthetic(arg)
        shapes["draft"] = shape_of(draft)
    if backend == "native":
        stack = DecoderStack(target)
        strategy = SelfSpeculative(stack, arg) if kind == "self" else TwoModel(stack, DecoderStack(draft))
        return decode_native(strategy, target, 3), shapes
    kwargs = {"exit_layer": arg} if kind == "self" else {"draft": draft}
    return decode_hf(target, num_speculations=3, **kwargs), shapes


FULL_ACCEPTANCE = [
    ("native", "self", 2), ("native", "self", 3), ("native", "two", "synthetic:tiny?layers=2"),
    ("hf", "self", 2), ("hf", "self", 3), ("hf", "two", "synthetic:tiny?layers=2"),
]


@pytest.mark.parametrize("backend, kind, arg", FULL_ACCEPTANCE)
def test_no_waste_when_every_draft_is_kept(backend: str, kind: str, arg) -> None:
    # agree=2: layers >= 2 add nothing, so an exit >= 2 (or the model's own first 2 layers) always agrees.
    record, shapes = wasted_case(backend, kind, arg, "synthetic:tiny?agree=2")
    assert all(step.accepted == step.drafted for step in record.steps) and record.drafted > 0
    assert all(p.kept_positions == p.positions and p.kept_head_positions == p.head_positions for p in record.passes)
    costs = costs_of_passes(pass_frame(record.passes), shapes)
    assert costs.flops["wasted"] == 0 and costs.bytes["wasted"] == 0
    assert costs.flops["draft"] > 0


REJECTING = [
    ("native", "self", 1), ("native", "two", "small"), ("hf", "self", 1), ("hf", "two", "small"),
]


@pytest.mark.parametrize("backend, kind, arg", REJECTING)
def test_waste_when_drafts_are_rejected(backend: str, kind: str, arg) -> None:
    record, shapes = wasted_case(backend, kind, arg, "synthetic:tiny")
    assert record.accepted < record.drafted
    costs = costs_of_passes(pass_frame(record.passes), shapes)
    for split in (costs.flops, costs.bytes):
        assert 0 < split["wasted"] <= split["draft"] + split["verify"]
    # Per pass: the kept part never exceeds the pass; prefill is never wasted.
    assert all(0 <= p.kept_positions <= p.positions and 0 <= p.kept_head_positions <= p.head_positions
               and p.kept_head_positions <= p.kept_positions for p in record.passes)
    assert all(p.kept_positions == p.positions for p in record.passes if p.phase == "prefill")


def test_native_self_speculative_kept_fields_hand_checked() -> None:
    """Every pass of a native self-speculative generation with rejections, as Pass.settle's rules say.

    Step at context c drafting k and keeping a (exit E of L layers): draft i is layers [0, E) on 1 position at
    c + i, kept iff i <= a (its input is committed), its exit head kept iff i < a (it proposed a kept draft);
    then the last draft through [0, E) at c + k (kept iff a == k); then [E, L) on the k + 1 positions at c,
    keeping a + 1 of them and a + 1 head rows (the kept drafts' rows and the row giving the step's own token).
    """
    target = synthetic("synthetic:tiny?agree=2")
    exit_layer, layers, k = 1, target.config.num_hidden_layers, 3
    record = decode_native(SelfSpeculative(DecoderStack(target), exit_layer), target, k)
    # Known on PROMPT: a mix of 0, 1 and 2 kept drafts out of 3, and a shorter last step at the token budget.
    assert [(s.drafted, s.accepted) for s in record.steps] == [(3, 0), (3, 0), (3, 2), (3, 1), (3, 1), (2, 1), (0, 0)]
    fields = ("phase", "start", "end", "positions", "context", "head_positions", "kept_positions",
              "kept_head_positions", "step")
    expected = [("prefill", 0, layers, len(PROMPT) - 1, 0, 0, len(PROMPT) - 1, 0, -1)]
    for index, step in enumerate(record.steps):
        c, d, a = step.context, step.drafted, step.accepted
        expected += [("draft", 0, exit_layer, 1, c + i, 1, int(i <= a), int(i < a), index) for i in range(d)]
        expected.append(("verify", 0, exit_layer, 1, c + d, 0, int(a == d), 0, index))
        expected.append(("verify", exit_layer, layers, d + 1, c, d + 1, a + 1, a + 1, index))
    assert [tuple(getattr(p, name) for name in fields) for p in record.passes] == expected
    # The wasted FLOPs of step 2 (c, k=3, a=2) by hand: draft 2's head (its draft was rejected), the last
    # draft through layer 0, and the upper layers' work on the rejected position and its head row.
    shape = shape_of(target)
    c = record.steps[2].context
    upper = (layers - exit_layer) * (layer_flops(shape, 4, c) - layer_flops(shape, 3, c)) + lm_head_flops(shape, 1)
    by_hand = lm_head_flops(shape, 1) + layer_flops(shape, 1, c + 3) + upper
    frame = pass_frame(record.passes)
    assert costs_of_passes(frame[frame["step"] == 2], {"target": shape}).flops["wasted"] == by_hand


def test_hf_kept_fields_hand_checked() -> None:
    """hf assistant_early_exit: step 0's verify pass holds the prompt and the drafts; every verify pass keeps the
    positions up to the step's own token and a + 1 head rows; a draft head is kept iff its draft was."""
    target = synthetic(TARGET)
    record = decode_hf(target, exit_layer=2, num_speculations=3)
    verify = [p for p in record.passes if p.phase == "verify"]
    assert len(verify) == len(record.steps)
    assert any(s.accepted < s.drafted for s in record.steps)
    for index, (entry, step) in enumerate(zip(verify, record.steps, strict=True)):
        d, a = step.drafted, step.accepted
        fed = len(PROMPT) + d if index == 0 else 1 + d
        assert (entry.context, entry.positions, entry.head_positions) == (step.context, fed, d + 1)
        assert (entry.kept_positions, entry.kept_head_positions) == (fed - (d - a), a + 1)
        heads = [p.kept_head_positions for p in record.passes if p.phase == "draft" and p.step == index]
        assert heads == [int(i < a) for i in range(d)]


# --------------------------------------------------------------------------- no double counting


def count_low_layers(model: LlamaForCausalLM, exit_layer: int) -> list[int]:
    """Hooks counting FLOPs inside each call of layers [0, exit_layer); returns the list it appends to."""
    measured: list[int] = []
    open_modes: list[FlopCounterMode] = []

    def before(module, args, kwargs):
        open_modes.append(counter())
        open_modes[-1].__enter__()

    def after(module, args, kwargs, output):
        mode = open_modes.pop()
        mode.__exit__(None, None, None)
        measured.append(mode.get_total_flops())

    for layer in model.model.layers[:exit_layer]:
        layer.register_forward_pre_hook(before, with_kwargs=True)
        layer.register_forward_hook(after, with_kwargs=True)
    return measured


def test_native_self_speculative_runs_low_layers_once_per_position() -> None:
    exit_layer, k = 2, 3
    spec_model, ar_model = synthetic("synthetic:tiny?agree=2"), synthetic("synthetic:tiny?agree=2")
    spec_low, ar_low = count_low_layers(spec_model, exit_layer), count_low_layers(ar_model, exit_layer)
    spec = decode_native(SelfSpeculative(DecoderStack(spec_model), exit_layer), spec_model, k)
    ar = decode_native(Autoregressive(DecoderStack(ar_model)), ar_model, 0)
    assert spec.tokens == ar.tokens and spec.accepted == spec.drafted > 0  # full acceptance

    def low_passes(record):
        return [(p.context, p.positions) for p in record.passes if p.phase != "prefill" and p.start < exit_layer]

    # Each decoded position goes through layers < E exactly once, in both engines.
    expected = [(c, 1) for c in range(len(PROMPT) - 1, len(PROMPT) - 1 + NEW)]
    assert sorted(low_passes(spec)) == sorted(low_passes(ar)) == expected
    assert all(p.end == exit_layer for p in spec.passes if p.phase != "prefill" and p.start == 0)
    # Measured: layers < E do the same work in both (the prefill is the same pass in both).
    assert sum(spec_low) == sum(ar_low) > 0
    # And the recorded passes charge exactly that work to layers < E.
    shape = shape_of(spec_model)
    recorded = sum((min(p.end, exit_layer) - p.start) * layer_flops(shape, p.positions, p.context)
                   for p in spec.passes if p.start < exit_layer)
    assert recorded == sum(spec_low)


def retained_mismatches(passes: list[Pass], cache_of) -> tuple[list, dict]:
    """Replay kept work per (cache, layer) and check it against where each pass really started.

    Within a step a cache only grows, so each pass starts where the one before it over that layer ended. At a
    new step the cache has been rolled back to what it keeps, so the first pass must start exactly where the
    kept positions of all earlier passes over that layer add up to; otherwise kept work was counted twice (or
    dropped)."""
    retained: dict = defaultdict(int)  # kept positions so far
    filled: dict = {}  # (cache, layer) -> (step, positions the cache holds now)
    mismatches = []
    for index, entry in enumerate(passes):
        for layer in range(entry.start, entry.end):
            key = (cache_of(entry), layer)
            step, now = filled.get(key, (None, 0))
            if step != entry.step:
                now = retained[key]  # rolled back at the step boundary
            if entry.context != now:
                mismatches.append((index, layer, entry.context, now))
            filled[key] = (entry.step, entry.context + entry.positions)
            retained[key] += entry.kept_positions
    return mismatches, retained


@pytest.mark.parametrize("kind, arg, k, attn", NATIVE_CASES)
def test_native_kept_work_is_what_the_cache_keeps(kind: str, arg, k: int, attn: str) -> None:
    strategy, target, shapes, k = native_setup(kind, arg, k, attn)
    record = decode_native(strategy, target, k)
    mismatches, retained = retained_mismatches(record.passes, lambda p: p.model)
    assert mismatches == []
    for model, cache in native_caches(strategy).items():
        assert [retained[(model, layer)] for layer in range(len(cache.lengths))] == cache.lengths, model


@pytest.mark.parametrize("kind, arg", [("early_exit", 2), ("assistant", "synthetic:tiny?layers=2")])
def test_hf_verify_kept_work_is_what_the_cache_keeps(kind: str, arg) -> None:
    target, kwargs, _, draft = hf_setup(kind, arg, 3)
    with ModelCalls(target, draft) as calls:
        record = decode_hf(target, **kwargs)
    verify = [p for p in record.passes if p.phase == "verify"]
    mismatches, retained = retained_mismatches(verify, lambda p: p.model)
    assert mismatches == []
    assert retained[("target", 0)] == calls.caches[False].get_seq_length()


@pytest.mark.parametrize("kind, arg", [("early_exit", 2), ("assistant", "synthetic:tiny?layers=2")])
def test_hf_draft_kept_work_is_what_the_drafter_cache_keeps(kind: str, arg) -> None:
    target, kwargs, _, draft = hf_setup(kind, arg, 3)
    record = decode_hf(target, **kwargs)
    drafts = [p for p in record.passes if p.phase == "draft"]
    assert drafts and any(s.accepted < s.drafted for s in record.steps[:-1])
    mismatches, _ = retained_mismatches(drafts, lambda p: p.model)
    assert mismatches == []


# --------------------------------------------------------------------------- resident params and KV cache


def held_modules(decoder) -> list[torch.nn.Module]:
    """The nn.Modules a decoder object holds (directly or through its strategy objects)."""
    found, seen, todo = [], set(), [decoder]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.nn.Module):
            found.append(item)
        elif hasattr(item, "__dict__"):
            todo.extend(vars(item).values())
    return found


@pytest.mark.parametrize("key", list(REGISTRY), ids=["-".join(key) for key in REGISTRY])
def test_params_resident_counts_what_each_method_holds(key: tuple[str, str]) -> None:
    method = REGISTRY[key]
    target = LoadedModel("t", synthetic("synthetic:tiny"), None, True, "seed", "synthetic")
    draft = LoadedModel("d", small_draft(), None, True, "seed", "synthetic") if method.separate_draft_model else None
    cell = SimpleNamespace(exit_layer=2 if method.drafter == "exit" else None,
                           num_speculations=3 if method.speculates else None,
                           draft_model="d" if draft is not None else None)
    decoder = method.build(cell, target, draft, BuildContext())
    params = {id(p): p for module in held_modules(decoder) for p in module.parameters()}
    held = sum(p.numel() for p in params.values())
    held_bytes = sum(p.numel() * p.element_size() for p in params.values())
    draft_shape = shape_of(draft.model) if method.separate_draft_model else None  # the rule summary.py uses
    assert params_resident(shape_of(target.model), draft_shape) == held
    assert params_resident(shape_of(target.model), draft_shape, in_bytes=True) == held_bytes
    assert (held > target.num_params) == method.separate_draft_model


def cache_bytes(cache) -> int:
    """Bytes of keys and values the engine's KVCache holds in its filled lengths."""
    total = 0
    for keys, values, length in zip(cache.keys, cache.values, cache.lengths, strict=True):
        if keys is not None:
            total += length * (keys[..., 0, :].numel() * keys.element_size()
                               + values[..., 0, :].numel() * values.element_size())
    return total


@pytest.mark.parametrize("kind, arg, k", [("autoregressive", None, 0), ("self", 1, 3), ("self", 2, 3),
                                          ("two", "synthetic:tiny?layers=2", 3), ("two", "small", 2)])
def test_native_kv_cache_matches_engine_cache(kind: str, arg, k: int) -> None:
    strategy, target, shapes, k = native_setup(kind, arg, k)
    record = decode_native(strategy, target, k)
    frame = pass_frame(record.passes)
    caches = native_caches(strategy)
    target_cache, shape = caches["target"], shapes["target"]
    assert final_cache_tokens(frame, "target", shape.layers) == target_cache.lengths[-1]
    assert final_cache_tokens(frame, "target") == max(target_cache.lengths)
    if kind == "self":  # the exit layers' passes (drafts) see the same shared cache
        assert final_cache_tokens(frame, "target", arg) == target_cache.lengths[arg - 1]
    assert kv_cache_bytes(shape, final_cache_tokens(frame, "target", shape.layers)) == cache_bytes(target_cache)
    if kind == "two":
        draft_cache = caches["draft"]
        assert final_cache_tokens(frame, "draft") == draft_cache.lengths[0]
        assert kv_cache_bytes(shapes["draft"], final_cache_tokens(frame, "draft")) == cache_bytes(draft_cache)
    else:
        assert final_cache_tokens(frame, "draft") == 0
    assert target_cache.lengths[-1] == len(PROMPT) + NEW - 1  # the last token is never fed


@pytest.mark.parametrize("kind, arg, k", [("autoregressive", None, 0), ("early_exit", 2, 3),
                                          ("assistant", "synthetic:tiny?layers=2", 3)])
def test_hf_target_kv_cache_matches_transformers_cache(kind: str, arg, k: int) -> None:
    target, kwargs, shapes, draft = hf_setup(kind, arg, k)
    with ModelCalls(target, draft) as calls:
        record = decode_hf(target, **kwargs)
    frame = pass_frame(record.passes)
    shape = shapes["target"]
    cache = calls.caches[False]
    assert final_cache_tokens(frame, "target", shape.layers) == cache.get_seq_length() == len(PROMPT) + NEW - 1
    held = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)
    assert kv_cache_bytes(shape, final_cache_tokens(frame, "target", shape.layers)) == held
