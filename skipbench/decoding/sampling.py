"""Token choice: greedy or temperature/top-p sampling, and the speculative acceptance rule."""

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

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def choose(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """Pick the next token from one row of logits; also return the distribution when sampling."""
        if not self.sample:
            return int(logits.argmax()), None
        probs = self.probs(logits)
        return self.draw(probs), probs

    def accept(self, drafts: list[int], draft_probs: list[torch.Tensor] | None,
               target_logits: torch.Tensor) -> tuple[int, int]:
        """Verify drafts against (len(drafts)+1, vocab) target logits -> (drafts kept, next token).

        Greedy: keep drafts while they equal the target's argmax; the next token is the target's argmax
        after the last kept one. Sampling: the standard rule (accept with min(1, p/q); on rejection draw
        from the normalised max(0, p - q)), which leaves the target's distribution exactly unchanged.
        """
        if not self.sample:
            choices = target_logits.argmax(dim=-1).tolist()
            kept = 0
            while kept < len(drafts) and drafts[kept] == choices[kept]:
                kept += 1
            return kept, choices[kept]
        target_probs = self.probs(target_logits)
        for position, token in enumerate(drafts):
            p, q = target_probs[position], draft_probs[position]
            ratio = float(p[token] / q[token]) if q[token] > 0 else 1.0
            if torch.rand((), generator=self.generator, device=p.device) < min(1.0, ratio):
                continue
            residual = torch.clamp(p - q, min=0.0)
            total = residual.sum()
            # p == q exactly leaves no residual mass; then rejection had probability 0, so fall back to p.
            return position, self.draw(residual / total if total > 0 else p)
        return len(drafts), self.draw(target_probs[len(drafts)])
