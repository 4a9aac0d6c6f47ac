"""Run any span of a transformers decoder's layers against skipbench's own KV cache.

We drive the model's own modules (embedding, decoder layers, rotary embedding, final norm, LM head)
instead of copying its forward code, so a transformers update that changes `LlamaModel.forward`
does not break the engine; only the layer call signature matters.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

SUPPORTED_MODEL_TYPES = ("llama",)


class EngineError(Exception):
    """The native engine cannot drive this model or configuration; one line for the user."""


class KVCache:
    """Pre-allocated keys and values for every layer, each layer with its own filled length.

    Layers have separate lengths because self-speculative decoding fills layers < E (the draft) ahead of
    layers >= E. Rolling back rejected drafts only moves a length: nothing is copied or freed.
    The decoder layers call `update()`, the one method transformers' attention needs of a cache.
    """

    def __init__(self, num_layers: int, capacity: int):
        self.capacity = capacity
        self.lengths = [0] * num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

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

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]


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

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.num_layers, capacity)

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        return self.embed_tokens(ids)

    def run(self, hidden: torch.Tensor, cache: KVCache, start: int, end: int) -> torch.Tensor:
        """Layers [start, end) on `hidden` (1, n, d), at the positions following what those layers cached."""
        if start == end:
            return hidden
        past = cache.lengths[start]
        count = hidden.shape[1]
        positions = torch.arange(past, past + count, device=self.device).unsqueeze(0)
        position_embeddings = self.rotary_emb(hidden, positions)
        mask = self.causal_mask(past, count)
        for layer in self.layers[start:end]:
            output = layer(hidden, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True, position_embeddings=position_embeddings)
            hidden = output[0] if isinstance(output, tuple) else output  # transformers < 5 returned tuples
        return hidden

    def causal_mask(self, past: int, count: int) -> torch.Tensor | None:
        """Additive mask letting query i (at position past+i) see keys 0..past+i; eager and SDPA both take it."""
        if count == 1:
            return None  # one query sees every cached key: no mask needed
        key_positions = torch.arange(past + count, device=self.device)
        query_positions = torch.arange(past, past + count, device=self.device)
        blocked = key_positions[None, :] > query_positions[:, None]
        mask = torch.zeros(blocked.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill(blocked, torch.finfo(self.dtype).min)[None, None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: (1, n, d) -> (n, vocab) float32 logits."""
        return self.lm_head(self.norm(hidden))[0].float()
