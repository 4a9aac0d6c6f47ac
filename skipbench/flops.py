"""Analytical cost accounting: FLOPs and bytes moved by each decoding strategy.

The model is a Llama-family decoder at batch size 1: token embedding, ``layers`` decoder
layers (RMSNorm, q/k/v/o attention with grouped-query heads and rotary, RMSNorm, gated
SiLU MLP gate/up/down), a final RMSNorm and an LM head that may be tied to the embedding.

Counting conventions (the whole module follows them):

* FLOPs count matrix multiplies only, at 2 FLOPs per multiply-add: a linear layer with an
  ``m x k`` weight costs ``2*m*k`` per position. RMSNorm, rotary, softmax, SiLU, residual
  adds, masking and the embedding lookup are ignored; they are a small share of the work
  and ``torch.utils.flop_counter.FlopCounterMode`` does not count them either.
* Attention counts the full dense score matrix: ``n`` new queries against all ``c + n``
  keys (cached plus new), for every query head, for QK^T and again for AV, i.e.
  ``4 * heads * n * (c + n) * head_dim`` per layer. That is what SDPA or eager attention
  with an explicit causal mask computes (the masked entries are computed, then discarded),
  so a verify pass over k+1 positions is charged the whole (k+1) x (c+k+1) rectangle.
* Bytes are the model weights a pass reads once (its layer span, plus the final norm and
  LM head matrix when the head runs) and the KV cache: every layer reads ``c + n`` cached
  key/value positions and writes ``n`` new ones, stored in the weights' dtype. Activations
  and embedding rows are ignored (they are tiny next to weights at batch size 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

STRATEGIES = ("autoregressive", "speculative", "self_speculative")
BACKENDS = ("native", "hf")
PHASES = ("prefill", "draft", "verify")

# Bytes per parameter by dtype name; the default of 2 covers fp16/bf16 checkpoints.
_DTYPE_BYTES = {
    "float64": 8,
    "double": 8,
    "float32": 4,
    "float": 4,
    "tfloat32": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "fp16": 2,
    "bf16": 2,
    "fp32": 4,
    "int8": 1,
    "uint8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}


def dtype_bytes(dtype: Any, default: int = 2) -> int:
    """Bytes per element of a torch dtype or dtype name ("bfloat16", "torch.float32")."""
    if dtype is None:
        return default
    name = str(dtype).lower().removeprefix("torch.")
    return _DTYPE_BYTES.get(name, default)


# --------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts per part of the model; a tied LM head counts as 0 (it is the embedding)."""

    embedding: int
    per_layer: int
    layers: int
    final_norm: int
    lm_head: int

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.final_norm + self.lm_head


