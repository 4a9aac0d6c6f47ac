"""Run any span of a transformers decoder's layers against skipbench's own KV cache, eager or compiled.

We drive the model's own modules (embedding, decoder layers, rotary embedding, final norm, LM head)
instead of copying its forward code, so a transformers update that changes `LlamaModel.forward`
does not break the engine; only the layer call signature matters.

Two ways to run a span:
- eager (the default): each layer attends over exactly the positions its cache holds; shapes change
  every step, which is cheapest without a compiler.
- compiled (`compile=True`): static shapes. Every cache has one capacity for the whole run and layers
  attend over all of it through a mask built from the query positions. `torch.compile` compiles one
  decoder layer (and the rotary tables and mask before the layers, and the head after them) once per pass
  shape, (rows, positions), and that one graph runs every layer of every span: the layer's weights and
  its cache slot are the graph's inputs, so nothing in it depends on which layer it is or where a span ends.
  A grid of exits therefore compiles what one exit does (a decode step, a draft step and a verify block of
  K+1 positions); only more draft lengths or batch sizes add graphs. Other shapes (prefill, the last steps
  before the token budget) run the same functions eagerly.
"""

from __future__ import annotations

import contextlib
import inspect
import time

import torch
import transformers
from transformers import PreTrainedModel

from skipbench.decoding.record import Trace
from skipbench.errors import UserError
from skipbench.placement import Placement

SUPPORTED_MODEL_TYPES = ("llama",)
# While warming up only: torch.compile compiles one graph per pass shape, and a sweep of several draft lengths
# and batch sizes has more than dynamo's default limits; hitting a limit must be an error, never a silent
# fall back to eager code in a cell labelled compiled.
WARM_UP_LIMITS = dict(recompile_limit=1024, accumulated_recompile_limit=4096, fail_on_recompile_limit_hit=True)


class EngineError(UserError):
    """The native engine cannot drive this model or configuration; one line for the user."""


