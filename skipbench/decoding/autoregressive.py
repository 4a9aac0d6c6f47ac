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
        self.cache = stack.new_cache(0) if not stack.compiled else None

    def start(self, prompt: list[int], capacity: int, trace: Trace | None = None) -> None:
        self.cache = self.stack.new_cache(capacity, trace, self.model)
        if len(prompt) > 1:
            self.stack.run(self.stack.ids(prompt[:-1]), self.cache, 0, self.stack.num_layers)

    def draft(self, last: torch.Tensor, count: int, sampler: Sampler) -> tuple[torch.Tensor, None]:
        return last[:0], None

    def verify(self, last: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        inputs = torch.cat([last, drafts])
        _, logits = self.stack.run(inputs, self.cache, 0, self.stack.num_layers, head=inputs.shape[0])
        return logits

    def shapes(self, k: int, rows: int = 1) -> list[tuple[DecoderStack, str, set[tuple[str, int, int]]]]:
        """Per stack and cache role, the pass shapes (see DecoderStack.warm) a step with k drafts runs on `rows`."""
        return [(self.stack, self.model, {("layers", rows, k + 1), ("head", rows, k + 1)})]

    def commit(self, length: int, inputs: list[int]) -> None:
        """Keep the first `length` positions; `inputs` are the step's input token and drafts, on the host."""
        self.cache.truncate(length)
