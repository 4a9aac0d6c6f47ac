"""Autoregressive decoding: the full model, one token per step. The baseline every speedup divides."""

from __future__ import annotations

import torch

from skipbench.decoding.layers import DecoderStack
from skipbench.decoding.record import Trace
from skipbench.decoding.sampling import Sampler


class Autoregressive:
    """One model with one KV cache; its `verify` is also the target pass of the speculative strategies."""

    def __init__(self, stack: DecoderStack, model: str = "target"):
        self.stack = stack
        self.model = model
        self.cache = stack.new_cache(0)

    def start(self, prompt: list[int], capacity: int, trace: Trace | None = None) -> None:
        self.cache = self.stack.new_cache(capacity, trace, self.model)
        if len(prompt) > 1:
            self.stack.run(self.stack.embed(prompt[:-1]), self.cache, 0, self.stack.num_layers)

    def draft(self, last: int, count: int, sampler: Sampler) -> tuple[list[int], None]:
        return [], None

    def verify(self, last: int, drafts: list[int]) -> torch.Tensor:
        _, logits = self.stack.run(self.stack.embed([last, *drafts]), self.cache, 0, self.stack.num_layers,
                                   head=len(drafts) + 1)
        return logits

    def commit(self, length: int) -> None:
        self.cache.truncate(length)
