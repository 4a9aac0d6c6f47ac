"""Analytical cost accounting: FLOPs and bytes of the forward passes a generation recorded.

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from skipbench.decoding.record import PHASES

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
# Every function here is plain arithmetic, so it takes ints or numpy arrays of passes alike.


def layer_flops(shape: ModelShape, positions, context, window=None):
    """FLOPs of one decoder layer over ``positions`` new tokens with ``context`` cached; ``window``: the keys
    each query is scored against (default context + positions; a static cache scores all its capacity)."""
    n, h = positions, shape.hidden
    keys = context + n if window is None else window
    projections = 2 * n * h * (2 * shape.q_dim + 2 * shape.kv_dim)  # q, o and k, v
    # Full key window for every query head, QK^T plus AV (see module docstring).
    attention = 2 * 2 * shape.heads * n * keys * shape.head_dim
    mlp = 2 * n * 3 * h * shape.intermediate
    return projections + attention + mlp


def lm_head_flops(shape: ModelShape, positions):
    """FLOPs of the LM head on ``positions`` positions (the final norm is ignored)."""
    return 2 * positions * shape.hidden * shape.vocab


def layer_kv_bytes(shape: ModelShape, positions, context, window=None):
    """KV-cache bytes one layer reads (its key window, default ``context + positions``) and writes
    (``positions``)."""
    per_position = 2 * shape.kv_dim * shape.bytes_per_param
    return per_position * ((context + positions if window is None else window) + positions)


def pass_flops(shape: ModelShape, start, end, positions, context, head_positions, window=None):
    """FLOPs of layers ``[start, end)`` over ``positions`` tokens at ``context``, plus the head on
    ``head_positions`` of them."""
    return (end - start) * layer_flops(shape, positions, context, window) + lm_head_flops(shape, head_positions)


def pass_bytes(shape: ModelShape, start, end, positions, context, head_positions, window=None, batch=1):
    """Bytes moved by the same pass: its weights read once plus its KV traffic; 0 when nothing runs. A pass run
    for a `batch` of rows reads its weights once for all of them: each row's pass is charged its share."""
    p = shape.params()
    # The head matrix is read whether or not it is tied to the embedding.
    head_weights = np.where(np.asarray(head_positions) > 0, p.final_norm + shape.vocab * shape.hidden, 0)
    weights = (end - start) * p.per_layer + head_weights
    kv = (end - start) * layer_kv_bytes(shape, positions, context, window)
    return np.where(np.asarray(positions) > 0, weights * shape.bytes_per_param / np.asarray(batch) + kv, 0)


def _checked(shape: ModelShape, positions: int, context: int, start: int, end: int | None,
             head_positions: int) -> tuple[int, int]:
    end = shape.layers if end is None else end
    if not 0 <= start <= end <= shape.layers:
        raise ValueError(f"layer span [{start}, {end}) is not inside [0, {shape.layers})")
    if positions < 0 or context < 0 or not 0 <= head_positions <= positions:
        raise ValueError(
            f"need positions >= 0, context >= 0 and 0 <= head_positions <= positions; got "
            f"positions={positions}, context={context}, head_positions={head_positions}"
        )
    return start, end


def forward_flops(shape: ModelShape, positions: int, context: int, *, start: int = 0, end: int | None = None,
                  head_positions: int = 0) -> int:
    """FLOPs of one checked pass (see :func:`pass_flops`)."""
    start, end = _checked(shape, positions, context, start, end, head_positions)
    return int(pass_flops(shape, start, end, positions, context, head_positions))


def forward_bytes(shape: ModelShape, positions: int, context: int, *, start: int = 0, end: int | None = None,
                  head_positions: int = 0) -> int:
    """Bytes of one checked pass (see :func:`pass_bytes`)."""
    start, end = _checked(shape, positions, context, start, end, head_positions)
    return int(pass_bytes(shape, start, end, positions, context, head_positions))


def kv_cache_bytes(shape: ModelShape, tokens, layers: int | None = None):
    """Bytes of a KV cache holding ``tokens`` positions in ``layers`` layers (default: all)."""
    return tokens * (shape.layers if layers is None else layers) * 2 * shape.kv_dim * shape.bytes_per_param


