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

    def start(self, prompt: list[int], capacity: int, trace: Trace | None = None) -> None:
        self.target.start(prompt, capacity, trace)
        self.drafter.start(prompt, capacity, trace)
        self.committed = prompt[:-1]

    def draft(self, last: torch.Tensor, count: int, sampler: Sampler,
              threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`threshold`: end drafting after a draft below that confidence (a draft policy; one host read each)."""
        stack, cache = self.drafter.stack, self.drafter.cache
        # The draft cache lacks the last step's final draft when all drafts were kept: feed it too.
        missing = self.committed[cache.lengths[0]:]
        last = last.to(stack.device)  # (models spread over devices: the target's head and the draft's embedding)
        feed = torch.cat([stack.ids(missing), last]) if missing else last
        home = self.target.stack.head_device  # where the target verifies the drafts
        if not sampler.sample and not threshold:  # greedy: each draft is the argmax of the last, on the device
            return stack.chain(feed, cache, stack.num_layers, count)[1].to(home), None
        drafts, probs = [], []
        for _ in range(count):
            _, logits = stack.run(feed, cache, 0, stack.num_layers, head=1)
            token, token_probs = sampler.choose(logits.to(home))  # drawn where the sampler's generator lies
            drafts.append(token)
            probs.append(token_probs)
            feed = token
            if threshold and sampler.confidence(logits, token, token_probs).item() < threshold:
                break  # transformers' ConfidenceCriteria: the unsure draft is still proposed
        return torch.cat(drafts).to(home), torch.cat(probs).to(home) if sampler.sample else None

    def shapes(self, k: int, rows: int = 1) -> list[tuple[DecoderStack, str, set[tuple[str, int, int]]]]:
        # The draft's first pass also feeds the target's last draft when every draft was kept: 2 positions.
        drafts = {("layers", rows, 1), ("layers", rows, 2), ("head", rows, 1)}
        return [*self.target.shapes(k, rows), (self.drafter.stack, self.drafter.model, drafts)]

    def verify(self, last: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        return self.target.verify(last, drafts)

    def commit(self, length: int, inputs: list[int]) -> None:
        self.committed += inputs[: length - len(self.committed)]
        self.target.commit(length, inputs)
        self.drafter.commit(length, inputs)
