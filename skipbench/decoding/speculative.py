"""Two-model speculative decoding: a separate, smaller draft model proposes K tokens, the target verifies."""

from __future__ import annotations

import torch

from skipbench.decoding.autoregressive import Autoregressive
from skipbench.decoding.layers import DecoderStack
from skipbench.decoding.record import Trace
from skipbench.decoding.sampling import Sampler


class TwoModel:
    def __init__(self, target: DecoderStack, draft: DecoderStack):
        self.target = Autoregressive(target)
        self.drafter = Autoregressive(draft, model="draft")
        self.committed: list[int] = []  # tokens whose keys and values the target holds
        self.in_flight: list[int] = []  # the last step's input and drafts, until commit

    def start(self, prompt: list[int], capacity: int, trace: Trace | None = None) -> None:
        self.target.start(prompt, capacity, trace)
        self.drafter.start(prompt, capacity, trace)
        self.committed = prompt[:-1]

    def draft(self, last: int, count: int, sampler: Sampler) -> tuple[list[int], list[torch.Tensor] | None]:
        stack, cache = self.drafter.stack, self.drafter.cache
        # The draft cache lacks the last step's final draft when all drafts were kept: feed it too.
        feed = [*self.committed[cache.lengths[0]:], last]
        drafts, probs = [], []
        for _ in range(count):
            _, logits = stack.run(stack.embed(feed), cache, 0, stack.num_layers, head=1)
            token, token_probs = sampler.choose(logits[0])
            drafts.append(token)
            probs.append(token_probs)
            feed = [token]
        return drafts, probs if sampler.sample else None

    def verify(self, last: int, drafts: list[int]) -> torch.Tensor:
        self.in_flight = [last, *drafts]
        return self.target.verify(last, drafts)

    def commit(self, length: int) -> None:
        self.committed += self.in_flight[: length - len(self.committed)]
        self.target.commit(length)
        self.drafter.commit(length)
