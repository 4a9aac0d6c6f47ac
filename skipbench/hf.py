"""The `hf` backend: transformers' own `generate()`, filling the same record as the native engine.

`generate()` reports no draft statistics, so skipbench watches it run: forward hooks on the first and
last decoder layer and on the LM head of each model see every pass (a draft of `assistant_early_exit`
stops before the last layer), and the positions each pass covers give the drafted and accepted counts
of each step and the passes' costs exactly. The hooks keep the position tensors as they are and read
them once after `generate()` returns, so counting adds no host sync to the rows it is compared against.

The same emission rule as the native loop (`Generation.emit`) cuts the output at EOS or a stop
sequence, and a stopping criterion with the native stop rule ends `generate()` at the same step, so
both backends decode the same workload. A streamer times each new token as the native loop does (one time per
step autoregressively, one per round, a burst, in assisted generation), so TTFT, TPOT and ITL mean the same.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.utils import is_sklearn_available

from skipbench.decoding import policy as policies
from skipbench.decoding.layers import SUPPORTED_MODEL_TYPES, EngineError
from skipbench.decoding.loop import synchronize
from skipbench.decoding.record import Generation, Pass, Step
from skipbench.decoding.sampling import Sampler


class _TokenClock(BaseStreamer):
    """Each new token's time since `began`, as the native loop records it (`Generation.token_times`).

    generate() streams the prompt first (skipped), then each step's new tokens: one token a step when decoding
    autoregressively, a round's kept drafts and its own token at once in assisted generation (a burst: one time
    for all of them). The device is synchronised first, so a time is when the token was known on the host."""

    def __init__(self, device: torch.device, began: float):
        self.device, self.began, self.calls, self.times = device, began, 0, []

    def put(self, value) -> None:
        self.calls += 1
        if self.calls > 1:
            synchronize(self.device)
            self.times += [time.perf_counter() - self.began] * int(value.numel())

    def end(self) -> None:
        pass


class StopRule(StoppingCriteria):
    """The native loop's stop rule as a transformers stopping criterion, judged per row on the tokens after the
    first `width` (the prompt; transformers then pads a finished row until the batch ends)."""

    def __init__(self, width: int, rule: Callable[[list[int]], bool]):
        self.width, self.rule = width, rule

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = [self.rule(row) for row in input_ids[:, self.width :].tolist()]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The model's list of decoder layers, wherever its architecture keeps it (`model.layers`, `h`, ...)."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise EngineError(f"cannot find the {count} decoder layers of {type(model).__name__}")


def check_early_exit(model: PreTrainedModel) -> None:
    """transformers drafts with `assistant_early_exit` by lowering config.num_hidden_layers for the draft;
    only a decoder whose forward loops over `layers[: config.num_hidden_layers]` stops there."""
    body = getattr(model, model.base_model_prefix, None)
    try:
        source = inspect.getsource(type(body).forward) if body is not None else ""
    except (OSError, TypeError):
        source = ""
    if "[: self.config.num_hidden_layers]" not in source:
        architecture = (model.config.architectures or [type(model).__name__])[0]
        instead = ("use --backend native" if model.config.model_type in SUPPORTED_MODEL_TYPES else
                   f"self_speculative needs a {' or '.join(SUPPORTED_MODEL_TYPES)} model (the native engine "
                   f"cannot drive {model.config.model_type!r} either); autoregressive and speculative run on it")
        raise EngineError(f"{architecture} does not stop at config.num_hidden_layers, so transformers' "
                          f"assistant_early_exit cannot draft with it: {instead}")


def check_fixed_threshold(draft_policy: str) -> None:
    """transformers adapts a draft model's confidence threshold itself when scikit-learn is importable (an ROC
    fit after each round); the cell names a fixed one, so refuse rather than measure another policy."""
    if policies.parse(draft_policy)[0].name == "confidence" and is_sklearn_available():
        raise EngineError("scikit-learn is installed, so transformers re-tunes assistant_confidence_threshold after "
                          "every round of a draft model: confidence:T would not stay T; uninstall scikit-learn "
                          "or use --backend native")


class _PassWatcher:
    """Forward hooks that log (model, event, positions, first position) for every pass, without a sync."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, int, torch.Tensor | None]] = []
        self.hooks = []

    def watch(self, model: PreTrainedModel, name: str) -> None:
        layers = decoder_layers(model)

        def first_layer(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            positions = kwargs.get("position_ids")
            if positions is None:
                positions = kwargs.get("cache_position")
            start = positions.reshape(-1)[:1].clone() if positions is not None else None
            self.events.append((name, "first", hidden.shape[1], start))

        def last_layer(module, args, kwargs):
            self.events.append((name, "last", 0, None))

        def head(module, args):
            self.events.append((name, "head", args[0].shape[1], None))

        self.hooks.append(layers[0].register_forward_pre_hook(first_layer, with_kwargs=True))
        self.hooks.append(layers[-1].register_forward_pre_hook(last_layer, with_kwargs=True))
        self.hooks.append(model.get_output_embeddings().register_forward_pre_hook(head))

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def passes(self, layer_counts: dict[str, int], exit_layer: int | None) -> list[Pass]:
        """Events -> passes. A target pass that never reached its last layer is an early-exit draft."""
        starts = [start for _, event, _, start in self.events if event == "first"]
        first = torch.cat(starts).tolist() if starts and all(s is not None for s in starts) else [0] * len(starts)
        passes: list[Pass] = []
        open_pass: dict[str, Pass] = {}
        index = 0
        for model, event, count, _ in self.events:
            if event == "first":
                open_pass[model] = Pass("draft" if model == "draft" else "verify", model, 0, layer_counts[model],
                                        count, first[index])
                index += 1
                if model == "target" and exit_layer is not None:
                    open_pass[model].phase, open_pass[model].end = "draft", exit_layer  # until "last" is seen
                passes.append(open_pass[model])
            elif event == "last" and model == "target" and model in open_pass:
                open_pass[model].phase, open_pass[model].end = "verify", layer_counts[model]
            elif event == "head" and model in open_pass:
                open_pass.pop(model).head_positions = count
        return passes


def _steps(passes: list[Pass], prompt_tokens: int, total_tokens: int) -> list[tuple[Step, int]]:
    """Verify passes -> (step, tokens committed after it). Pass 0 also holds the prompt (context 0).

    Before verify pass j > 0 the committed sequence is one token longer than the cache (the last step's
    own token is fed next), so pass j drafted (start + count) - (start + 1) tokens and committed up to one
    less than where the next pass starts, plus that pending token.
    """
    verify = [p for p in passes if p.phase == "verify"]
    steps = []
    for index, entry in enumerate(verify):
        before = prompt_tokens if index == 0 else entry.context + 1
        after = verify[index + 1].context + 1 if index + 1 < len(verify) else total_tokens
        drafted = entry.context + entry.positions - before
        steps.append((Step(context=entry.context, drafted=drafted, accepted=after - before - 1), after))
    return steps


def configure(target: PreTrainedModel, assistant: PreTrainedModel | None, *, max_new_tokens: int,
               sampler: Sampler, eos_ids: Sequence[int], exit_layer: int | None, num_speculations: int,
               static_cache: bool, draft_policy: str = policies.STATIC):
    """generate()'s configuration; transformers reads K from the assistant's own generation_config.

    Draft policies map to transformers' own options: `confidence:T` -> assistant_confidence_threshold=T,
    `heuristic` -> num_assistant_tokens_schedule="heuristic" (K its start). With scikit-learn installed,
    transformers re-tunes the confidence threshold from an ROC curve after every round, but only for a separate
    draft model (type(generator) is AssistedCandidateGenerator), not for assistant_early_exit; skipbench refuses
    that case (`check_fixed_threshold`) rather than measure a threshold other than the cell's."""
    config = copy.deepcopy(target.generation_config)
    if static_cache:
        config.cache_implementation = "static"
    config.max_new_tokens, config.min_new_tokens = max_new_tokens, None
    config.do_sample = sampler.sample
    config.temperature, config.top_p, config.top_k = sampler.temperature, sampler.top_p, None
    config.eos_token_id = list(eos_ids) or None
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else (list(eos_ids) or [0])[0]
    assistant_config = None
    if assistant is not None:
        # Static: a constant schedule keeps K fixed as the sweep asked; no confidence threshold cuts drafts short.
        kind, value = policies.parse(draft_policy)
        assistant_config = copy.deepcopy(assistant.generation_config)
        for options in (config, assistant_config):
            options.num_assistant_tokens = num_speculations
            options.num_assistant_tokens_schedule = "heuristic" if kind.name == "heuristic" else "constant"
            options.assistant_confidence_threshold = value if kind.name == "confidence" else 0.0
    if exit_layer is not None:
        config.assistant_early_exit = exit_layer
    return config, assistant_config


def generate_hf(target: PreTrainedModel, prompt: list[int], *, max_new_tokens: int, sampler: Sampler,
                eos_ids: Sequence[int], device: torch.device, exit_layer: int | None = None,
                draft: PreTrainedModel | None = None, num_speculations: int = 0, seed: int = 0,
                static_cache: bool = False, stop: Callable[[list[int]], bool] | None = None,
                draft_policy: str = policies.STATIC) -> Generation:
    """Run `generate()` autoregressively, with `assistant_early_exit=exit_layer`, or with a draft model.

    `static_cache` asks for transformers' fastest autoregressive path: a static cache, which transformers
    compiles on CUDA (its compile and capture happen in the uncounted warm-up generations). That path is not
    watched: hooks inside a compiled forward would make it recompile at every step. Its passes are known
    anyway: the prompt, then one position per new token, every query scored against the whole cache."""
    assistant = target if exit_layer is not None else draft
    config, assistant_config = configure(target, assistant, max_new_tokens=max_new_tokens, sampler=sampler,
                                          eos_ids=eos_ids, exit_layer=exit_layer,
                                          num_speculations=num_speculations, static_cache=static_cache,
                                          draft_policy=draft_policy)
    if draft is not None:
        check_fixed_threshold(draft_policy)
    watcher = _PassWatcher()
    if not static_cache:
        watcher.watch(target, "target")
    if draft is not None:
        watcher.watch(draft, "draft")
    saved_assistant_config = assistant.generation_config if assistant is not None else None
    input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    extra = {"assistant_model": draft} if draft is not None else {}
    if stop is not None:
        extra["stopping_criteria"] = StoppingCriteriaList([StopRule(len(prompt), stop)])
    torch.manual_seed(seed)
    try:
        if assistant is not None:
            assistant.generation_config = assistant_config
        synchronize(device)
        began = time.perf_counter()
        clock = _TokenClock(device, began)
        with torch.inference_mode():
            output = target.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                     generation_config=config, streamer=clock, **extra)
        synchronize(device)
        elapsed = time.perf_counter() - began
    finally:
        watcher.remove()
        if assistant is not None:
            assistant.generation_config = saved_assistant_config
    layer_counts = {"target": target.config.num_hidden_layers}
    if draft is not None:
        layer_counts["draft"] = draft.config.num_hidden_layers
    sequence = output[0].tolist()
    if static_cache:
        passes = _autoregressive_passes(len(prompt), len(sequence), layer_counts["target"],
                                        len(prompt) + max_new_tokens)
    else:
        passes = watcher.passes(layer_counts, exit_layer)
    record = Generation(prompt_tokens=len(prompt), time_s=elapsed, prefill_s=(clock.times or [0.0])[0],
                        passes=passes)
    _replay(record, sequence, _steps(passes, len(prompt), len(sequence)), set(eos_ids), stop)
    record.token_times = clock.times[: record.new_tokens]  # the emitted tokens lead the streamed ones (EOS cut)
    return record


