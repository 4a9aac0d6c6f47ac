"""Prompts, built once per run: the same token ids, in the same order, for every cell."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from skipbench import tasks
from skipbench.spec import Setup
from skipbench.tasks import spec_bench


@dataclass(frozen=True)
class Prompt:
    index: int
    id: str
    text: str
    token_ids: list[int]
    reference: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class PromptSet:
    prompts: list[Prompt]
    task: tasks.TaskData | None  # None for --prompt texts
    max_new_tokens: int
    stop_sequences: tuple[str, ...]
    notes: list[str] = field(default_factory=list)  # what the user should know (e.g. fewer prompts than asked)

    def fingerprint(self) -> str:
        """Hash of the token ids actually decoded: equal hashes mean two runs measured the same prompts."""
        digest = hashlib.sha256()
        for prompt in self.prompts:
            digest.update(f"{prompt.id}:{prompt.token_ids}\n".encode())
        return digest.hexdigest()[:16]

    def describe(self) -> dict:
        info = {"prompts": len(self.prompts), "prompt_set_hash": self.fingerprint(),
                "max_new_tokens": self.max_new_tokens, "stop_sequences": list(self.stop_sequences)}
        if self.task is not None:
            info |= {"dataset": self.task.name, "source": self.task.source, "revision": self.task.revision,
                     "split": self.task.split, "seed": self.task.seed, "n_shot": self.task.n_shot,
                     "text_hash": self.task.prompt_set_hash()}
        if any("spec_bench" in prompt.extra for prompt in self.prompts):  # what the Spec-Bench export needs
            info["spec_bench"] = [prompt.extra.get("spec_bench") for prompt in self.prompts]
        return info


@dataclass
class Examples:
    """A run's prompt texts before tokenising: loaded before any model, so a bad prompt set costs nothing."""

    examples: list[tasks.Example]
    task: tasks.TaskData | None
    max_new_tokens: int
    stop_sequences: tuple[str, ...]
    notes: list[str]


def load_examples(setup: Setup) -> Examples:
    """Load the dataset (or take the --prompt texts) and apply the template; an empty set is refused."""
    notes = []
    if setup.dataset is None:
        texts = [setup.template.replace("{prompt}", text) if setup.template else text for text in setup.prompts]
        examples = [tasks.Example(id=str(i), prompt=text, reference=None, extra={}) for i, text in enumerate(texts)]
        if setup.num_samples is not None:
            if setup.num_samples > len(examples):
                notes.append(f"note: --num-samples {setup.num_samples} but {len(examples)} prompt(s) given: "
                             f"decoding all {len(examples)}")
            examples = examples[: setup.num_samples]
        task, max_new, stops = None, 128, ()
    else:
        task = tasks.load_task(setup.dataset, num_samples=setup.num_samples, seed=setup.seed,
                               n_shot=setup.n_shot, template=setup.template, data_dir=setup.data_dir)
        examples, max_new, stops = task.examples, task.defaults.max_new_tokens, task.defaults.stop_sequences
        if setup.num_samples is not None and setup.num_samples > len(examples):
            notes.append(f"note: --num-samples {setup.num_samples} but {setup.dataset} has {len(examples)} "
                         f"examples: decoding all {len(examples)}")
    return Examples(examples, task, max_new, tuple(stops), notes)


def build_prompts(setup: Setup, tokenizer, max_positions: int | None = None, loaded: Examples | None = None,
                  answer: Callable[[list[int], int, tuple[str, ...]], str] | None = None) -> PromptSet:
    """Tokenise the prompt set (`loaded`, else loaded here).

    A later turn of a multi-turn task (`spec_bench:multi_turn`) continues the model's own answers to the
    earlier turns: `answer(token_ids, max_new_tokens, stop_sequences)` writes them (greedily, once), here.

    A prompt that, with the tokens to generate, would not fit the model's positions is refused: past
    `max_position_embeddings` a model's output means nothing, yet decoding would go on without a sign.
    """
    loaded = loaded or load_examples(setup)
    examples, task, notes = loaded.examples, loaded.task, list(loaded.notes)
    max_new_tokens = setup.max_new_tokens or loaded.max_new_tokens
    stops = tuple(setup.stop_sequences) if setup.stop_sequences is not None else loaded.stop_sequences
    needed = {earlier for example in examples for earlier in example.extra.get("previous", ())}
    if needed and answer is None:
        raise tasks.TaskError(f"{setup.dataset}: later turns continue the model's earlier answers, and no model "
                              "was given to write them")
    answers: dict[str, str] = {}
    prompts = []
    for index, example in enumerate(examples):
        if "previous" in example.extra:
            text = spec_bench.conversation(example.extra["turns"], [answers[p] for p in example.extra["previous"]])
            example = tasks.Example(example.id, text, example.reference, example.extra)
        ids = tasks.limit_prompt_tokens(tokenizer.encode(example.prompt), setup.max_prompt_tokens,
                                        setup.prompt_policy)
        if not ids:
            raise tasks.TaskError(f"prompt {example.id!r} is empty after tokenisation: nothing to decode from")
        if max_positions is not None and len(ids) + max_new_tokens > max_positions:
            raise tasks.TaskError(f"prompt {example.id!r} has {len(ids)} tokens: with {max_new_tokens} new tokens "
                                  f"it passes the model's {max_positions} positions; use --max-prompt-tokens "
                                  f"{max(max_positions - max_new_tokens, 1)} or fewer --max-new-tokens")
        prompts.append(Prompt(index, example.id, example.prompt, ids, example.reference, example.extra))
        if example.id in needed:
            answers[example.id] = answer(ids, max_new_tokens, stops)
    return PromptSet(prompts=prompts, task=task, max_new_tokens=max_new_tokens, stop_sequences=stops, notes=notes)


def greedy_answerer(model, tokenizer) -> Callable[[list[int], int, tuple[str, ...]], str]:
    """The earlier turns' answers of a multi-turn task: transformers' greedy `generate` of the target model,
    cut at the first stop sequence (greedy speculative decoding writes the same text)."""
    def answer(ids: list[int], max_new_tokens: int, stops: tuple[str, ...]) -> str:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return tasks.truncate_completion(tokenizer.decode(out[0, len(ids):].tolist()), stops)

    return answer
