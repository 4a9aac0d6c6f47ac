"""Token choice on the device: greedy or temperature/top-p sampling, and the speculative acceptance rule.

Everything here takes and returns device tensors, so drafting and verifying never wait for the host; the
decoding loop reads the outcome of a round once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampler:
    """Greedy when `sample` is False; otherwise temperature and nucleus (top-p) sampling.

    `generator` makes sampled runs repeatable: one seeded generator per prompt.
    """

    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution tokens are drawn from, for each row of (n, vocab) logits."""
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of (n, vocab) probabilities: (n,)."""
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next token (1,) from one row of logits (1, vocab); with sampling also its distribution (1, vocab)."""
        if not self.sample:
            return logits.argmax(dim=-1), None
        probs = self.probs(logits)
        return self.draw(probs), probs

    def confidence(self, logits: torch.Tensor, token: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
        """The draft's probability of the token it chose, as transformers' ConfidenceCriteria reads it: of the
        distribution it drew from when sampling, else of softmax(logits) (greedy: the top-1 probability)."""
        if probs is None:
            probs = torch.softmax(logits, dim=-1)
        return probs[0, token[0]]

    def accept(self, drafts: torch.Tensor, draft_probs: torch.Tensor | None,
               target_logits: torch.Tensor) -> torch.Tensor:
        """Verify k drafts against (k+1, vocab) target logits -> a (2,) tensor [drafts kept, next token].

        Greedy: drafts are kept while they equal the target's argmax; the next token is the target's argmax
        after the last kept one. Sampling: the standard rule (draft i is kept with probability
        min(1, p_i/q_i); at the first rejection the next token is drawn from the normalised max(0, p - q),
        and when all are kept from p after the last), which leaves the target's distribution unchanged.
        """
        count = drafts.shape[0]
        if not self.sample:
            choices = target_logits.argmax(dim=-1)
            kept = (drafts == choices[:count]).long().cumprod(0).sum() if count else choices.new_zeros(())
            return torch.stack([kept, choices[kept]])
        target = self.probs(target_logits)
        if not count:
            return torch.stack([drafts.new_zeros(()), self.draw(target)[0]])
        rows = torch.arange(count, device=drafts.device)
        p, q = target[rows, drafts], draft_probs[rows, drafts]
        ratio = torch.where(q > 0, p / q, torch.ones_like(p))
        accepted = torch.rand(count, generator=self.generator, device=drafts.device) < ratio.clamp(max=1.0)
        kept = accepted.long().cumprod(0).sum()
        residual = torch.clamp(target[:count] - draft_probs, min=0.0)
        total = residual.sum(dim=-1, keepdim=True)
        # p == q exactly leaves no residual mass; then rejection had probability 0, so fall back to p.
        residual = torch.where(total > 0, residual / total.clamp(min=1e-30), target[:count])
        # Row i: the draw if draft i is the first rejected; row k: the bonus token when all are kept.
        candidates = self.draw(torch.cat([residual, target[count:]]))
        return torch.stack([kept, candidates[kept]])
