"""Measured time of one decoder layer and of the LM head for a block of n positions, per model.

The cost model's FLOPs and bytes cannot say what a pass costs on a given device: a batch-1 step is
bandwidth-bound, but a verify block of K+1 positions can be compute-bound (on a CPU one layer over 5
positions costs well over one over 1 position). So before measuring, a run times the model's own layer
and head for the block sizes its passes use; the summary then predicts each cell's time as the sum over
the passes it ran of (layers x time of a layer for n positions + time of the head for its rows), and
reports the measured speedup against that prediction.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from skipbench.decoding.layers import DecoderStack, KVCache
from skipbench.decoding.loop import synchronize

REPEATS = 7


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


def measure(stack: DecoderStack, sizes: list[int], context: int) -> dict:
    """Median seconds of one layer (the middle one, at `context` cached positions) and of the head, per size."""
    layer = stack.num_layers // 2
    cache = KVCache(stack.num_layers, context + max(sizes))
    width = stack.config.hidden_size
    layer_seconds, head_seconds = {}, {}
    with torch.inference_mode():
        # (Inputs lie where the layer before them ran: a model spread over devices times the same layer.)
        filler = torch.zeros(1, context, width, dtype=stack.dtype, device=stack.input_device(layer))
        stack.run(filler, cache, layer, layer + 1)
        for size in sizes:
            hidden = torch.randn(1, size, width, dtype=stack.dtype, device=stack.input_device(layer))
            last = torch.randn(1, size, width, dtype=stack.dtype, device=stack.input_device(stack.num_layers))
            layer_seconds[size] = _median(lambda h=hidden: stack.run(h, cache, layer, layer + 1), stack.device,
                                          reset=lambda: cache.truncate(context))
            head_seconds[size] = _median(lambda h=last, n=size: stack.run(h, cache, stack.num_layers,
                                                                            stack.num_layers, head=n), stack.device)
    return {"context": context, "layer_seconds": layer_seconds, "head_seconds": head_seconds}


def _median(action, device: torch.device, reset=lambda: None) -> float:
    times = []
    for _ in range(REPEATS + 1):  # the first call warms caches and allocators
        reset()
        synchronize(device)
        began = time.perf_counter()
        action()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:])


def pass_seconds(calibration: dict, start, end, positions, head_positions) -> np.ndarray:
    """Predicted seconds of passes (arrays of their fields): layers x layer time + head time, interpolated."""
    layer = calibration["layer_seconds"]
    head = calibration["head_seconds"]
    layer_sizes = np.array(sorted(int(n) for n in layer), dtype=float)
    head_sizes = np.array(sorted(int(n) for n in head), dtype=float)
    layer_times = np.array([layer[key] for key in sorted(layer, key=int)])
    head_times = np.array([head[key] for key in sorted(head, key=int)])
    per_layer = np.interp(np.asarray(positions, dtype=float), layer_sizes, layer_times)
    per_head = np.where(np.asarray(head_positions) > 0,
                        np.interp(np.asarray(head_positions, dtype=float), head_sizes, head_times), 0.0)
    return (np.asarray(end) - np.asarray(start)) * np.where(np.asarray(positions) > 0, per_layer, 0.0) + per_head
