"""The `hf` backend: transformers' own `generate()`, filling the same record as the native engine.

`generate()` reports no draft statistics, so skipbench counts them itself: a hook on the target's last
decoder layer sees every full-model pass (drafts from `assistant_early_exit` stop before that layer),
and the positions each pass covers give the drafted and accepted counts of each step exactly.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from skipbench.decoding.loop import Generation, Step, synchronize
from skipbench.decoding.sampling import Sampler


class _FirstTokenClock(BaseStreamer):
    """generate() streams the prompt first, then new tokens: the second call marks the first token."""

    def __init__(self, device: torch.device, began: float):
        self.device, self.began, self.calls, self.first_token_s = device, began, 0, 0.0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            synchronize(self.device)
            self.first_token_s = time.perf_counter() - self.began

    def end(self) -> None:
        pass


def _steps_from_passes(passes: list[tuple[int, int]], prompt_tokens: int, total_tokens: int) -> list[Step]:
    """Full-model passes (first position, positions) -> steps. Pass 0 also holds the prompt (context 0).

    Before pass j > 0 the committed sequence is one token longer than the cache (the last step's own
    token is fed next), so pass j drafted (start + count) - (start + 1) tokens and committed up to one
    less than where the next pass starts, plus that pending token.
    """
    steps = []
    for index, (start, count) in enumerate(passes):
        committed_before = prompt_tokens if index == 0 else start + 1
        committed_after = passes[index + 1][0] + 1 if index + 1 < len(passes) else total_tokens
        drafted = start + count - committed_before
        steps.append(Step(context=start, drafted=drafted, accepted=committed_after - committed_before - 1))
    return steps


def generate_hf(target: PreTrainedModel, prompt: list[int], *, max_new_tokens: int, sampler: Sampler,
                eos_ids: Sequence[int], device: torch.device, exit_layer: int | None = None,
                draft: PreTrainedModel | None = None, num_speculations: int = 0,
                seed: int = 0, static_cache: bool = False) -> Generation:
    """Run `generate()` autoregressively, with `assistant_early_exit=exit_layer`, or with a draft model.

    `static_cache` asks for transformers' fastest autoregressive path: a static cache, which transformers
    compiles on CUDA (its compile and capture happen in the uncounted warm-up generations)."""
    config = copy.deepcopy(target.generation_config)
    if static_cache:
        config.cache_implementation = "static"
    config.max_new_tokens, config.min_new_tokens = max_new_tokens, None
    config.do_sample = sampler.sample
    config.temperature, config.top_p, config.top_k = sampler.temperature, sampler.top_p, None
    config.eos_token_id = list(eos_ids) or None
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else (list(eos_ids) or [0])[0]
    assistant = target if exit_layer is not None else draft
    saved_assistant_config = None
    if assistant is not None:
        # transformers reads the draft length from the assistant's own generation_config, not from
        # generate() keywords; a constant schedule keeps K fixed as the sweep asked.
        saved_assistant_config = assistant.generation_config
        assistant_config = copy.deepcopy(saved_assistant_config)
        assistant_config.num_assistant_tokens = num_speculations
        assistant_config.num_assistant_tokens_schedule = "constant"
        assistant_config.assistant_confidence_threshold = 0.0
        assistant.generation_config = assistant_config
        config.num_assistant_tokens = num_speculations
        config.num_assistant_tokens_schedule = "constant"
        config.assistant_confidence_threshold = 0.0
    if exit_layer is not None:
        config.assistant_early_exit = exit_layer
    extra = {"assistant_model": draft} if draft is not None else {}

    passes: list[tuple[int, int]] = []

    def count_pass(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        position_ids = kwargs.get("position_ids")
        start = int(position_ids[0, 0]) if position_ids is not None else 0
        passes.append((start, hidden.shape[1]))

    hook = target.model.layers[target.config.num_hidden_layers - 1].register_forward_pre_hook(
        count_pass, with_kwargs=True)
    input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    torch.manual_seed(seed)
    try:
        synchronize(device)
        began = time.perf_counter()
        clock = _FirstTokenClock(device, began)
        with torch.inference_mode():
            output = target.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                     generation_config=config, streamer=clock, **extra)
        synchronize(device)
        elapsed = time.perf_counter() - began
    finally:
        hook.remove()
        if saved_assistant_config is not None:
            assistant.generation_config = saved_assistant_config
    new = output[0, len(prompt):].tolist()
    record = Generation(prompt_tokens=len(prompt), time_s=elapsed, prefill_s=clock.first_token_s)
    eos = set(eos_ids)
    for token in new:
        if token in eos:
            record.stop_reason = "eos"
            break
        record.tokens.append(token)
    record.steps = _steps_from_passes(passes, len(prompt), len(prompt) + len(new))
    return record
