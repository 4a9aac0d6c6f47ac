"""Measured time of a decoder layer and of the LM head for a block of n positions at B rows, per model.

The cost model's FLOPs and bytes cannot say what a pass costs on a given device: a batch-1 step is
bandwidth-bound, but a verify block of K+1 positions can be compute-bound (on a CPU one layer over 5
positions costs well over one over 1 position), and a pass over B rows of a batch reads its weights once
for all of them. So before measuring, a run times the model's own layer and head for the block sizes its
passes use, at every number of rows its batches have (`batch_rows`); the summary then predicts each cell's
time as the sum over the passes it ran of (layers x time of a layer for n positions at B rows + time of
the head for its rows at B rows), a pass shared by B rows counted once (`summary`), and reports the
measured speedup against that prediction.

Stored (the manifest's `calibration` of each model): the batch-1 table at the top level (`layer_seconds`,
`head_seconds`: size -> seconds; what runs before batches stored, read as B = 1) and one table per other
number of rows under `batches` (rows -> the same two maps). Batch 1 times `DecoderStack` (the one-prompt
engine); B > 1 times `BatchStack` with B rows, each at the table's `context` cached positions (the window a
batch's furthest row sees, `batch_contexts`), as the batched engine runs. A small block is timed over a span of
middle layers (`_span`): one layer alone keeps its weights in cache between calls, which a pass never does.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from skipbench.decoding.batch_stack import BatchStack
from skipbench.decoding.layers import DecoderStack, KVCache
from skipbench.decoding.loop import synchronize

REPEATS = 7
SMALL_BLOCK = 64  # positions (rows x size) up to which a block's time is mostly reading the weights
STREAMED_BYTES = 64 * 2**20  # more weights than a CPU's last-level cache or a GPU's L2 holds


def block_sizes(longest: int, most_drafts: int) -> list[int]:
    """Every size a decode or verify pass uses (1 .. K+1 and the catch-up of 2), then powers of two up to the
    longest prefill, between which times are interpolated."""
    sizes = set(range(1, most_drafts + 3))
    size = 4
    while size < longest:
        sizes.add(size)
        size *= 2
    sizes.add(max(longest, 1))
    return sorted(sizes)


def batch_rows(batch_sizes: Iterable[int], prompts: int) -> list[int]:
    """Every number of rows a run's batches have: 1, each batch size, and each smaller last batch (prompts are
    decoded in batches of B in order, so the last holds prompts % B)."""
    rows = {1}
    for size in batch_sizes:
        rows.add(min(size, prompts))
        if size > 1 and prompts % size:
            rows.add(prompts % size)
    return sorted(rows)


def batch_contexts(lengths: Sequence[int], rows: Iterable[int], new_tokens: int) -> dict[int, int]:
    """The keys a typical step of a batch of each number of rows attends over: a batched pass scores every row
    against the window of its batch's furthest row (`batch_stack`), so the median over the run's batches (its
    prompts in order, `lengths`) of the longest prompt, plus half the new tokens; at 1 row, the median prompt."""
    found = {}
    for count in rows:
        size = max(int(count), 1)
        widest = sorted(max(lengths[start:start + size]) for start in range(0, len(lengths), size))
        found[int(count)] = widest[len(widest) // 2] + new_tokens // 2
    return found


def measure(stack: DecoderStack, sizes: list[int], context: int, rows: Mapping[int, int] | None = None,
            most_drafts: int | None = None) -> dict:
    """Median seconds of one layer (middle ones, at `context` cached positions) and of the head, per size; with
    `rows` (number of rows -> the context its batches' steps see, `batch_contexts`), a table per number of rows
    too. Batched passes run a head only on decode and verify blocks (<= K+2 per row: the batched prefill has
    none), so B > 1 times the head at those sizes only (`most_drafts`: K)."""
    found = {"context": context, **_measure_one(stack, sizes, context)}
    head_limit = max(sizes) if most_drafts is None else most_drafts + 2
    batches = {str(count): {"context": seen, **_measure_rows(BatchStack(stack), count, sizes,
                                                             [n for n in sizes if n <= head_limit], seen)}
               for count, seen in sorted((rows or {}).items()) if count > 1}
    return found | ({"batches": batches} if batches else {})


def _span(stack: DecoderStack, positions: int) -> tuple[int, int]:
    """The middle layers a block is timed over: one, or for a small block (`SMALL_BLOCK` positions in all, whose
    time is reading the weights) enough consecutive layers that their weights (`STREAMED_BYTES`) cannot all stay
    in a cache between calls, as a pass's layers do not; the time per layer is the span's over its layers."""
    layers = stack.num_layers
    count = 1
    if positions <= SMALL_BLOCK:
        middle = stack.layers[layers // 2]
        weight = sum(p.numel() * p.element_size() for p in middle.parameters())
        count = min(max(-(-STREAMED_BYTES // max(weight, 1)), 1), max(layers - 1, 1))
    first = min(max(layers // 2 - count // 2, 1 if layers > 1 else 0), layers - count)
    return first, first + count


def _measure_one(stack: DecoderStack, sizes: list[int], context: int) -> dict:
    cache = KVCache(stack.num_layers, context + max(sizes))
    width = stack.config.hidden_size
    timed = {}
    with torch.inference_mode():
        # (Inputs lie where the layer before them ran: a model spread over devices times the same layers.)
        first, last = _span(stack, 1)
        filler = torch.zeros(1, context, width, dtype=stack.dtype, device=stack.input_device(first))
        stack.run(filler, cache, first, last)
        for size in sizes:
            start, end = _span(stack, size)
            hidden = torch.randn(1, size, width, dtype=stack.dtype, device=stack.input_device(start))
            top = torch.randn(1, size, width, dtype=stack.dtype, device=stack.input_device(stack.num_layers))
            timed["layer", size] = (lambda h=hidden, s=start, e=end: stack.run(h, cache, s, e),
                                    lambda: cache.truncate(context), end - start)
            timed["head", size] = (lambda h=top, n=size: stack.run(h, cache, stack.num_layers, stack.num_layers,
                                                                   head=n), lambda: None, 1)
        found = _medians(timed, stack.device)
    return {"layer_seconds": {size: found["layer", size] for size in sizes},
            "head_seconds": {size: found["head", size] for size in sizes}}


def _measure_rows(batched: BatchStack, rows: int, sizes: list[int], head_sizes: list[int], context: int) -> dict:
    """The same layers and the head as the batched engine runs them: `rows` rows, each at `context` positions."""
    stack = batched.stack
    top = stack.num_layers
    cache = batched.new_cache(rows, context + max(sizes), None, "target")
    width = stack.config.hidden_size
    timed = {}
    with torch.inference_mode():
        first, last = _span(stack, 1)  # the widest span: every layer a block is timed over holds the context
        if context:
            batched.run(torch.zeros(rows, context, width, dtype=stack.dtype, device=stack.input_device(first)),
                        cache, first, last)
        for size in sizes:
            start, end = _span(stack, rows * size)
            hidden = torch.randn(rows, size, width, dtype=stack.dtype, device=stack.input_device(start))
            timed["layer", size] = (lambda h=hidden, s=start, e=end: batched.run(h, cache, s, e),
                                    lambda: cache.truncate([context] * rows), end - start)
        for size in head_sizes:
            states = torch.randn(rows, size, width, dtype=stack.dtype, device=stack.input_device(top))
            timed["head", size] = (lambda h=states: batched.run(h, cache, top, top, head="all"), lambda: None, 1)
        found = _medians(timed, stack.device)
    return {"layer_seconds": {size: found["layer", size] for size in sizes},
            "head_seconds": {size: found["head", size] for size in head_sizes}}


def _medians(timed: dict, device: torch.device) -> dict:
    """Median seconds of each (action, reset, layers) over REPEATS rounds, divided by its layers. Rounds run every
    action in turn, so a burst of other work on the machine lands on all sizes alike, not on a few neighbours
    (which would bend the table); the first round warms caches and allocators and is not counted."""
    times: dict = {key: [] for key in timed}
    for _ in range(REPEATS + 1):
        for key, (action, reset, _layers) in timed.items():
            reset()
            synchronize(device)
            began = time.perf_counter()
            action()
            synchronize(device)
            times[key].append(time.perf_counter() - began)
    return {key: statistics.median(found[1:]) / timed[key][2] for key, found in times.items()}


def table(calibration: dict, rows: int) -> dict | None:
    """The (layer_seconds, head_seconds) table measured at `rows` rows; None where that number was not timed.
    A calibration without `batches` (runs before batches) holds batch 1 only."""
    if int(rows) == 1:
        return calibration
    return (calibration.get("batches") or {}).get(str(int(rows)))


def _interpolate(measured: dict, sizes: np.ndarray, clamp: bool) -> np.ndarray:
    known = np.array(sorted(int(n) for n in measured), dtype=float)
    times = np.array([measured[key] for key in sorted(measured, key=int)], dtype=float)
    found = np.interp(sizes, known, times)
    return found if clamp else np.where(sizes <= known[-1], found, np.nan)


def pass_seconds(calibration: dict, start, end, positions, head_positions, batch=1, *,
                 clamp: bool = False) -> np.ndarray:
    """Predicted seconds of passes (arrays of their fields; `batch`: the rows sharing each pass): layers x the
    layer time for its positions at its rows + the head time, interpolated in n within the table of that many
    rows. A number of rows never timed, or a block larger than its table's largest (unless `clamp`: then the
    largest's time), predicts nan, never a number of another table."""
    scalar = all(np.ndim(value) == 0 for value in (start, end, positions, head_positions, batch))
    start, end, positions, heads, rows = np.broadcast_arrays(
        *(np.atleast_1d(np.asarray(value, dtype=float)) for value in (start, end, positions, head_positions, batch)))
    result = np.full(rows.shape, np.nan)
    for count in np.unique(rows):
        measured = table(calibration, int(count))
        if measured is None:
            continue
        chosen = rows == count
        n, h = positions[chosen], heads[chosen]
        per_layer = np.where(n > 0, _interpolate(measured["layer_seconds"], n, clamp), 0.0)
        per_head = np.where(h > 0, _interpolate(measured["head_seconds"], h, clamp), 0.0)
        result[chosen] = (end - start)[chosen] * per_layer + per_head
    return result[0] if scalar else result