def params_resident(shape: ModelShape, draft_shape: ModelShape | None = None, *, in_bytes: bool = False) -> int:
    """Parameters held in memory: the target plus a separate draft model if any.

    Self-speculative decoding (native or hf ``assistant_early_exit``) shares the target's
    weights, so pass no ``draft_shape`` for it: it adds nothing.
    """
    total = shape.params().total * (shape.bytes_per_param if in_bytes else 1)
    if draft_shape is not None:
        total += draft_shape.params().total * (draft_shape.bytes_per_param if in_bytes else 1)
    return total


# --------------------------------------------------------------------------- recorded passes

PASS_FIELDS = ("phase", "model", "start", "end", "positions", "context", "head_positions", "kept_positions",
               "kept_head_positions", "step", "window", "kept_window", "batch")


def pass_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The passes of every row (stored as ``pass_<field>`` lists), one line each, with a ``row`` column
    naming the row's position in ``rows``."""
    counts = rows["pass_phase"].map(len).to_numpy()
    table = {"row": np.repeat(np.arange(len(rows)), counts)}
    for name in PASS_FIELDS:
        if f"pass_{name}" not in rows:  # rows of runs before batches: every pass ran for one row
            table[name] = np.ones(counts.sum(), dtype=int)
            continue
        values = rows[f"pass_{name}"]
        table[name] = np.concatenate([np.asarray(v) for v in values]) if counts.sum() else np.array([], dtype=int)
    return pd.DataFrame(table)


def pass_frame(passes: Sequence) -> pd.DataFrame:
    """A table of `Pass` records (one generation's `Generation.passes`), as `pass_table` gives for rows."""
    return pd.DataFrame([{name: getattr(entry, name) for name in PASS_FIELDS} for entry in passes],
                        columns=list(PASS_FIELDS))


@dataclass(frozen=True)
class PassCosts:
    """FLOPs and bytes of a table of passes, each split by phase, with the wasted part of each."""

    flops: dict[str, float]  # prefill, draft, verify, wasted, total
    bytes: dict[str, float]


def costs_of_passes(passes: pd.DataFrame, shapes: Mapping[str, ModelShape]) -> PassCosts:
    """Sum the analytical costs of recorded passes. ``shapes`` maps each pass's model ("target", "draft").

    Wasted work is a pass's cost minus that of its kept part (the ``kept_*`` fields): work on positions
    past the step's rollback, and a draft head that proposed a rejected token. It is part of the draft
    and verify work, not an extra term.
    """
    flops = dict.fromkeys((*PHASES, "wasted", "total"), 0.0)
    moved = dict.fromkeys((*PHASES, "wasted", "total"), 0.0)
    for model, part in passes.groupby("model"):
        shape = shapes[model]
        span = part["start"].to_numpy(), part["end"].to_numpy()
        args = (*span, part["positions"].to_numpy(), part["context"].to_numpy(), part["head_positions"].to_numpy(),
                part["window"].to_numpy())
        kept = (*span, part["kept_positions"].to_numpy(), part["context"].to_numpy(),
                part["kept_head_positions"].to_numpy(), part["kept_window"].to_numpy())
        batch = part["batch"].to_numpy() if "batch" in part else 1
        pass_f, pass_b = pass_flops(shape, *args).astype(float), pass_bytes(shape, *args, batch=batch).astype(float)
        for phase in PHASES:
            chosen = (part["phase"] == phase).to_numpy()
            flops[phase] += pass_f[chosen].sum()
            moved[phase] += pass_b[chosen].sum()
        flops["wasted"] += (pass_f - pass_flops(shape, *kept)).sum()
        moved["wasted"] += (pass_b - pass_bytes(shape, *kept, batch=batch)).sum()
    flops["total"] = sum(flops[phase] for phase in PHASES)
    moved["total"] = sum(moved[phase] for phase in PHASES)
    return PassCosts(flops, moved)


def final_cache_tokens(passes: pd.DataFrame, model: str, end: int | None = None) -> int:
    """Positions a model's KV cache holds after its last pass (its passes through layer ``end - 1``)."""
    chosen = passes[(passes["model"] == model) & ((passes["end"] == end) if end is not None else True)]
    if chosen.empty:
        return 0
    return int((chosen["context"] + chosen["kept_positions"]).max())
