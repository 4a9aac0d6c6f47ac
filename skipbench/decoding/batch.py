"""The batched round loop: B prompts decoded together, each row keeping its own accepted lengths.

Batch 1 never comes here (`loop.generate` stays the one path for a single prompt, so batch-1 numbers stay
comparable). Each round runs every strategy's passes once for the whole batch (`batch_stack`): the draft
phase drafts the most tokens any live row may draft, the verify pass checks them, and then each row keeps
what the acceptance rule keeps for it alone, so rows' caches and positions diverge. A row drafts what it
would at batch 1 (at most K, and never past its own token budget); drafts beyond its own count are computed
for it, ignored by its acceptance and recorded as wasted. A row that finished (EOS, stop, budget) is still
fed filler until the batch ends, its cache held at its final length: that work too is recorded, as waste.

Per row, tokens and per-step counts are those of the same prompt decoded alone: greedy exactly (up to
floating-point ties of the batched kernels); sampled with the same distribution (each row draws with its own
generator, through the batch-1 acceptance rule).

Time: one host read per round for the whole batch, after which the round's timestamp is taken; each row's
`token_times` are the timestamps of the rounds that emitted its tokens, and its `time_s` is when it finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from skipbench.decoding.batch_stack import BatchStack
from skipbench.decoding.layers import EngineError
from skipbench.decoding.loop import proposals, synchronize
from skipbench.decoding.record import Generation, Step, Trace
from skipbench.decoding.sampling import Sampler


class BatchEngine:
    """One strategy over a batch: `drafter` None (autoregressive), "exit" (layers < exit_layer of the target)
    or "draft_model" (a separate model's stack)."""

    def __init__(self, target: BatchStack, drafter: str | None = None, exit_layer: int | None = None,
                 draft: BatchStack | None = None):
        if drafter == "exit" and not (exit_layer and 1 <= exit_layer < target.num_layers):
            raise EngineError(f"exit layer {exit_layer} is outside 1..{target.num_layers - 1} for this model")
        self.target, self.drafter, self.exit_layer, self.draft_stack = target, drafter, exit_layer, draft
        self.cache = self.draft_cache = None
        self.exit_states: list[torch.Tensor] = []
        self.committed: list[list[int]] = []  # two-model: per row, the tokens whose keys the target holds

    def start(self, prompts: Sequence[Sequence[int]], capacity: int, traces: Sequence[Trace]) -> None:
        rows = len(prompts)
        self.cache = self.target.new_cache(rows, capacity, traces, "target")
        heads = [list(prompt[:-1]) for prompt in prompts]
        counts = [len(head) for head in heads]
        if max(counts):
            self.target.run(self.target.ids(heads), self.cache, 0, self.target.num_layers, counts=counts)
        if self.drafter == "draft_model":
            self.draft_cache = self.draft_stack.new_cache(rows, capacity, traces, "draft")
            if max(counts):
                self.draft_stack.run(self.draft_stack.ids(heads), self.draft_cache, 0, self.draft_stack.num_layers,
                                     counts=counts)
            self.committed = heads

    def draft(self, last: torch.Tensor, count: int, samplers: Sequence[Sampler]):
        """`count` drafts per row after `last` (rows,): ids (rows, count), and with sampling their distributions
        (rows, count, vocab)."""
        if not count or self.drafter is None:
            return last[:, None][:, :0], None
        if self.drafter == "exit":
            stack, cache, end = self.target, self.cache, self.exit_layer
            feed, counts = last[:, None], None
        else:
            stack, cache, end = self.draft_stack, self.draft_cache, self.draft_stack.num_layers
            # A row's draft cache lacks the last round's final draft when all its drafts were kept: feed it too.
            missing = [committed[length:] for committed, length in zip(self.committed, cache.lengths[0], strict=True)]
            counts = [len(part) + 1 for part in missing]
            feed = stack.ids([[*part, token] for part, token in zip(missing, last.tolist(), strict=True)])
        drafts, probs = [], []
        for _ in range(count):
            hidden, logits = stack.run(feed, cache, 0, end, head="last", counts=counts)
            if self.drafter == "exit":
                self.exit_states.append(hidden)
            token, token_probs = choose(logits, samplers)
            drafts.append(token)
            probs.append(token_probs)
            feed, counts = token[:, None], None  # the last draft is not fed back (the verifier feeds it)
        return torch.stack(drafts, dim=1), torch.stack(probs, dim=1) if samplers[0].sample else None

    def verify(self, last: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """Full-model logits (rows, count + 1, vocab) for each row's `last` followed by its drafts."""
        stack, top = self.target, self.target.num_layers
        if self.drafter != "exit":
            _, logits = stack.run(torch.cat([last[:, None], drafts], dim=1), self.cache, 0, top, head="all")
            return logits
        unseen = drafts[:, -1:] if drafts.shape[1] else last[:, None]  # the one position layers < E lack
        fresh, _ = stack.run(unseen, self.cache, 0, self.exit_layer)
        hidden = torch.cat([*self.exit_states, fresh], dim=1)
        self.exit_states = []
        _, logits = stack.run(hidden, self.cache, self.exit_layer, top, head="all")
        return logits

    def commit(self, lengths: Sequence[int], inputs: Sequence[Sequence[int] | None]) -> None:
        """Row b keeps its first lengths[b] positions; `inputs[b]`: its round's input and drafts (None: finished)."""
        self.cache.truncate(lengths)
        if self.drafter == "draft_model":
            for row, (length, fed) in enumerate(zip(lengths, inputs, strict=True)):
                if fed is not None:
                    self.committed[row] += list(fed[: length - len(self.committed[row])])
            self.draft_cache.truncate(lengths)


def choose(logits: torch.Tensor, samplers: Sequence[Sampler]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The next token per row of (rows, vocab) logits; sampling: each row with its own sampler (its generator)."""
    if not samplers[0].sample:
        return logits.argmax(dim=-1), None
    chosen = [sampler.choose(logits[row : row + 1]) for row, sampler in enumerate(samplers)]
    return torch.cat([token for token, _ in chosen]), torch.cat([probs for _, probs in chosen])


def accept(samplers: Sequence[Sampler], drafts: torch.Tensor, draft_probs: torch.Tensor | None,
           logits: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """(rows, 2): per row [drafts kept, next token], judging only its own first counts[b] drafts."""
    if samplers[0].sample:
        return torch.stack([sampler.accept(drafts[row, :count], None if draft_probs is None else
                                           draft_probs[row, :count], logits[row, : count + 1])
                            for row, (sampler, count) in enumerate(zip(samplers, counts, strict=True))])
    choices = logits.argmax(dim=-1)
    width = drafts.shape[1]
    own = torch.arange(width, device=drafts.device)[None, :] < torch.tensor(counts, device=drafts.device)[:, None]
    kept = ((drafts == choices[:, :width]) & own).long().cumprod(dim=1).sum(dim=1)
    return torch.stack([kept, choices.gather(1, kept[:, None])[:, 0]], dim=1)


def generate_batch(engine: BatchEngine, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   num_speculations: int, samplers: Sequence[Sampler], eos_ids: Sequence[int], device: torch.device,
                   stop: Callable[[list[int]], bool] | None = None) -> tuple[list[Generation], float]:
    """Decode the prompts together; returns one record per row and the batch's wall time. A row's `time_s`
    is its own end-to-end time (from the batch's start to its last token), `prefill_s` its first token's."""
    if not prompts or not all(prompts):
        raise ValueError("an empty prompt cannot be decoded")
    eos = set(eos_ids)
    rows = len(prompts)
    records = [Generation(prompt_tokens=len(prompt)) for prompt in prompts]
    traces = [Trace() for _ in prompts]
    live = [True] * rows
    widest = max(len(prompt) for prompt in prompts)
    synchronize(device)
    began = time.perf_counter()
    with torch.inference_mode():
        engine.start(prompts, capacity=widest + max_new_tokens + num_speculations + 1, traces=traces)
        last_ids = [prompt[-1] for prompt in prompts]
        lengths = [len(prompt) - 1 for prompt in prompts]
        while any(live):
            contexts = [len(prompt) - 1 + record.new_tokens for prompt, record in zip(prompts, records, strict=True)]
            counts = [min(num_speculations, max_new_tokens - record.new_tokens - 1) if alive else 0
                      for record, alive in zip(records, live, strict=True)]
            count = max(counts)
            for trace, record in zip(traces, records, strict=True):
                trace.begin_step(len(record.steps))
                trace.phase = "draft"
            last = torch.tensor(last_ids, dtype=torch.long, device=device)
            drafts, draft_probs = engine.draft(last, count, samplers)
            for trace in traces:
                trace.phase = "verify"
            outcome = accept(samplers, drafts, draft_probs, engine.verify(last, drafts), counts)
            read = torch.cat([outcome.flatten(), drafts.flatten()]).tolist()  # the round's one host sync
            now = time.perf_counter() - began
            inputs: list[list[int] | None] = [None] * rows
            for row in range(rows):
                if not live[row]:
                    continue
                kept, next_id = read[2 * row], read[2 * row + 1]
                drafted = read[2 * rows + row * count: 2 * rows + row * count + counts[row]]
                inputs[row] = [last_ids[row], *drafted]
                lengths[row] = contexts[row] + 1 + kept
                record = records[row]
                record.steps.append(Step(contexts[row], proposals(drafted, eos), kept))
                before = record.new_tokens
                ended = record.emit([*drafted[:kept], next_id], kept, eos, stop)
                record.token_times += [now] * (record.new_tokens - before)
                if len(record.steps) == 1:
                    record.prefill_s = now
                last_ids[row] = next_id
                if ended or record.new_tokens >= max_new_tokens:
                    live[row] = False
                    record.time_s = now
            engine.commit(lengths, inputs)
    synchronize(device)
    wall = time.perf_counter() - began
    for record, trace in zip(records, traces, strict=True):
        record.passes = trace.passes
    return records, wall
