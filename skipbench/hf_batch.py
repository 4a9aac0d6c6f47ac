"""transformers' generate() on a batch of prompts: autoregressive only (left padding, the native stop rule per row).

transformers' assisted generation (a draft model or assistant_early_exit) refuses batches larger than one, so
those cells are recorded as unsupported (`methods`), never run. Here every row's tokens are cut by the same
rule as the native engine's (`Generation.emit`: the first EOS, or the token after which the stop rule fires),
and its passes are what generate() runs for a left-padded batch: the padded prompt, then one position per
step for every row, a row that finished being fed padding until the batch ends (recorded as wasted).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from skipbench.decoding.loop import synchronize
from skipbench.decoding.record import Generation, Pass, Step
from skipbench.decoding.sampling import Sampler
from skipbench.hf import StopRule, configure


class _StepClock(BaseStreamer):
    """generate() streams the prompt, then each step's new tokens (all rows at once): one time per step."""

    def __init__(self, device: torch.device, began: float):
        self.device, self.began, self.times, self.calls = device, began, [], 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls > 1:
            synchronize(self.device)
            self.times.append(time.perf_counter() - self.began)

    def end(self) -> None:
        pass


def generate_hf_batch(target: PreTrainedModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                      sampler: Sampler, eos_ids: Sequence[int], device: torch.device, seed: int = 0,
                      static_cache: bool = False, stop: Callable[[list[int]], bool] | None = None,
                      ) -> tuple[list[Generation], float]:
    """One left-padded generate() call; returns one record per row and the batch's wall time."""
    config, _ = configure(target, None, max_new_tokens=max_new_tokens, sampler=sampler, eos_ids=eos_ids,
                           exit_layer=None, num_speculations=0, static_cache=static_cache)
    width = max(len(prompt) for prompt in prompts)
    pad = config.pad_token_id if isinstance(config.pad_token_id, int) else 0
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    extra = {"stopping_criteria": StoppingCriteriaList([StopRule(width, stop)])} if stop is not None else {}
    torch.manual_seed(seed)
    synchronize(device)
    began = time.perf_counter()
    clock = _StepClock(device, began)
    with torch.inference_mode():
        output = target.generate(input_ids, attention_mask=mask, generation_config=config, streamer=clock, **extra)
    synchronize(device)
    wall = time.perf_counter() - began
    layers, rows = target.config.num_hidden_layers, len(prompts)
    generated = output[:, width:].tolist()
    steps = len(generated[0])
    capacity = width + max_new_tokens if static_cache else 0
    records = []
    for prompt, sequence in zip(prompts, generated, strict=True):
        record = Generation(prompt_tokens=len(prompt))
        record.passes = [Pass("prefill", "target", 0, layers, width, 0, 1, kept_positions=len(prompt),
                              kept_head_positions=1, window=capacity, static=static_cache, batch=rows)]
        for index, token in enumerate(sequence):
            record.steps.append(Step(width - 1 + index, 0, 0))
            if index:  # step 0's token came from the prefill pass's head
                record.passes.append(Pass("verify", "target", 0, layers, 1, width + index - 1, 1, step=index,
                                          window=capacity, static=static_cache, batch=rows))
            before = record.new_tokens
            ended = record.emit([token], 0, set(eos_ids), stop)
            at = clock.times[index] if index < len(clock.times) else wall
            record.token_times += [at] * (record.new_tokens - before)
            if ended:
                break
        used = len(record.steps)
        for entry in record.passes[1:]:  # steps after the row ended fed padding: wasted
            kept = int(entry.step < used)
            entry.kept_positions, entry.kept_head_positions = kept, kept
        for index in range(used, steps):
            if index:
                record.passes.append(Pass("verify", "target", 0, layers, 1, width + index - 1, 1, step=index,
                                          window=capacity, static=static_cache, batch=rows))
        record.prefill_s = record.token_times[0] if record.token_times else (clock.times or [wall])[0]
        record.time_s = record.token_times[-1] if record.token_times else record.prefill_s
        records.append(record)
    return records, wall
