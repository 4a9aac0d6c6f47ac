"""Passes over a batch of rows whose caches have their own lengths: the batched engine's layer runner.

Rows of a batch diverge: each speculative round keeps its own number of drafts per row, so after a round
row b's cache holds `lengths[layer][b]` positions. A pass feeds every row the same number n of positions
(right padding: a row with fewer real inputs gets filler after them), at that row's own positions
`lengths[b] .. lengths[b] + n - 1`. Keys and values are written there, and query i of row b attends to the
keys at positions <= its own (a mask built from the per-row positions), so filler written past a row's
length is never seen: the row's next real input is written over it before any query can reach it.

The same modules of the model run (embedding, decoder layers, rotary embedding, final norm, LM head) as
in `layers.DecoderStack`, which this wraps; every pass is recorded in each row's trace as one `Pass` with
`batch` rows sharing its weight reads. On a compiled stack the caches are its static slots for B rows and the
passes run through its compiled units (one graph per (rows, positions), shared by every layer and exit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from skipbench.decoding.layers import DecoderStack, LayerSlot, run_layers
from skipbench.decoding.record import Trace


class BatchCache:
    """Keys and values (rows, kv heads, capacity, head dim) per layer; a filled length per layer and row."""

    def __init__(self, num_layers: int, rows: int, capacity: int, traces: Sequence[Trace] | None, model: str,
                 slots: list[LayerSlot] | None = None):
        self.capacity = capacity
        self.rows = rows
        self.slots = slots  # a compiled stack's static slots (the whole capacity attended, masked)
        self.lengths = [[0] * rows for _ in range(num_layers)]
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.positions: torch.Tensor | None = None  # (rows, n): where the current pass writes
        self.limit = 0  # keys the current pass attends over: the highest position it writes + 1
        self.traces = traces
        self.model = model

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is None:
            shape = (*key.shape[:2], self.capacity, key.shape[-1])
            self.keys[layer_idx] = key.new_zeros(shape)
            self.values[layer_idx] = value.new_zeros((*shape[:-1], value.shape[-1]))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        index = self.positions[:, None, :, None]
        keys.scatter_(2, index.expand(-1, key.shape[1], -1, key.shape[-1]), key)
        values.scatter_(2, index.expand(-1, value.shape[1], -1, value.shape[-1]), value)
        return keys[:, :, : self.limit], values[:, :, : self.limit]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths[layer_idx])

    def truncate(self, lengths: Sequence[int]) -> None:
        """Row b forgets every position >= lengths[b] in every layer; its trace judges the step's passes."""
        for layer in self.lengths:
            for row, length in enumerate(lengths):
                layer[row] = min(layer[row], length)
        if self.traces is not None:
            for trace, length in zip(self.traces, lengths, strict=True):
                trace.settle(self.model, length)


def batch_mask(positions: torch.Tensor, limit: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (rows, 1, n, limit): query i of row b sees the keys at positions <= positions[b, i]."""
    keys = torch.arange(limit, device=positions.device)
    allowed = keys[None, None, :] <= positions[:, :, None]
    zero = torch.zeros((), dtype=dtype, device=positions.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


class BatchStack:
    """A DecoderStack's modules run on a batch of rows (eager: shapes follow the longest row)."""

    def __init__(self, stack: DecoderStack):
        self.stack = stack
        self.num_layers = stack.num_layers
        self.device = stack.device

    def new_cache(self, rows: int, capacity: int, traces: Sequence[Trace] | None, model: str) -> BatchCache:
        stack = self.stack
        if not stack.compiled:
            return BatchCache(self.num_layers, rows, capacity, traces, model)
        return BatchCache(self.num_layers, rows, stack.capacity, traces, model, stack.new_slots(rows, model, capacity))

    def ids(self, rows: Sequence[Sequence[int]], width: int | None = None) -> torch.Tensor:
        """Token ids (rows, width), each row right-padded with id 0 (filler no query ever sees)."""
        width = max(len(row) for row in rows) if width is None else width
        return torch.tensor([[*row, *[0] * (width - len(row))] for row in rows], dtype=torch.long, device=self.device)

    def run(self, inputs: torch.Tensor, cache: BatchCache, start: int, end: int, head: str | None = None,
            counts: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layers [start, end) on n positions per row after what those layers cached: `inputs` are ids (rows, n)
        when start == 0, else states (rows, n, d). `counts`: each row's real inputs (default n): its cache
        advances by that many. `head`: None, "all" (logits (rows, n, vocab)) or "last" (the logits of each row's
        last real input, (rows, vocab)); float32 logits, as the batch-1 engine's."""
        stack = self.stack
        fed = inputs.shape[1]
        counts = [fed] * cache.rows if counts is None else list(counts)
        layer = start if start < self.num_layers else self.num_layers - 1
        past = list(cache.lengths[layer])
        heads = {None: 0, "all": fed, "last": 1}[head]
        if cache.traces is not None:
            # Every row's queries are scored against the keys up to the batch's furthest position (the rest of its
            # window is masked, yet computed): the pass's window, recorded as a static cache's is.
            window = (cache.capacity if cache.slots else max(past) + fed) if start < end else None
            for trace, context, count in zip(cache.traces, past, counts, strict=True):
                trace.record(cache.model, start, end, fed, context, heads, window)
                entry = trace.passes[-1]
                entry.batch = cache.rows
                if trace.phase == "prefill":  # filler after a shorter prompt is wasted work
                    entry.kept_positions = count
        hidden = stack.embed_tokens(inputs) if start == 0 else inputs
        if start < end:
            positions = torch.tensor(past, device=self.device)[:, None] + torch.arange(fed, device=self.device)
        if start < end and cache.slots:
            hidden = stack.static_layers(hidden, positions, cache.slots, start, end)
        elif start < end:
            cache.positions, cache.limit = positions, max(past) + fed
            mask = batch_mask(positions, cache.limit, hidden.dtype)
            position_embeddings = stack.rotary_emb(hidden, positions)
            hidden = run_layers(stack.layers[start:end], hidden, mask=mask, positions=positions,
                                position_embeddings=position_embeddings, cache=cache, keyword=stack.cache_keyword)
        for filled in cache.lengths[start:end]:
            for row, count in enumerate(counts):
                filled[row] += count
        logits = None
        if head == "all":
            logits = self._head(hidden, cache, end)
        elif head == "last":
            rows = torch.arange(cache.rows, device=hidden.device)
            last = torch.tensor([max(count, 1) - 1 for count in counts], device=hidden.device)
            logits = self._head(hidden[rows, last][:, None], cache, end)[:, 0]
        return hidden, logits

    def _head(self, hidden: torch.Tensor, cache: BatchCache, end: int) -> torch.Tensor:
        return self.stack.static_head(hidden, end) if cache.slots else self.stack.head(hidden)
