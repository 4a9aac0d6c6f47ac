"""Run any span of a transformers decoder's layers against skipbench's own KV cache, eager or compiled.

We drive the model's own modules (embedding, decoder layers, rotary embedding, final norm, LM head)
instead of copying its forward code, so a transformers update that changes `LlamaModel.forward`
does not break the engine; only the layer call signature matters.

Two ways to run a span:
- eager (the default): each layer attends over exactly the positions its cache holds; shapes change
  every step, which is cheapest without a compiler.
- compiled (`compile=True`): static shapes. Every cache has one capacity for the whole run and layers
  attend over all of it through a mask built on the device from the query positions, so a decode step,
  a draft step of layers < E and a verify block of K+1 positions each have one shape, and
  `torch.compile` (on CUDA `mode="reduce-overhead"`, which captures CUDA graphs) compiles each once per
  (layer span, positions) and reuses it for every cell of the run. Other shapes (prefill, the last
  steps before the token budget) run the same function eagerly.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence

import torch
import transformers
from transformers import PreTrainedModel

from skipbench.decoding.record import Trace
from skipbench.errors import UserError
from skipbench.placement import Placement

SUPPORTED_MODEL_TYPES = ("llama",)
# While warming up only: torch.compile compiles one graph per pass shape, and a sweep of many exits and
# draft lengths has more than dynamo's default limits; hitting a limit must be an error, never a silent
# fall back to eager code in a cell labelled compiled.
WARM_UP_LIMITS = dict(recompile_limit=1024, accumulated_recompile_limit=4096, fail_on_recompile_limit_hit=True)


class EngineError(UserError):
    """The native engine cannot drive this model or configuration; one line for the user."""


class KVCache:
    """Pre-allocated keys and values for every layer, each layer with its own filled length.

    Layers have separate lengths because self-speculative decoding fills layers < E (the draft) ahead of
    layers >= E. Rolling back rejected drafts only moves a length: nothing is copied or freed. The decoder
    layers call `update()`, the one method transformers' attention needs of a cache. Eager caches return
    the filled part; static caches write at `positions` (a device tensor) and return the whole capacity.
    """

    def __init__(self, num_layers: int, capacity: int, *,
                 static_like: torch.Tensor | Sequence[torch.Tensor] | None = None):
        """`static_like`: a static cache, allocated now (compiled code must never allocate it) like this
        tensor of shape (1, kv heads, any, head dim), on its device and in its dtype; a list gives each layer
        its own (a model spread over devices keeps each layer's cache on the layer's device)."""
        self.capacity = capacity
        self.static = static_like is not None
        self.lengths = [0] * num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.positions: torch.Tensor | None = None  # static caches: where the current call writes
        self.trace: Trace | None = None  # where the passes over this cache are recorded, as which model's
        self.model = "target"
        if self.static:
            for layer in range(num_layers):
                like = static_like if isinstance(static_like, torch.Tensor) else static_like[layer]
                self.allocate(layer, like, like)

    def reset(self, trace: Trace | None, model: str) -> KVCache:
        self.lengths = [0] * len(self.lengths)
        self.trace, self.model = trace, model
        return self

    def allocate(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        shape = (*key.shape[:-2], self.capacity, key.shape[-1])
        self.keys[layer_idx] = key.new_zeros(shape)
        self.values[layer_idx] = value.new_zeros((*shape[:-1], value.shape[-1]))
        if self.static and key.device.type == "cuda":
            # CUDA graphs replay on fixed addresses: the cache must stay where it was captured.
            torch._dynamo.mark_static_address(self.keys[layer_idx])
            torch._dynamo.mark_static_address(self.values[layer_idx])

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is None:
            self.allocate(layer_idx, key, value)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.static:
            keys[:, :, self.positions] = key  # index_put_, which the compiler writes in place
            values[:, :, self.positions] = value
            return keys, values
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
    """An additive mask over a whole static cache: query at position p sees keys 0..p, nothing after it
    (stale entries of rejected drafts or of an earlier generation lie after it)."""
    keys = torch.arange(capacity, device=positions.device, dtype=torch.long)
    allowed = keys[None, :] <= positions[:, None]
    zero = torch.zeros((), dtype=dtype, device=positions.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]


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

    With `compile`, passes over `compiled_positions` positions run compiled against static caches of
    `capacity` positions (other passes run the same function eagerly); `compile_seconds` accumulates the time
    spent compiling, outside any cell's time: the engine compiles every shape a cell needs before it is
    timed (`warm`).

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
        self._caches: dict[str, KVCache] = {}
        self._warmed: set[tuple] = set()
        # Eager only: when a dict, the states after each layer count it names (exit l: after layers [0, l)) of
        # every position the eager passes run are appended to it (the dynamic-exit policy's shadow tokens).
        self.taps: dict[int, list[torch.Tensor]] | None = None
        if compile:
            # CUDA: CUDA graphs (what mode="reduce-overhead" turns on). CPU: the wrapper around the kernels in
            # C++ rather than Python, which is most of a small model's step.
            # (CUDA graph trees capture one device: a spread model compiles without them.)
            cuda = self.device.type == "cuda"
            options = {"triton.cudagraphs": not self.spread} if cuda else {"cpp_wrapper": True}
            self._compiled_pass = torch.compile(self._static_pass, dynamic=False, options=options)
            self._compiled_chain = torch.compile(self._static_chain, dynamic=False, options=options)

    def _new_rotary(self, device: torch.device) -> torch.nn.Module:
        with device:  # its inverse frequencies are computed on `device`
            return type(self.rotary_emb)(config=self.config)

    def new_cache(self, capacity: int, trace: Trace | None = None, model: str = "target") -> KVCache:
        """A cache for one generation. Compiled stacks keep one static cache per model role for the whole
        run (CUDA graphs need fixed addresses; compiled shapes need one capacity)."""
        if not self.compiled:
            return KVCache(self.num_layers, capacity).reset(trace, model)
        if capacity > self.capacity:
            raise EngineError(f"a generation needs {capacity} cached positions but the compiled engine was built "
                              f"for {self.capacity}")
        if model not in self._caches:
            config = self.config
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            like = [torch.empty(1, config.num_key_value_heads, 0, head_dim, dtype=self.dtype, device=device)
                    for device in self.layer_devices]  # each layer's cache on its layer's device
            self._caches[model] = KVCache(self.num_layers, self.capacity, static_like=like)
        return self._caches[model].reset(trace, model)

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
        if cache.static:
            positions = torch.arange(past, past + count, device=self.device, dtype=torch.long)
            hidden, logits = self._pass((start, end, count, head), inputs, positions, cache, start, end, head)
        else:
            hidden = self._embed(inputs) if start == 0 else inputs
            hidden = self._layers(hidden, cache, start, end, past, count) if start < end else hidden
            logits = self._head(hidden[:, count - head :], end) if head else None
        cache.advance(start, end, count)
        return hidden, logits

    def chain(self, inputs: torch.Tensor, cache: KVCache, end: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` greedy draft passes through layers [0, end) and the head: the first on the ids `inputs`
        (n,), each next one on the previous pass's argmax. Returns the states of each pass's last position
        (1, count, d) and the drafted ids (count,). One compiled call when warmed (a whole draft phase), and
        recorded as the `count` passes it is."""
        past, fed = cache.lengths[0], inputs.shape[0]
        if cache.trace is not None:
            for index in range(count):
                position = past if index == 0 else past + fed + index - 1
                cache.trace.record(cache.model, 0, end, fed if index == 0 else 1, position, 1,
                                   cache.capacity if cache.static else None)
        if not cache.static:
            return self._eager_chain(inputs, cache, end, count)
        positions = torch.arange(past, past + fed, device=self.device, dtype=torch.long)
        function = self._compiled_chain if ("chain", end, fed, count) in self._warmed else self._static_chain
        states, ids = self._guarded(function, inputs, positions, cache, end, count)
        cache.advance(0, end, fed + count - 1)  # the last draft is not fed back: the verifier feeds it
        return states, ids

    def warm(self, role: str, shapes: list[tuple]) -> None:
        """Compile every shape a cell will run on the cache of `role`, before it is timed, timing the
        compilation apart (the cache's contents are dropped: each generation resets it). A shape is
        ("pass", start, end, positions, head) or ("chain", end, positions fed first, count). Only shapes
        compiled here run compiled; any other (prefill, the last steps before the token budget) runs the same
        function eagerly, so nothing is ever compiled inside a timed generation."""
        if not self.compiled:
            return
        cache = self.new_cache(self.capacity, None, role)
        with torch.inference_mode(), torch._dynamo.config.patch(**WARM_UP_LIMITS):
            for shape in shapes:
                if shape in self._warmed:
                    continue
                kind, *sizes = shape
                began = time.perf_counter()
                fed = sizes[1] if kind == "chain" else sizes[2]
                positions = torch.arange(fed, device=self.device, dtype=torch.long)
                for _ in range(3):  # CUDA graph trees record a shape on a later call than the first
                    if kind == "chain":
                        end, fed, count = sizes
                        self._compiled_chain(self._zeros(0, fed), positions, cache, end, count)
                    else:
                        start, end, fed, head = sizes
                        self._compiled_pass(self._zeros(start, fed), positions, cache, start, end, head)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.compile_seconds += time.perf_counter() - began
                self._warmed.add(shape)

    def _zeros(self, start: int, count: int) -> torch.Tensor:
        """Inputs of the right kind for a pass starting at layer `start`: ids, or hidden states."""
        if start == 0:
            return torch.zeros(count, dtype=torch.long, device=self.device)
        return torch.zeros(1, count, self.config.hidden_size, dtype=self.dtype, device=self.input_device(start))

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

    def _pass(self, shape: tuple, *args) -> tuple[torch.Tensor, torch.Tensor | None]:
        function = self._compiled_pass if ("pass", *shape) in self._warmed else self._static_pass
        return self._guarded(function, *args)

    def _guarded(self, function, *args):
        if function in (self._static_pass, self._static_chain):
            return function(*args)
        # Every compiled shape was warmed: dynamo need only tell its compiled shapes apart, not check that
        # nothing else changed (the engine's tensors keep their shapes and dtypes for the whole run); and a
        # compilation inside a timed generation would be a bug, so it is an error rather than a slow step.
        with torch.compiler.set_stance("fail_on_recompile", skip_guard_eval_unsafe=True):
            result = function(*args)
        if self.device.type == "cuda":
            # A CUDA graph's outputs live in memory its next replay reuses: keep what outlives the call.
            result = tuple(None if part is None else part.clone() for part in result)
        return result

    def _static_chain(self, inputs: torch.Tensor, positions: torch.Tensor, cache: KVCache, end: int,
                      count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole greedy draft phase against a static cache: what torch.compile compiles per (end, count)."""
        states, ids = [], []
        for _ in range(count):
            hidden, logits = self._static_pass(inputs, positions, cache, 0, end, 1)
            states.append(hidden[:, -1:])
            inputs = logits.argmax(dim=-1)
            ids.append(inputs)
            positions = positions[-1:] + 1
        return torch.cat(states, dim=1), torch.cat(ids)

    def _eager_chain(self, inputs: torch.Tensor, cache: KVCache, end: int,
                     count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same draft phase on an eager cache, whose lengths move as each pass writes."""
        states, ids = [], []
        for _ in range(count):
            fed = inputs.shape[0]
            hidden = self._layers(self._embed(inputs), cache, 0, end, cache.lengths[0], fed)
            cache.advance(0, end, fed)
            states.append(hidden[:, -1:])
            inputs = self._head(hidden[:, -1:], end).argmax(dim=-1)
            ids.append(inputs)
        return torch.cat(states, dim=1), torch.cat(ids)

    def _static_pass(self, inputs: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int, end: int,
                     head: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One whole pass against a static cache (embedding, layers [start, end), head): what torch.compile
        compiles, so a decode step is one compiled call."""
        hidden = self._embed(inputs) if start == 0 else inputs
        for first, last, device in self._spans(start, end):
            hidden = self._move(hidden, first, device)
            here = positions.to(device)  # the cache writes at these positions, on its layers' device
            cache.positions = here
            position_embeddings = self._rotary[device](hidden, here[None])
            mask = static_mask(here, cache.capacity, hidden.dtype)
            hidden = run_layers(self.layers[first:last], hidden, mask=mask, positions=here[None],
                                position_embeddings=position_embeddings, cache=cache, keyword=self.cache_keyword)
        return hidden, self._head(hidden[:, hidden.shape[1] - head :], end) if head else None

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