class LayerSlot:
    """One layer's static keys and values, (rows, kv heads, capacity, head dim): what a compiled pass hands the
    decoder layer as its cache. The layer calls `update()`, which writes at `positions` (rows, n) and returns the
    whole capacity (the mask hides what a query must not see). It ignores the layer index the layer passes, so
    one compiled graph serves every layer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values
        self.positions: torch.Tensor | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        index = self.positions[:, None, :, None]
        self.keys.scatter_(2, index.expand(-1, key.shape[1], -1, key.shape[-1]), key)
        self.values.scatter_(2, index.expand(-1, value.shape[1], -1, value.shape[-1]), value)
        return self.keys, self.values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # never asked by the layers the engine drives; the cache's lengths are the engine's


class KVCache:
    """Keys and values for every layer of one generation, each layer with its own filled length.

    Layers have separate lengths because self-speculative decoding fills layers < E (the draft) ahead of
    layers >= E. Rolling back rejected drafts only moves a length: nothing is copied or freed. Eager caches
    grow as the decoder layers call `update()` (the one method transformers' attention needs of a cache) and
    return the filled part; static caches are `slots` (one `LayerSlot` each, allocated once per run).
    """

    def __init__(self, num_layers: int, capacity: int, *, slots: list[LayerSlot] | None = None):
        self.capacity = capacity
        self.static = slots is not None
        self.slots = slots
        self.lengths = [0] * num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.trace: Trace | None = None  # where the passes over this cache are recorded, as which model's
        self.model = "target"

    def reset(self, trace: Trace | None, model: str) -> KVCache:
        self.lengths = [0] * len(self.lengths)
        self.trace, self.model = trace, model
        return self

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is None:
            shape = (*key.shape[:-2], self.capacity, key.shape[-1])
            self.keys[layer_idx] = key.new_zeros(shape)
            self.values[layer_idx] = value.new_zeros((*shape[:-1], value.shape[-1]))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        start, count = self.lengths[layer_idx], key.shape[-2]
        keys[..., start : start + count, :] = key
        values[..., start : start + count, :] = value
        return keys[..., : start + count, :], values[..., : start + count, :]

    def advance(self, start: int, end: int, count: int) -> None:
        """Layers [start, end) now hold `count` more positions."""
        for layer in range(start, end):
            self.lengths[layer] += count

    def truncate(self, length: int) -> None:
        """Forget every position >= length in every layer (layers already shorter keep their length)."""
        self.lengths = [min(filled, length) for filled in self.lengths]
        if self.trace is not None:
            self.trace.settle(self.model, length)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]


def causal_mask(config, past: int, count: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """The mask letting query i (at position past+i) see keys 0..past+i, for `count` queries.

    None where attention needs none: one query sees every cached key, and SDPA masks a fresh sequence
    itself (is_causal, which keeps its fast kernels). Otherwise an additive mask, which eager attention
    and SDPA both take.
    """
    if count == 1 or (past == 0 and getattr(config, "_attn_implementation", "eager") != "eager"):
        return None
    key_positions = torch.arange(past + count, device=device, dtype=torch.long)
    query_positions = torch.arange(past, past + count, device=device, dtype=torch.long)
    blocked = key_positions[None, :] > query_positions[:, None]
    mask = torch.zeros(blocked.shape, dtype=dtype, device=device)
    return mask.masked_fill(blocked, torch.finfo(dtype).min)[None, None]


def static_mask(positions: torch.Tensor, capacity: int, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask (rows, 1, n, capacity) over a whole static cache: the query of row b at position p sees
    keys 0..p, nothing after it (stale entries of rejected drafts, of an earlier generation or of another row's
    filler lie after it)."""
    keys = torch.arange(capacity, device=positions.device, dtype=torch.long)
    allowed = keys[None, None, :] <= positions[:, :, None]
    zero = torch.zeros((), dtype=dtype, device=positions.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def pass_inputs(rotary: torch.nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
                capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every layer of a static pass shares: the mask and the rotary tables for `positions` (rows, n)."""
    cos, sin = rotary(hidden, positions)
    return static_mask(positions, capacity, hidden.dtype), cos, sin


def layer_step(layer: torch.nn.Module, hidden: torch.Tensor, slot: LayerSlot, positions: torch.Tensor,
               mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keyword: str) -> torch.Tensor:
    """One decoder layer of a static pass: the unit torch.compile compiles once per (rows, n) for all layers."""
    slot.positions = positions
    return run_layers([layer], hidden, mask=mask, positions=positions, position_embeddings=(cos, sin), cache=slot,
                      keyword=keyword)


def head_step(norm: torch.nn.Module, lm_head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head: (rows, n, d) -> (rows, n, vocab) float32 logits."""
    return lm_head(norm(hidden)).float()


COMPILED_UNITS = {"inputs": pass_inputs, "layer": layer_step, "head": head_step}


def cache_keyword(layer: torch.nn.Module) -> str:
    """The keyword the installed transformers' decoder layer takes its cache by: `cache` from 5.25 on (where
    `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before. Read from the signature,
    never from a version number."""
    parameters = inspect.signature(layer.forward).parameters
    for keyword in ("cache", "past_key_values"):
        if keyword in parameters:
            return keyword
    raise EngineError(f"transformers {transformers.__version__} changed how a decoder layer takes its KV cache "
                      f"({type(layer).__name__}.forward has neither cache= nor past_key_values=); skipbench's "
                      f"engine supports transformers 4.56 to 5.25 (tested): use --backend hf or another release")


def run_layers(layers, hidden: torch.Tensor, *, mask: torch.Tensor | None, positions: torch.Tensor,
               position_embeddings, cache: KVCache | None = None, keyword: str = "cache") -> torch.Tensor:
    """Call a sequence of the model's own decoder layers, with a KV cache (decoding) or without (training).

    `keyword`: what the layers call their cache argument (`cache_keyword`); unused without a cache."""
    cached = {keyword: cache, "use_cache": True} if cache is not None else {}
    for layer in layers:
        output = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings,
                       **cached)
        hidden = output[0] if isinstance(output, tuple) else output  # transformers < 5 returned tuples
    return hidden


class DecoderStack:
    """The pieces of a Llama-family causal LM that the engine calls, and how to call them.

    With `compile`, passes run against static caches of `capacity` positions, through the units of
    `COMPILED_UNITS` compiled per pass shape (rows, positions) by `warm` before any cell is timed (other shapes
    run the same functions eagerly); `compile_seconds` accumulates the time spent compiling and
    `compiled_graphs` counts the graphs, outside any cell's time.

    With a `placement` (a model spread over devices) each run of layers on one device is a stage: its
    layers, their KV cache and a copy of the rotary tables live there, and the hidden state moves to the
    next stage's device at every boundary (and to the head's device before the head); `moves` counts
    those moves. The engine makes them itself, whatever hooks the model carries.
    """

    def __init__(self, model: PreTrainedModel, *, compile: bool = False, capacity: int = 0,
                 placement: Placement | None = None):
        config = model.config
        body = getattr(model, "model", None)
        parts = ("embed_tokens", "layers", "norm", "rotary_emb")
        if (config.model_type not in SUPPORTED_MODEL_TYPES or body is None
                or not all(hasattr(body, part) for part in parts) or not hasattr(model, "lm_head")):
            architecture = (config.architectures or [type(model).__name__])[0]
            raise EngineError(f"the native engine cannot drive {architecture} (model_type "
                              f"{config.model_type!r}); it supports {', '.join(SUPPORTED_MODEL_TYPES)}: "
                              f"use --backend hf")
        self.model = model
        self.config = config
        self.embed_tokens = body.embed_tokens
        self.layers = body.layers
        self.norm = body.norm
        self.rotary_emb = body.rotary_emb
        self.lm_head = model.lm_head
        self.num_layers = config.num_hidden_layers
        self.cache_keyword = cache_keyword(self.layers[0])
        self.device = self.embed_tokens.weight.device
        self.dtype = self.embed_tokens.weight.dtype
        self.placement = placement
        if placement is not None and len(placement.layers) != self.num_layers:
            raise EngineError(f"the placement names {len(placement.layers)} layers but the model has "
                              f"{self.num_layers}")
        # Where the embedding, each layer and the head run (one device unless a placement spreads them).
        self.embed_device = torch.device(placement.embed) if placement else self.device
        self.layer_devices = ([torch.device(name) for name in placement.layers] if placement
                              else [self.device] * self.num_layers)
        self.head_device = torch.device(placement.head) if placement else self.lm_head.weight.device
        # The rotary tables of each device, built there from the config as the model built its own.
        self._rotary = {device: self.rotary_emb if device == self.device else self._new_rotary(device)
                        for device in dict.fromkeys(self.layer_devices)}
        self.spread = len({self.embed_device, self.head_device, *self.layer_devices}) > 1
        self.moves = 0  # boundary moves of the hidden state (a spread model's, between stages)
        self.compiled = compile
        self.capacity = capacity
        self.compile_seconds = 0.0
        self.compiled_graphs = 0  # one per unit and pass shape (and device), whatever the exits
        self._slots: dict[tuple[str, int], list[LayerSlot]] = {}
        self._warmed: set[tuple[str, int, int]] = set()  # (unit, rows, positions) compiled
        # Eager only: when a dict, the states after each layer count it names (exit l: after layers [0, l)) of
        # every position the eager passes run are appended to it (the dynamic-exit policy's shadow tokens).
        self.taps: dict[int, list[torch.Tensor]] | None = None
        # CPU: the wrapper around the kernels in C++ rather than Python, which is most of a small model's step.
        # CUDA: fused kernels without CUDA graphs (a graph would be captured per layer, each with its own weights'
        # addresses); a layer's launches overlap the GPU's work on the one before.
        options = {"cpp_wrapper": True} if self.device.type == "cpu" else {}
        self._compiled = {unit: torch.compile(function, dynamic=False, options=options)
                          for unit, function in COMPILED_UNITS.items()} if compile else {}

    def _new_rotary(self, device: torch.device) -> torch.nn.Module:
        with device:  # its inverse frequencies are computed on `device`
            return type(self.rotary_emb)(config=self.config)

    def new_slots(self, rows: int, role: str = "target", needed: int = 0) -> list[LayerSlot]:
        """Static keys and values for `rows` rows, one slot per layer on its layer's device; a compiled stack keeps
        one set per (role, rows) for the whole run, allocated once (compiled code never allocates a cache).
        `needed`: the positions a generation will cache, refused beyond the capacity the stack was built for."""
        if needed > self.capacity:
            raise EngineError(f"a generation needs {needed} cached positions but the compiled engine was built "
                              f"for {self.capacity}")
        if (role, rows) not in self._slots:
            config = self.config
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            shape = (rows, config.num_key_value_heads, self.capacity, head_dim)
            with torch.inference_mode():  # as the graphs were compiled for (a tensor's dispatch keys are guarded)
                self._slots[role, rows] = [
                    LayerSlot(torch.zeros(shape, dtype=self.dtype, device=device),
                              torch.zeros(shape, dtype=self.dtype, device=device)) for device in self.layer_devices]
        return self._slots[role, rows]

    def new_cache(self, capacity: int, trace: Trace | None = None, model: str = "target") -> KVCache:
        """A cache for one generation: eager, or on a compiled stack its static slots for one row."""
        if not self.compiled:
            return KVCache(self.num_layers, capacity).reset(trace, model)
        return KVCache(self.num_layers, self.capacity, slots=self.new_slots(1, model, capacity)).reset(trace, model)

    def ids(self, token_ids: list[int]) -> torch.Tensor:
        return torch.tensor(token_ids, dtype=torch.long, device=self.device)

    def run(self, inputs: torch.Tensor, cache: KVCache, start: int, end: int,
            head: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layers [start, end) on n positions following what those layers cached: `inputs` are token ids (n,)
        when start == 0 (the embedding runs first), else hidden states (1, n, d).

        Returns the new states and, with `head` > 0, the (head, vocab) logits of the last `head` positions
        (final norm and LM head; at an early exit, the exit head). The pass is recorded in the cache's trace.
        """
        past = cache.lengths[start] if start < self.num_layers else cache.lengths[-1]
        count = inputs.shape[0] if start == 0 else inputs.shape[1]
        if cache.trace is not None:
            cache.trace.record(cache.model, start, end, count, past, head, cache.capacity if cache.static else None)
        hidden = self._embed(inputs) if start == 0 else inputs
        if cache.static:
            positions = torch.arange(past, past + count, device=self.device, dtype=torch.long)[None]
            hidden = self.static_layers(hidden, positions, cache.slots, start, end)
            logits = self.static_head(hidden[:, count - head :], end)[0] if head else None
        else:
            hidden = self._layers(hidden, cache, start, end, past, count) if start < end else hidden
            logits = self._head(hidden[:, count - head :], end) if head else None
        cache.advance(start, end, count)
        return hidden, logits

    def chain(self, inputs: torch.Tensor, cache: KVCache, end: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` greedy draft passes through layers [0, end) and the head: the first on the ids `inputs`
        (n,), each next one on the previous pass's argmax, chosen on the device (no host read). Returns the
        states of each pass's last position (1, count, d) and the drafted ids (count,). The last draft is not
        fed back: the verifier feeds it."""
        states, ids = [], []
        for _ in range(count):
            hidden, logits = self.run(inputs, cache, 0, end, head=1)
            states.append(hidden[:, -1:])
            inputs = logits.argmax(dim=-1)
            ids.append(inputs)
        return torch.cat(states, dim=1), torch.cat(ids)

    def static_layers(self, hidden: torch.Tensor, positions: torch.Tensor, slots: list[LayerSlot], start: int,
                      end: int) -> torch.Tensor:
        """Layers [start, end) on states (rows, n, d) at `positions` (rows, n), against static `slots`: per stage,
        the mask and rotary tables once, then each layer through the one graph of shape (rows, n) when warmed."""
        rows, count = positions.shape
        inputs, step = self._unit("inputs", rows, count), self._unit("layer", rows, count)
        with self._stance(step):
            for first, last, device in self._spans(start, end):
                hidden = self._move(hidden, first, device)
                here = positions.to(device)  # the cache writes at these positions, on its layers' device
                mask, cos, sin = inputs(self._rotary[device], hidden, here, self.capacity)
                for index in range(first, last):
                    hidden = step(self.layers[index], hidden, slots[index], here, mask, cos, sin, self.cache_keyword)
        return hidden

    def static_head(self, hidden: torch.Tensor, end: int) -> torch.Tensor:
        """The head after layer `end` - 1 on states (rows, n, d) -> (rows, n, vocab) float32 logits, compiled per
        (rows, n) when warmed."""
        hidden = self._move(hidden, end, self.head_device)  # an early exit's too: the head lies where it lies
        rows, count, width = hidden.shape
        if hidden.stride() != (count * width, width, 1):  # the last rows of a longer pass: a view the graph,
            hidden = hidden.clone(memory_format=torch.contiguous_format)  # compiled for dense strides, would refuse
        head = self._unit("head", rows, count)
        with self._stance(head):
            return head(self.norm, self.lm_head, hidden)

    def _unit(self, unit: str, rows: int, count: int):
        """The compiled unit for this shape when warmed, else the plain function (the same code, eagerly)."""
        return self._compiled[unit] if (unit, rows, count) in self._warmed else COMPILED_UNITS[unit]

    def _stance(self, function) -> contextlib.AbstractContextManager:
        """Around compiled calls: every compiled shape was warmed, so dynamo need only tell its compiled shapes apart,
        not check that nothing else changed (the engine's tensors keep their shapes and dtypes for the whole run);
        and a compilation inside a timed generation would be a bug, so it is an error rather than a slow step."""
        if function in COMPILED_UNITS.values():
            return contextlib.nullcontext()
        return torch.compiler.set_stance("fail_on_recompile", skip_guard_eval_unsafe=True)

    def warm(self, shapes: set[tuple[str, int, int]], role: str = "target") -> None:
        """Compile every (unit, rows, positions) a cell will run, before it is timed, timing the compilation
        apart: units "layers" (the pass inputs and one decoder layer) and "head"; and allocate the static slots of
        `role` for each row count. A layer's graph is compiled on the first layer of each device and serves all
        of them. Only shapes compiled here run compiled; any other (prefill, the last steps before the token
        budget) runs the same functions eagerly, so nothing is ever compiled inside a timed generation."""
        if not self.compiled:
            return
        width = self.config.hidden_size
        with torch.inference_mode(), torch._dynamo.config.patch(**WARM_UP_LIMITS):
            for unit, rows, count in sorted(shapes):
                slots = self.new_slots(rows, role) if unit == "layers" else None  # the run's own, allocated now
                if ("layer" if unit == "layers" else unit, rows, count) in self._warmed:
                    continue
                began = time.perf_counter()
                if unit == "head":
                    hidden = torch.zeros(rows, count, width, dtype=self.dtype, device=self.head_device)
                    self._compiled["head"](self.norm, self.lm_head, hidden)
                    self._warmed.add(("head", rows, count))
                    self.compiled_graphs += 1
                else:
                    for first, _, device in self._spans(0, self.num_layers):
                        hidden = torch.zeros(rows, count, width, dtype=self.dtype, device=device)
                        positions = torch.arange(count, device=device)[None].expand(rows, count).contiguous()
                        mask, cos, sin = self._compiled["inputs"](self._rotary[device], hidden, positions,
                                                                   self.capacity)
                        self._compiled["layer"](self.layers[first], hidden, slots[first], positions, mask, cos,
                                                sin, self.cache_keyword)
                    self._warmed.update({("inputs", rows, count), ("layer", rows, count)})
                    self.compiled_graphs += 2 * len(set(self.layer_devices))  # each device: its own graphs
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.compile_seconds += time.perf_counter() - began

    def input_device(self, start: int) -> torch.device:
        """Where the hidden state entering layer `start` lies: on the device of the layer before it (the
        embedding's for layer 0; the last layer's for the head)."""
        return self.embed_device if start == 0 else self.layer_devices[start - 1]

    def _spans(self, start: int, end: int) -> list[tuple[int, int, torch.device]]:
        """Layers [start, end) as runs on one device each."""
        spans: list[tuple[int, int, torch.device]] = []
        for index in range(start, end):
            device = self.layer_devices[index]
            if spans and spans[-1][2] == device:
                spans[-1] = (spans[-1][0], index + 1, device)
            else:
                spans.append((index, index + 1, device))
        return spans

    def _move(self, hidden: torch.Tensor, start: int, device: torch.device) -> torch.Tensor:
        """The hidden state entering layer `start` (the head when start == num_layers), moved to `device`
        when the layer before it ran elsewhere: a stage boundary."""
        if self.input_device(start) == device:
            return hidden
        self.moves += 1
        return hidden.to(device, non_blocking=True)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (n,), wherever they were chosen (the head's device), through the embedding."""
        return self.embed_tokens(ids.to(self.embed_device)[None])

    def _layers(self, hidden: torch.Tensor, cache: KVCache, start: int, end: int, past: int,
                count: int) -> torch.Tensor:
        for first, last, device in self._spans(start, end):
            hidden = self._move(hidden, first, device)
            positions = torch.arange(past, past + count, device=device, dtype=torch.long).unsqueeze(0)
            position_embeddings = self._rotary[device](hidden, positions)
            mask = causal_mask(self.config, past, count, device, self.dtype)
            if self.taps is None:
                hidden = run_layers(self.layers[first:last], hidden, mask=mask, positions=positions,
                                    position_embeddings=position_embeddings, cache=cache, keyword=self.cache_keyword)
                continue
            for index in range(first, last):  # dynamic exit: keep the states after the tapped layers
                hidden = run_layers(self.layers[index : index + 1], hidden, mask=mask, positions=positions,
                                    position_embeddings=position_embeddings, cache=cache, keyword=self.cache_keyword)
                if index + 1 in self.taps:
                    self.taps[index + 1].append(hidden)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The exit head on states (..., n, d) -> (..., n, vocab) float32 logits; not recorded: callers record it."""
        return self.lm_head(self.norm(hidden.to(self.head_device))).float()

    def _head(self, hidden: torch.Tensor, end: int) -> torch.Tensor:
        """Final norm and LM head after layer `end` - 1: (1, n, d) -> (n, vocab) float32 logits."""
        hidden = self._move(hidden, end, self.head_device)  # an early exit's too: the head lies where it lies
        return self.lm_head(self.norm(hidden))[0].float()
