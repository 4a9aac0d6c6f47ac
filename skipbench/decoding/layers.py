"""Run any span of a transformers decoder's layers against skipbench's own KV cache.

We drive the model's own modules (embedding, decoder layers, rotary embedding, final norm, LM head)
instead of copying its forward code, so a transformers update that changes `LlamaModel.forward`
does not break the engine; only the layer call signature matters.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from skipbench.decoding.record import Trace
from skipbench.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama",)


class EngineError(UserError):
    """The native engine cannot drive this model or configuration; one line for the user."""


class KVCache:
    """Pre-allocated keys and values for every layer, each layer with its own filled length.

    Layers have separate lengths because self-speculative decoding fills layers < E (the draft) ahead of
    layers >= E. Rolling back rejected drafts only moves a length: nothing is copied or freed.
    The decoder layers call `update()`, the one method transformers' attention needs of a cache.
    """

    def __init__(self, num_layers: int, capacity: int, trace: Trace | None = None, model: str = "target"):
        self.capacity = capacity
        self.lengths = [0] * num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.trace = trace  # where the passes over this cache are recorded, and as which model's
        self.model = model

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        start, count = self.lengths[layer_idx], key.shape[-2]
        if start + count > self.capacity:
            raise EngineError(f"KV cache overflow at layer {layer_idx}: {start + count} > {self.capacity}")
        if self.keys[layer_idx] is None:  # allocate on first use, when shapes and dtype are known
            shape = (*key.shape[:-2], self.capacity, key.shape[-1])
            self.keys[layer_idx] = key.new_empty(shape)
            self.values[layer_idx] = value.new_empty((*shape[:-1], value.shape[-1]))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[..., start : start + count, :] = key
        values[..., start : start + count, :] = value
        self.lengths[layer_idx] = start + count
        return keys[..., : start + count, :], values[..., : start + count, :]

    def truncate(self, length: int) -> None:
        """Forget every position >= length in every layer (layers already shorter keep their length)."""
        self.lengths = [min(filled, length) for filled in self.lengths]
        if self.trace is not None:
            self.trace.settle(self.model, length)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]


def causal_mask(config, past: int, count: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """The mask letting query i (at position past+i) see keys 0..past+i, for `count` queries.

    None where attention needs none: one query sees every cached key, and SDPA masks a fresh sequence
    itself (is_causal, which keeps its fast kernels). Otherwise an additive mask, which eager attention
    and SDPA both take.
    """
    if count == 1 or (past == 0 and getattr(config, "_attn_implementation", "eager") != "eager"):
        return None
    key_positions = torch.arange(past + count, device=device)
    query_positions = torch.arange(past, past + count, device=device)
    blocked = key_positions[None, :] > query_positions[:, None]
    mask = torch.zeros(blocked.shape, dtype=dtype, device=device)
    return mask.masked_fill(blocked, torch.finfo(dtype).min)[None, None]


def run_layers(layers, hidden: torch.Tensor, *, mask: torch.Tensor | None, positions: torch.Tensor,
               position_embeddings, cache: KVCache | None = None) -> torch.Tensor:
    """Call a sequence of the model's own decoder layers, with a KV cache (decoding) or without (training)."""
    for layer in layers:
        output = layer(hidden, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=cache is not None, position_embeddings=position_embeddings)
        hidden = output[0] if isinstance(output, tuple) else output  # transformers < 5 returned tuples
    return hidden


class DecoderStack:
    """The pieces of a Llama-family causal LM that the engine calls, and how to call them."""

    def __init__(self, model: PreTrainedModel):
        config = model.config
        body = getattr(model, "model", None)
        parts = ("embed_tokens", "layers", "norm", "rotary_emb")
        if (config.model_type not in SUPPORTED_MODEL_TYPES or body is None
                or not all(hasattr(body, part) for part in parts) or not hasattr(model, "lm_head")):
            architecture = (config.architectures or [type(model).__name__])[0]
            raise EngineError(f"the native engine cannot drive {architecture} (model_type "
                              f"{config.model_type!r}); it supports {', '.join(SUPPORTED_MODEL_TYPES)}: "
                              f"use --backend hf")
        self.model = model
        self.config = config
        self.embed_tokens = body.embed_tokens
        self.layers = body.layers
        self.norm = body.norm
        self.rotary_emb = body.rotary_emb
        self.lm_head = model.lm_head
        self.num_layers = config.num_hidden_layers
        self.device = self.embed_tokens.weight.device
        self.dtype = self.embed_tokens.weight.dtype

    def new_cache(self, capacity: int, trace: Trace | None = None, model: str = "target") -> KVCache:
        return KVCache(self.num_layers, capacity, trace, model)

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        return self.embed_tokens(ids)

    def run(self, hidden: torch.Tensor, cache: KVCache, start: int, end: int,
            head: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layers [start, end) on `hidden` (1, n, d), at the positions following what those layers cached.

        Returns the new states and, with `head` > 0, the (head, vocab) logits of the last `head` positions
        (final norm and LM head; at an early exit, the exit head). The pass is recorded in the cache's trace.
        """
        past = cache.lengths[start] if start < self.num_layers else cache.lengths[-1]
        count = hidden.shape[1]
        if cache.trace is not None:
            cache.trace.record(cache.model, start, end, count, past, head)
        if start < end:
            hidden = self._layers(hidden, cache, start, end, past, count)
        return hidden, (self.logits(hidden[:, count - head :]) if head else None)

    def _layers(self, hidden: torch.Tensor, cache: KVCache, start: int, end: int, past: int,
                count: int) -> torch.Tensor:
        positions = torch.arange(past, past + count, device=self.device).unsqueeze(0)
        position_embeddings = self.rotary_emb(hidden, positions)
        mask = causal_mask(self.config, past, count, self.device, self.dtype)
        return run_layers(self.layers[start:end], hidden, mask=mask, positions=positions,
                          position_embeddings=position_embeddings, cache=cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: (1, n, d) -> (n, vocab) float32 logits."""
        return self.lm_head(self.norm(hidden))[0].float()
