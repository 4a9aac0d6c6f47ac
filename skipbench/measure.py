"""Run one cell over a prompt set: warm up, time each generation, and turn it into a record row."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from skipbench import tasks
from skipbench.decoding.autoregressive import Autoregressive
from skipbench.decoding.hf import generate_hf
from skipbench.decoding.layers import DecoderStack
from skipbench.decoding.loop import Generation, generate, synchronize
from skipbench.decoding.sampling import Sampler
from skipbench.decoding.self_speculative import SelfSpeculative
from skipbench.decoding.speculative import TwoModel
from skipbench.models import LoadedModel
from skipbench.prompts import Prompt, PromptSet
from skipbench.spec import Cell, Setup


def eos_ids(loaded: LoadedModel) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS and the generation config's (maybe a list)."""
    ids = {loaded.tokenizer.eos_token_id}
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


class CellRunner:
    """Decodes prompts with one cell's strategy; one instance per cell, the models loaded once outside."""

    def __init__(self, cell: Cell, setup: Setup, target: LoadedModel, draft: LoadedModel | None,
                 prompt_set: PromptSet):
        self.cell, self.setup, self.target, self.draft = cell, setup, target, draft
        self.prompt_set = prompt_set
        self.device = target.model.device
        self.eos = eos_ids(target)
        if cell.backend == "native":
            stack = DecoderStack(target.model)  # refuses architectures the engine cannot drive
            if cell.strategy == "self_speculative":
                self.strategy = SelfSpeculative(stack, cell.exit_layer)
            elif cell.strategy == "speculative":
                self.strategy = TwoModel(stack, DecoderStack(draft.model))
            else:
                self.strategy = Autoregressive(stack)

    def sampler(self, prompt: Prompt) -> Sampler:
        generator = None
        if self.setup.sample:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(self.setup.seed * 1_000_003 + prompt.index)  # one stream per prompt
        return Sampler(self.setup.sample, self.setup.temperature, self.setup.top_p, generator)

    def stop_rule(self) -> Callable[[list[int]], bool] | None:
        stops = self.prompt_set.stop_sequences
        if not stops:
            return None
        decode = self.target.tokenizer.decode
        # Stop exactly where the completion will be cut, so a leading newline does not end a summary.
        return lambda ids: tasks.truncate_completion(text := decode(ids), stops) != text

    def generate(self, prompt: Prompt) -> Generation:
        kwargs = dict(max_new_tokens=self.prompt_set.max_new_tokens, sampler=self.sampler(prompt),
                      eos_ids=self.eos, device=self.device)
        if self.cell.backend in ("hf", "hf_static"):
            return generate_hf(self.target.model, prompt.token_ids, exit_layer=self.cell.exit_layer,
                               draft=self.draft.model if self.draft else None,
                               num_speculations=self.cell.num_speculations or 0,
                               seed=self.setup.seed * 1_000_003 + prompt.index,
                               static_cache=self.cell.backend == "hf_static", **kwargs)
        return generate(self.strategy, prompt.token_ids, num_speculations=self.cell.num_speculations or 0,
                        stop=self.stop_rule(), **kwargs)

    def warm_up(self) -> None:
        for index in range(self.setup.warmup):
            self.generate(self.prompt_set.prompts[index % len(self.prompt_set.prompts)])

    def row(self, prompt: Prompt, generation: Generation) -> dict:
        text = self.target.tokenizer.decode(generation.tokens, skip_special_tokens=True)
        completion = tasks.truncate_completion(text, self.prompt_set.stop_sequences)
        row = {
            "prompt_index": prompt.index,
            "prompt_id": prompt.id,
            "prompt_tokens": generation.prompt_tokens,
            "new_tokens": generation.new_tokens,
            "time_s": generation.time_s,
            "prefill_s": generation.prefill_s,
            "decode_s": generation.time_s - generation.prefill_s,
            "drafted": generation.drafted,
            "accepted": generation.accepted,
            "verify_steps": generation.verify_steps,
            "step_context": [step.context for step in generation.steps],
            "step_drafted": [step.drafted for step in generation.steps],
            "step_accepted": [step.accepted for step in generation.steps],
            "stop_reason": generation.stop_reason,
            "tokens": generation.tokens,
            "text": text,
            "completion": completion,
        }
        task = self.prompt_set.task
        if task is not None:
            example = tasks.Example(prompt.id, prompt.text, prompt.reference, prompt.extra)
            scores = tasks.score(task, example, completion, execute_code=self.setup.execute_code)
            row |= {f"quality_{name}": value for name, value in scores.items()}
        return row


def measure_roofline(device: torch.device, dtype: torch.dtype, size_mb: int = 1024, repeats: int = 10) -> dict:
    """The device's copy bandwidth (bytes read + written per second) and matmul rate, measured here.

    Bandwidth / weight bytes is the autoregressive roofline: a batch-1 decode reads every weight once
    per token, so it cannot exceed that many tokens per second.
    """
    def timed(action) -> float:
        action()  # warm-up
        synchronize(device)
        began = time.perf_counter()
        for _ in range(repeats):
            action()
        synchronize(device)
        return (time.perf_counter() - began) / repeats

    source = torch.empty(size_mb * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    copy_s = timed(lambda: target.copy_(source))
    side = 4096 if device.type == "cuda" else 1024
    a = torch.randn(side, side, device=device).to(dtype)
    b = torch.randn(side, side, device=device).to(dtype)
    matmul_s = timed(lambda: a @ b)
    return {"bandwidth_bytes_per_s": 2 * source.numel() * 4 / copy_s,
            "matmul_flops_per_s": 2 * side**3 / matmul_s, "dtype": str(dtype).removeprefix("torch.")}


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def run_cell(cell: Cell, setup: Setup, target: LoadedModel, draft: LoadedModel | None, prompt_set: PromptSet,
             on_prompt: Callable[[dict], None] | None = None) -> list[dict]:
    """Warm up, then decode every prompt once; one row per prompt (peak memory is the cell's)."""
    runner = CellRunner(cell, setup, target, draft, prompt_set)
    runner.warm_up()
    peak_memory_reset(runner.device)
    rows = []
    for prompt in prompt_set.prompts:
        rows.append(runner.row(prompt, runner.generate(prompt)))
        if on_prompt is not None:
            on_prompt(rows[-1])
    peak = peak_memory(runner.device)
    for row in rows:
        row["peak_mem_bytes"] = peak
    return rows
