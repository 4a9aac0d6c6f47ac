"""Quality of one completion: ROUGE (cnn_dm, jsonl), exact match of the parse (topv2), and pass@1 of the
HumanEval tests run in the sandbox (only when the user asked for code execution)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from skipbench.tasks import sandbox
from skipbench.tasks.datasets import Example, TaskData, TaskError


def truncate_completion(text: str, stop_sequences: Sequence[str]) -> str:
    """Cut ``text`` at the earliest stop sequence (the stop itself is dropped).

    A stop sequence only counts once the completion has produced some non-whitespace text: models
    often open with a newline after "Summary:", and cutting there would leave an empty answer. A
    generation loop can use ``truncate_completion(text, stops) != text`` as its "stop now" test.
    """
    lead = len(text) - len(text.lstrip())
    cut = len(text)
    for stop in stop_sequences:
        if not stop:
            continue
        # The match must end past the leading whitespace, i.e. start at lead - len(stop) + 1 or later.
        at = text.find(stop, max(0, lead - len(stop) + 1))
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def score(task: TaskData, example: Example, completion: str, *, execute_code: bool = False,
          allow_uncontained: bool = False, timeout_s: float = 10.0) -> dict[str, float]:
    """Quality of one completion (already cut with truncate_completion; this does not cut again)."""
    if task.name in ("cnn_dm", "jsonl"):
        if not example.reference:
            return {}
        scores = _rouge().score(example.reference, completion)
        return {key: scores[key].fmeasure for key in ("rouge1", "rouge2", "rougeL")}
    if task.name == "spec_bench":
        return {}  # Spec-Bench measures speed; its answers have no reference to score against
    if task.name == "topv2":
        return {"exact_match": float(_normalise_parse(completion) == _normalise_parse(example.reference or ""))}
    if task.name == "humaneval":
        if not execute_code:
            return {}  # running model-written code is opt-in
        extra = example.extra
        program = extra.get("problem_prompt", example.prompt) + completion + "\n\n" + extra["test"]
        try:
            outcome = sandbox.run_check(program, f"check({extra['entry_point']})",
                                        limits=sandbox.Limits(wall_s=timeout_s), allow_uncontained=allow_uncontained)
        except sandbox.SandboxUnavailable as error:
            raise TaskError(str(error)) from None
        return {"pass@1": 1.0 if outcome.passed else 0.0}
    raise TaskError(f"no quality metric for task {task.name!r}")


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def _normalise_parse(parse: str) -> str:
    # Generation adds a leading space (the prompt ends without one) and may end in a newline, and
    # tokenisers can emit double spaces; none of that changes the parse. Case, brackets and token
    # spacing are kept: "[SL:X a ]" and "[SL:X a]" are different token sequences in TOPv2.
    return " ".join(parse.split())