@dataclass(frozen=True)
class ModelShape:
    """The sizes that determine the cost of a Llama-family decoder."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    bytes_per_param: int = 2
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: Any, *, bytes_per_param: int | None = None) -> ModelShape:
        """Build from a transformers config (or a dict of its fields).

        ``bytes_per_param`` overrides the config's dtype, e.g. when the engine loads a bf16
        checkpoint in float32 on CPU.
        """

        def get(name: str, default: Any = None) -> Any:
            if isinstance(config, Mapping):
                value = config.get(name, default)
            else:
                value = getattr(config, name, default)
            return default if value is None else value

        hidden = int(get("hidden_size"))
        heads = int(get("num_attention_heads"))
        if bytes_per_param is None:
            # transformers 5 calls it ``dtype`` (and warns on ``torch_dtype``); older configs
            # only have ``torch_dtype``.
            has_dtype = "dtype" in config if isinstance(config, Mapping) else hasattr(config, "dtype")
            bytes_per_param = dtype_bytes(get("dtype") if has_dtype else get("torch_dtype"))
        return cls(
            hidden=hidden,
            layers=int(get("num_hidden_layers")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads", heads)),
            head_dim=int(get("head_dim", hidden // heads)),
            intermediate=int(get("intermediate_size")),
            vocab=int(get("vocab_size")),
            tied_embeddings=bool(get("tie_word_embeddings", False)),
            bytes_per_param=int(bytes_per_param),
            attention_bias=bool(get("attention_bias", False)),
            mlp_bias=bool(get("mlp_bias", False)),
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def params(self) -> ParamCounts:
        """Parameter counts, total and per part (tied embeddings counted once)."""
        h = self.hidden
        attention = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        if self.attention_bias:
            attention += self.q_dim + 2 * self.kv_dim + h
        mlp = 3 * h * self.intermediate
        if self.mlp_bias:
            mlp += 2 * self.intermediate + h
        per_layer = attention + mlp + 2 * h  # two RMSNorm weight vectors
        return ParamCounts(
            embedding=self.vocab * h,
            per_layer=per_layer,
            layers=per_layer * self.layers,
            final_norm=h,
            lm_head=0 if self.tied_embeddings else self.vocab * h,
        )


# --------------------------------------------------------------------------- one forward pass


def layer_flops(shape: ModelShape, positions: int, context: int) -> int:
    """FLOPs of one decoder layer over ``positions`` new tokens with ``context`` cached."""
    n, h = positions, shape.hidden
    projections = 2 * n * h * (2 * shape.q_dim + 2 * shape.kv_dim)  # q, o and k, v
    # Full (c+n)-key window for every query head, QK^T plus AV (see module docstring).
    attention = 2 * 2 * shape.heads * n * (context + n) * shape.head_dim
    mlp = 2 * n * 3 * h * shape.intermediate
    return projections + attention + mlp


def lm_head_flops(shape: ModelShape, positions: int) -> int:
    """FLOPs of the LM head on ``positions`` positions (the final norm is ignored)."""
    return 2 * positions * shape.hidden * shape.vocab


def layer_kv_bytes(shape: ModelShape, positions: int, context: int) -> int:
    """KV-cache bytes one layer reads (``context + positions``) and writes (``positions``)."""
    per_position = 2 * shape.kv_dim * shape.bytes_per_param
    return per_position * ((context + positions) + positions)


def _span(shape: ModelShape, start: int, end: int | None) -> tuple[int, int]:
    end = shape.layers if end is None else end
    if not 0 <= start <= end <= shape.layers:
        raise ValueError(f"layer span [{start}, {end}) is not inside [0, {shape.layers})")
    return start, end


def _check_positions(positions: int, context: int, head_positions: int) -> None:
    if positions < 0 or context < 0 or not 0 <= head_positions <= positions:
        raise ValueError(
            f"need positions >= 0, context >= 0 and 0 <= head_positions <= positions; got "
            f"positions={positions}, context={context}, head_positions={head_positions}"
        )


def forward_flops(
    shape: ModelShape,
    positions: int,
    context: int,
    *,
    start: int = 0,
    end: int | None = None,
    head_positions: int = 0,
) -> int:
    """FLOPs of layers ``[start, end)`` over ``positions`` new tokens at context ``context``.

    ``head_positions`` is how many of those positions also go through the final norm and
    LM head (0: no head; the engine runs it on the last position or on all verify positions).
    """
    start, end = _span(shape, start, end)
    _check_positions(positions, context, head_positions)
    return (end - start) * layer_flops(shape, positions, context) + lm_head_flops(shape, head_positions)


def forward_bytes(
    shape: ModelShape,
    positions: int,
    context: int,
    *,
    start: int = 0,
    end: int | None = None,
    head_positions: int = 0,
) -> int:
    """Bytes moved by the same pass as :func:`forward_flops`: weights read once plus KV traffic."""
    start, end = _span(shape, start, end)
    _check_positions(positions, context, head_positions)
    if positions == 0:
        return 0  # nothing runs
    p = shape.params()
    weights = (end - start) * p.per_layer
    if head_positions:
        # The head matrix is read whether or not it is tied to the embedding.
        weights += p.final_norm + shape.vocab * shape.hidden
    kv = (end - start) * layer_kv_bytes(shape, positions, context)
    return weights * shape.bytes_per_param + kv


def kv_cache_bytes(shape: ModelShape, tokens: int) -> int:
    """Bytes of a full KV cache holding ``tokens`` positions in every layer."""
    return tokens * shape.layers * 2 * shape.kv_dim * shape.bytes_per_param


def params_resident(
    shape: ModelShape, draft_shape: ModelShape | None = None, *, in_bytes: bool = False
) -> int:
    """Parameters held in memory: the target plus a separate draft model if any.

    Self-speculative decoding (native or hf ``assistant_early_exit``) shares the target's
    weights, so pass no ``draft_shape`` for it: it adds nothing.
    """
    total = shape.params().total * (shape.bytes_per_param if in_bytes else 1)
    if draft_shape is not None:
        total += draft_shape.params().total * (draft_shape.bytes_per_param if in_bytes else 1)
    return total


# --------------------------------------------------------------------------- one generation


@dataclass(frozen=True)
class Pass:
    """One forward pass the engine runs, with the share of it that ends up kept.

    ``model`` is "target" or "draft" (the separate draft model of two-model speculation).
    The pass runs layers ``[start, end)`` of that model over ``positions`` new tokens at
    ``context`` cached ones, and the LM head on its last ``head_positions`` positions.
    ``kept_positions`` / ``kept_head_positions`` describe the part of the pass whose result
    survives the step's rollback; the rest is wasted (see :func:`generation_passes`).
    """

    phase: str
    model: str
    start: int
    end: int
    positions: int
    context: int
    head_positions: int
    kept_positions: int
    kept_head_positions: int
    step: int | None = None

    def flops(self, shape: ModelShape) -> int:
        """FLOPs of the whole pass."""
        return forward_flops(shape, self.positions, self.context, **self._span(self.head_positions))

    def bytes(self, shape: ModelShape) -> int:
        """Bytes moved by the whole pass."""
        return forward_bytes(shape, self.positions, self.context, **self._span(self.head_positions))

    def wasted_flops(self, shape: ModelShape) -> int:
        """FLOPs of the pass minus those of its kept part."""
        kept = forward_flops(shape, self.kept_positions, self.context, **self._span(self.kept_head_positions))
        return self.flops(shape) - kept

    def wasted_bytes(self, shape: ModelShape) -> int:
        """Bytes of the pass minus those of its kept part (same weights, fewer KV positions)."""
        kept = forward_bytes(shape, self.kept_positions, self.context, **self._span(self.kept_head_positions))
        return self.bytes(shape) - kept

    def _span(self, head_positions: int) -> dict[str, int]:
        return {"start": self.start, "end": self.end, "head_positions": head_positions}


def _step_triple(step: Any) -> tuple[int, int, int]:
    """Accept (context, drafted, accepted) tuples, mappings or objects with those attributes."""
    if isinstance(step, Mapping):
        c, k, a = step["context"], step["drafted"], step["accepted"]
    elif isinstance(step, Sequence):
        c, k, a = step
    else:
        c, k, a = step.context, step.drafted, step.accepted
    c, k, a = int(c), int(k), int(a)
    if c < 0 or k < 0 or not 0 <= a <= k:
        raise ValueError(f"bad step (context={c}, drafted={k}, accepted={a}): need 0 <= accepted <= drafted")
    return c, k, a


def generation_passes(
    shape: ModelShape,
    *,
    strategy: str,
    prompt_tokens: int,
    steps: Sequence[Any],
    exit_layer: int | None = None,
    draft_shape: ModelShape | None = None,
    backend: str = "native",
    prefill_positions: int | None = None,
) -> list[Pass]:
    """Every forward pass of one generation, in the order the engine runs them.

    ``steps`` holds one ``(context, drafted, accepted)`` record per verify step (tuples,
    mappings or objects with those attributes). ``prefill_positions`` is how many prompt
    tokens a separate prefill pass puts in the cache: by default ``prompt_tokens - 1`` for
    the native engine (the last prompt token is step 0's input) and 0 for ``backend="hf"``
    (transformers folds the prompt into step 0). Step 0's context must equal it; the prompt
    tokens not prefilled are step 0's input, every later step has one input token.

    Per step with context c, m input tokens, k drafts and a kept (native engine):

    * autoregressive: all layers on m positions at c, LM head on 1 (phase "verify").
    * self_speculative (exit layer E): draft pass i runs layers [0, E) on its input
      (m positions for i=0, else draft i-1) plus the exit head on 1 position; verify runs
      layers [0, E) on the last draft (or on the input when k == 0), then layers [E, L) on
      m+k positions at c from the stored layer-E states and the LM head on k+1 positions.
    * speculative: draft pass 0 feeds every token the draft cache lacks (its length is
      tracked: 2 tokens after a fully accepted step), later passes 1 token, each pass runs
      all draft layers and the draft head on 1 position; verify runs all target layers on
      m+k positions and the head on k+1. The draft cache is then cut to c+m+a.
    * hf backend: ``speculative`` (``assistant_model``) is counted as above;
      ``self_speculative`` is ``assistant_early_exit``: a draft made of the target's first
      E layers with its own cache (passes like ``speculative``, counted on the target's
      shape) and a verify that recomputes all L layers.

    Waste. After the step only positions up to c+m-1+a are kept. A pass's wasted share is
    its cost minus the cost of the same pass restricted to its kept part (``kept_*`` fields):

    * work on positions beyond c+m-1+a, i.e. draft passes i > a and the self-speculative
      verify of the last draft at [0, E) when a < k, in full;
    * the draft/exit head of pass i == a < k, which proposed the first rejected draft (its
      layer work is on a kept position and stays in the cache);
    * in the verify, the marginal cost of its k-a rejected positions: cost over m+k
      positions with k+1 heads minus cost over m+a positions with a+1 heads. The bonus
      token comes from the last kept position, so it is never waste.

    Wasted work is therefore part of the draft and verify work, and zero when every draft
    is accepted.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if prompt_tokens < 1:
        raise ValueError("prompt_tokens must be at least 1")
    if prefill_positions is None:
        prefill_positions = prompt_tokens - 1 if backend == "native" else 0
    if not 0 <= prefill_positions < prompt_tokens:
        raise ValueError(f"prefill_positions must be in [0, {prompt_tokens}), got {prefill_positions}")

    n_layers = shape.layers
    # Who drafts: nobody, the target's low layers sharing its cache (native self-spec), or a
    # model with its own cache: the draft model, or the target's first E layers (hf).
    shared_cache_drafter = False
    drafter: tuple[str, int] | None = None
    if strategy == "speculative":
        if draft_shape is None:
            raise ValueError("speculative decoding needs draft_shape")
        drafter = ("draft", draft_shape.layers)
    elif strategy == "self_speculative":
        if exit_layer is None or not 1 <= exit_layer <= n_layers:
            raise ValueError(f"self_speculative needs 1 <= exit_layer <= {n_layers}, got {exit_layer}")
        if backend == "native":
            shared_cache_drafter = True
        else:
            drafter = ("target", exit_layer)

    records = [_step_triple(s) for s in steps]
    if records and records[0][0] != prefill_positions:
        raise ValueError(
            f"step 0 has context {records[0][0]} but {prefill_positions} prompt tokens were prefilled; "
            "pass prefill_positions to match the engine's convention"
        )

    passes: list[Pass] = []
    if prefill_positions:
        n = prefill_positions
        passes.append(Pass("prefill", "target", 0, n_layers, n, 0, 0, n, 0))
        if drafter is not None:
            passes.append(Pass("prefill", drafter[0], 0, drafter[1], n, 0, 0, n, 0))
    draft_len = prefill_positions  # positions in a separate drafter's cache

    for j, (c, k, a) in enumerate(records):
        m = prompt_tokens - prefill_positions if j == 0 else 1
        last_kept = c + m - 1 + a  # the bonus token is predicted from this position

        if strategy == "autoregressive":
            if k:
                raise ValueError(f"autoregressive step {j} has drafted={k}")
            passes.append(Pass("verify", "target", 0, n_layers, m, c, 1, m, 1, j))
            continue

        if shared_cache_drafter:
            e = exit_layer
            assert e is not None
            for i in range(k):
                n, ctx = (m, c) if i == 0 else (1, c + m - 1 + i)
                # Layer work on a kept position is reused by the verify; the exit head only
                # counts as kept when it proposed a kept draft.
                passes.append(Pass("draft", "target", 0, e, n, ctx, 1, n if i <= a else 0, int(i < a), j))
            if k == 0:
                passes.append(Pass("verify", "target", 0, e, m, c, 0, m, 0, j))
            else:
                # The last draft has not been through the low layers yet.
                kept = 1 if a == k else 0
                passes.append(Pass("verify", "target", 0, e, 1, c + m - 1 + k, 0, kept, 0, j))
            passes.append(Pass("verify", "target", e, n_layers, m + k, c, k + 1, m + a, a + 1, j))
            continue

        assert drafter is not None
        if k:
            model, d_layers = drafter
            draft_len = min(draft_len, c)
            for i in range(k):
                n, ctx = (c + m - draft_len, draft_len) if i == 0 else (1, c + m - 1 + i)
                passes.append(Pass("draft", model, 0, d_layers, n, ctx, 1, n if i <= a else 0, int(i < a), j))
            draft_len = c + m - 1 + k
        passes.append(Pass("verify", "target", 0, n_layers, m + k, c, k + 1, m + a, a + 1, j))
        draft_len = min(draft_len, last_kept + 1)
    return passes


@dataclass(frozen=True)
class Split:
    """A cost split by phase. ``wasted`` is a subset of ``draft + verify``, not an extra term."""

    prefill: int = 0
    draft: int = 0
    verify: int = 0
    wasted: int = 0

    @property
    def total(self) -> int:
        return self.prefill + self.draft + self.verify

    @property
    def wasted_share(self) -> float:
        """Wasted fraction of the draft + verify work (0 when there is none)."""
        spent = self.draft + self.verify
        return self.wasted / spent if spent else 0.0


@dataclass(frozen=True)
class Costs:
    """FLOPs and bytes of one generation, split by phase, with per-new-token figures."""

    flops: Split
    bytes: Split
    new_tokens: int

    @property
    def flops_per_token(self) -> float:
        return self.flops.total / self.new_tokens if self.new_tokens else math.nan

    @property
    def bytes_per_token(self) -> float:
        return self.bytes.total / self.new_tokens if self.new_tokens else math.nan

    def as_dict(self) -> dict[str, float]:
        """Flat record for result tables: ``flops_prefill`` ... ``bytes_per_token``."""
        row: dict[str, float] = {}
        for name, split in (("flops", self.flops), ("bytes", self.bytes)):
            for phase in (*PHASES, "wasted", "total"):
                row[f"{name}_{phase}"] = getattr(split, phase)
            row[f"{name}_wasted_share"] = split.wasted_share
        row["flops_per_token"] = self.flops_per_token
        row["bytes_per_token"] = self.bytes_per_token
        return row


def generation_costs(
    shape: ModelShape,
    *,
    strategy: str,
    prompt_tokens: int,
    steps: Sequence[Any],
    exit_layer: int | None = None,
    draft_shape: ModelShape | None = None,
    backend: str = "native",
    new_tokens: int,
    prefill_positions: int | None = None,
) -> Costs:
    """Sum the passes of :func:`generation_passes` into a :class:`Costs`.

    Autoregressive decode steps count as "verify" (the target pass of each step). Per-token
    figures divide the totals, prefill included, by ``new_tokens`` (nan when it is 0).
    """
    passes = generation_passes(
        shape,
        strategy=strategy,
        prompt_tokens=prompt_tokens,
        steps=steps,
        exit_layer=exit_layer,
        draft_shape=draft_shape,
        backend=backend,
        prefill_positions=prefill_positions,
    )
    flops = dict.fromkeys((*PHASES, "wasted"), 0)
    moved = dict.fromkeys((*PHASES, "wasted"), 0)
    for p in passes:
        model_shape = shape if p.model == "target" else draft_shape
        assert model_shape is not None
        flops[p.phase] += p.flops(model_shape)
        moved[p.phase] += p.bytes(model_shape)
        flops["wasted"] += p.wasted_flops(model_shape)
        moved["wasted"] += p.wasted_bytes(model_shape)
    return Costs(flops=Split(**flops), bytes=Split(**moved), new_tokens=new_tokens)


# --------------------------------------------------------------------------- predictions


def predicted_speedup(
    accept_by_position: Sequence[float],
    k: int,
    draft_cost: float,
    verify_cost: float,
    ar_cost: float,
) -> float:
    """Predicted speedup of drafting ``k`` tokens per step over autoregressive decoding.

    ``accept_by_position[i]`` is the probability that the first i+1 drafts of a step are
    all kept (non-increasing in i). Each step yields its kept drafts plus the verifier's
    bonus token, so E[tokens/step] = 1 + sum(accept_by_position[:k]). A step costs
    ``k * draft_cost + verify_cost`` against ``ar_cost`` per autoregressive token (any
    consistent unit: seconds, FLOPs, bytes), so

        speedup = E[tokens/step] * ar_cost / (k * draft_cost + verify_cost).
    """
    if k < 0:
        raise ValueError("k must be >= 0")
    if len(accept_by_position) < k:
        raise ValueError(f"need acceptance for {k} draft positions, got {len(accept_by_position)}")
    step_cost = k * draft_cost + verify_cost
    if step_cost <= 0:
        raise ValueError("k * draft_cost + verify_cost must be positive")
    expected_tokens = 1.0 + sum(float(p) for p in accept_by_position[:k])
    return expected_tokens * ar_cost / step_cost


@dataclass(frozen=True)
class Roofline:
    """Achieved throughput against the device's peaks."""

    bytes_per_second: float
    flops_per_second: float
    bandwidth_fraction: float
    compute_fraction: float
    arithmetic_intensity: float  # FLOPs per byte moved
    ridge_intensity: float  # peak_flops / peak_bandwidth: below it a kernel is memory bound

    @property
    def bound(self) -> str:
        return "memory" if self.arithmetic_intensity < self.ridge_intensity else "compute"


def roofline(
    bytes: float, flops: float, seconds: float, peak_bandwidth: float, peak_flops: float
) -> Roofline:
    """Achieved bytes/s and FLOP/s of work that took ``seconds``, as fractions of the peaks.

    Peaks are in bytes/s and FLOP/s.
    """
    if seconds <= 0 or peak_bandwidth <= 0 or peak_flops <= 0:
        raise ValueError("seconds, peak_bandwidth and peak_flops must be positive")
    bw = bytes / seconds
    fl = flops / seconds
    return Roofline(
        bytes_per_second=bw,
        flops_per_second=fl,
        bandwidth_fraction=bw / peak_bandwidth,
        compute_fraction=fl / peak_flops,
        arithmetic_intensity=flops / bytes if bytes else math.inf,
        ridge_intensity=peak_flops / peak_bandwidth,
    )