def _autoregressive_passes(prompt_tokens: int, total_tokens: int, layers: int, capacity: int) -> list[Pass]:
    """generate()'s passes without a draft: the prompt (with the head on its last position), then each new
    token but the last fed once; a static cache of `capacity` positions is attended whole."""
    starts = [0, *range(prompt_tokens, total_tokens - 1)]
    return [Pass("verify", "target", 0, layers, prompt_tokens if start == 0 else 1, start, 1, window=capacity,
                 static=True) for start in starts]


def _drafter_restarts(passes: list[Pass]) -> dict[tuple[str, int], int]:
    """(drafter, step) -> where that drafter's cache stood when it next drafted after the step: the context of
    its first draft pass in a later step.

    transformers rolls the drafter's cache back before drafting, and how far has changed between releases
    (5.24 kept two positions fewer than the sequence and fed the second-last token again; 5.25 keeps one
    fewer), so the hooks' record of where drafting resumed, not a model of the drafter, says which earlier
    draft work was kept."""
    firsts: dict[tuple[str, int], int] = {}
    for entry in passes:
        if entry.phase == "draft":
            firsts.setdefault((entry.model, entry.step), entry.context)
    restarts: dict[tuple[str, int], int] = {}
    upcoming: dict[str, int] = {}
    for step in range(max((entry.step for entry in passes), default=-1), -2, -1):
        restarts.update({(model, step): context for model, context in upcoming.items()})
        upcoming.update({model: context for (model, at), context in firsts.items() if at == step})
    return restarts


def _replay(record: Generation, sequence: list[int], steps: list[tuple[Step, int]], eos: set[int],
            stop: Callable[[list[int]], bool] | None) -> None:
    """Emit each step's committed tokens through the native rule, and judge each pass's kept share."""
    step_of_pass = 0
    for entry in record.passes:
        entry.step = step_of_pass
        if entry.phase == "verify":
            step_of_pass += 1
    restarts = _drafter_restarts(record.passes)
    before = record.prompt_tokens
    for index, (step, after) in enumerate(steps):
        for entry in record.passes:
            if entry.step == index:
                entry.settle(after - 1)  # the cache holds all committed tokens but the step's own last one
                resumed = restarts.get((entry.model, index))
                if entry.phase == "draft" and resumed is not None:
                    # Work on positions the drafter computes again when it next drafts was not kept.
                    entry.kept_positions = min(entry.kept_positions, max(0, resumed - entry.context))
                    entry.kept_window = entry.context + entry.kept_positions
        record.steps.append(step)
        if record.emit(sequence[before:after], step.accepted, eos, stop):
            break
        before = after
