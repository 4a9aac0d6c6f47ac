"""The Spec-Bench task (hemingkx/Spec-Bench): 480 questions in 13 categories, read from
``DIR/spec_bench/question.jsonl`` (fields ``question_id``, ``category``, ``turns``) or from GitHub.

Prompts. A question's turns are rendered as a plain chat transcript, the same for every model:

    USER: <turn 1>
    ASSISTANT:

``spec_bench`` decodes the first turn of each question (one prompt per question, id = question_id).
``spec_bench:multi_turn`` also decodes the second turn of the questions that have one, as Spec-Bench does:
the model's own answer to turn 1 is fed back,

    USER: <turn 1>
    ASSISTANT: <the model's answer to turn 1>
    USER: <turn 2>
    ASSISTANT:

skipbench decodes each prompt with every cell from the same token ids, so the answer to turn 1 must be
known when the prompts are built: it is generated once, greedily, by the target model (``prompts.build_prompts``
takes the function that does it) and the second turn becomes a prompt of its own (id ``<question_id>/2``).
Every cell is then timed on turn 2 from the same conversation; Spec-Bench feeds each method its own answer,
which is the same text for every lossless greedy method. The export joins a question's turns again into
one answer line (``turns``, ``new_tokens``, ``wall_time`` with one entry per turn).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request

REPO = "hemingkx/Spec-Bench"
URL = "https://raw.githubusercontent.com/hemingkx/Spec-Bench/main/data/spec_bench/question.jsonl"
SPLIT = "question"  # the file name Spec-Bench uses; there is no train/test split
MULTI_TURN = "multi_turn"
# Spec-Bench's own grouping of its categories (its speed report prints these six plus "overall").
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


class Unreachable(Exception):
    """GitHub could not be read (offline, blocked, rate limited)."""


def download(timeout: float = 10.0) -> tuple[list[dict], str]:
    """The question file from GitHub and its sha256 (the revision: GitHub raw files carry no commit)."""
    if any(os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE")
           for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "SKIPBENCH_OFFLINE")):
        raise Unreachable("offline mode")
    try:
        with urllib.request.urlopen(URL, timeout=timeout) as response:  # noqa: S310 - a fixed https URL
            data = response.read()
    except Exception as exc:  # any failure means "not reachable"
        raise Unreachable(f"{type(exc).__name__}: {str(exc)[:120]}") from None
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    return rows, hashlib.sha256(data).hexdigest()


def user_turn(text: str) -> str:
    return f"USER: {text.strip()}\nASSISTANT:"


def conversation(turns: list[str], answers: list[str]) -> str:
    """The transcript up to the last turn: every earlier turn followed by its answer."""
    parts = [f"{user_turn(turn)} {answer.strip()}\n" for turn, answer in zip(turns, answers, strict=False)]
    return "".join(parts) + user_turn(turns[len(answers)])


def check_row(row: dict, index: int, source: str) -> tuple[int | str, str, list[str]]:
    """(question_id, category, turns) of one question, or ValueError naming what is wrong."""
    missing = [name for name in ("question_id", "category", "turns") if row.get(name) is None]
    if missing:
        raise ValueError(f"row {index} of {source} has no {missing[0]!r} field")
    turns = row["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(turn, str) for turn in turns):
        raise ValueError(f"row {index} of {source}: 'turns' must be a non-empty list of strings")
    return row["question_id"], str(row["category"]), list(turns)


def examples_of(row: dict, index: int, source: str, multi_turn: bool) -> list[tuple[str, str, dict]]:
    """(id, prompt, extra) of each prompt a question gives: its first turn, and with ``multi_turn`` its
    later turns, whose prompt is built once the earlier answers exist (``extra["previous"]`` names them)."""
    question_id, category, turns = check_row(row, index, source)
    meta = {"question_id": question_id, "category": category}
    out = [(str(question_id), user_turn(turns[0]), {"spec_bench": meta | {"turn": 1}})]
    if multi_turn:
        for turn in range(2, len(turns) + 1):
            previous = [str(question_id)] + [f"{question_id}/{t}" for t in range(2, turn)]
            out.append((f"{question_id}/{turn}", "", {"spec_bench": meta | {"turn": turn}, "turns": turns,
                                                      "previous": previous}))
    return out
