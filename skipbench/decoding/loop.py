"""The one decoding loop every native strategy runs.

Each round (a "verify step") feeds the last committed token, plus up to K drafts, through the full
model once and commits the drafts it agrees with plus one token of its own. Autoregressive decoding
is the same loop with no drafts, so every strategy is counted and timed the same way.

Drafts, the verdict and the next token stay on the device; a round reads them to the host once, to
know how many drafts were kept and to emit the tokens (EOS and stop sequences are host-side rules).

Prefill puts all prompt tokens but the last into the cache; the last prompt token is the first
round's input. Hence new_tokens == accepted + verify_steps exactly unless generation ends at EOS or a
stop sequence inside a step (see `Generation.emit`), and autoregressive decoding makes one token per
verify step.

A draft policy (`decoding.policy`) plans each round (at most K drafts, from which exit, a confidence floor)
and hears its outcome; without one every round drafts `num_speculations` (the static policy).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from skipbench.decoding.policy import Static
from skipbench.decoding.record import Generation, Step, Trace
from skipbench.decoding.sampling import Sampler


class Strategy(Protocol):
    def start(self, prompt: list[int], capacity: int, trace: Trace | None = None) -> None:
        """Prefill: every prompt token but the last into the cache(s); passes go to `trace`."""

    def draft(self, last: torch.Tensor, count: int, sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Propose `count` tokens (count,) after `last` (1,); with sampling also their distributions."""

    def verify(self, last: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """Full-model logits (count+1, vocab) for `last` followed by the drafts."""

    def commit(self, length: int, inputs: list[int]) -> None:
        """Keep the first `length` positions of every cache; drop the rest (rejected drafts)."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(strategy: Strategy, prompt: list[int], *, max_new_tokens: int, num_speculations: int,
             sampler: Sampler, eos_ids: Sequence[int], device: torch.device,
             stop: Callable[[list[int]], bool] | None = None, policy: Static | None = None) -> Generation:
    """Decode up to `max_new_tokens` after `prompt`, timing it device-synchronised; `policy` plans each round
    (one per generation: policies keep state between rounds)."""
    if not prompt:
        raise ValueError("an empty prompt cannot be decoded")
    eos = set(eos_ids)
    record = Generation(prompt_tokens=len(prompt))
    trace = Trace()
    policy = policy or Static(num_speculations)
    synchronize(device)
    began = time.perf_counter()
    with torch.inference_mode():
        strategy.start(prompt, capacity=len(prompt) + max_new_tokens + num_speculations + 1, trace=trace)
        last = torch.tensor([prompt[-1]], dtype=torch.long, device=device)
        last_id = prompt[-1]
        while record.new_tokens < max_new_tokens:
            context = len(prompt) - 1 + record.new_tokens
            plan = policy.plan()
            # Never draft past the token budget: the step's own token needs one place too.
            count = min(plan.count, max_new_tokens - record.new_tokens - 1)
            trace.begin_step(len(record.steps))
            if plan.exit_layer is not None:
                strategy.exit_layer = plan.exit_layer
            if policy.wants_shadow:
                strategy.watch(policy.candidates)
            trace.phase = "draft"
            options = {"threshold": plan.threshold} if plan.threshold else {}
            drafts, draft_probs = strategy.draft(last, count, sampler, **options) if count > 0 else (last[:0], None)
            trace.phase = "verify"
            outcome = sampler.accept(drafts, draft_probs, strategy.verify(last, drafts))
            shadow = strategy.shadow() if policy.wants_shadow else None
            parts = [outcome, drafts] if shadow is None else [outcome, drafts, shadow.flatten()]
            kept, next_id, *read = torch.cat(parts).tolist()  # the round's one host sync
            drafted = read[: drafts.shape[0]]
            strategy.commit(context + 1 + kept, [last_id, *drafted])
            proposed = proposals(drafted, eos)
            record.steps.append(Step(context, proposed, kept, plan.exit_layer))
            policy.observe(proposed, min(kept, proposed), None if shadow is None else
                           agreement(read[len(drafted):], policy.candidates, [*drafted[:kept], next_id]))
            before = record.new_tokens
            ended = record.emit([*drafted[:kept], next_id], kept, eos, stop)
            record.token_times += [time.perf_counter() - began] * (record.new_tokens - before)  # after the sync
            last, last_id = outcome[1:], next_id
            if len(record.steps) == 1:
                record.prefill_s = time.perf_counter() - began  # the sync above waited for the device
            if ended:
                break
    synchronize(device)
    record.time_s = time.perf_counter() - began
    record.passes = trace.passes
    return record


def proposals(drafted: list[int], eos: set[int]) -> int:
    """How many of a round's drafts were proposals: those up to and including the first EOS. transformers'
    drafter stops a round there; skipbench's engine drafts the round's K tokens in one go (static shapes, one
    host sync per round) and verifies them all, but a draft after a drafted EOS can never be emitted, so it
    counts as computed (its passes are wasted work in the costs), not as drafted."""
    return next((index + 1 for index, token in enumerate(drafted) if token in eos), len(drafted))


def agreement(flat: list[int], exits: Sequence[int], committed: list[int]) -> dict[int, tuple[int, int]]:
    """Per exit, (how many of the round's committed tokens its shadow prediction matched, how many there were),
    from the shadow ids (exits x positions, flattened): position i predicts committed token i."""
    positions = len(flat) // len(exits)
    return {layer: (sum(flat[row * positions + i] == token for i, token in enumerate(committed)), len(committed))
            for row, layer in enumerate(exits)}
