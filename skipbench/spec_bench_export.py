"""A run in Spec-Bench's terms: its answer files, its speedup definition, and the per-category table.

Answer files. Spec-Bench's inference scripts write one JSON line per question::

    {"question_id", "category", "answer_id", "model_id",
     "choices": [{"index": 0, "turns": [text per turn], "decoding_steps": [...], "new_tokens": [...],
                  "wall_time": [...], "accept_lengths": [tokens per step, all turns]}], "tstamp"}

`write_answer_files` writes that for every cell and every round of a run, from the stored rows:
``OUT/run_<round+1>/<model_id>.jsonl`` (``run_<r>_g<group>`` for the rounds of group > 0), so that Spec-Bench's
``evaluation/speed.py --file-path OUT/run_1/<cell>.jsonl --base-path OUT/run_1/<baseline>.jsonl`` reads them.
Per turn: ``turns`` the decoded text (EOS excluded, stop sequence included, as counted), ``new_tokens``
skipbench's new tokens, ``wall_time`` the generation's time_s (prefill included), ``decoding_steps`` its verify
steps (full-model passes after prefill: an autoregressive turn has one per token, as in Spec-Bench's
baseline), ``accept_lengths`` per step the tokens it committed (accepted drafts + 1).

Speedups. Spec-Bench's is the mean over questions of the cell's tokens/s, over the mean over questions of
the baseline's tokens/s, where the baseline's tokens are recounted from its text (tokenised again, minus one
for the BOS). skipbench's is a ratio of sums, paired by prompt and round (`summary`). `answers_speedup` and
`rows_speedup` compute Spec-Bench's definition from the answer files and from the rows.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from skipbench.spec import Cell, baseline_of
from skipbench.store import RunStore, write_atomic
from skipbench.summary import complete_cells, summarize
from skipbench.tables import provenance_notes, task_table, write_table

ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"  # shortuuid's, 22 characters per id


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def answer_id(*parts: object) -> str:
    """A 22-character id in shortuuid's alphabet, derived from what the answer is (stable across exports)."""
    number = int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest(), "big")
    chars = []
    for _ in range(22):
        number, digit = divmod(number, len(ALPHABET))
        chars.append(ALPHABET[digit])
    return "".join(chars)


def prompt_meta(manifest: dict, frame: pd.DataFrame) -> dict[int, dict]:
    """prompt index -> {question_id, category, turn}; a run of another task: the prompt id, the task, turn 1."""
    prompts = manifest.get("prompts") or {}
    stored = prompts.get("spec_bench")
    if stored:
        return {index: meta for index, meta in enumerate(stored)}
    category = str(prompts.get("dataset") or "prompts")
    ids = frame.drop_duplicates("prompt_index").set_index("prompt_index")["prompt_id"]
    return {int(index): {"question_id": int(pid) if str(pid).isdigit() else str(pid), "category": category,
                         "turn": 1} for index, pid in ids.items()}


def model_id(manifest: dict, label: str) -> str:
    """Spec-Bench's naming, <model>-<method>-<dtype>-temp-<T>."""
    setup = manifest.get("setup") or {}
    model = slug(str(setup.get("model", "model")).rstrip("/").split("/")[-1])
    dtype = (manifest.get("provenance") or {}).get("dtype", "auto")
    temperature = float(setup.get("temperature") or 0.0) if setup.get("sample") else 0.0
    return f"{model}-{slug(label)}-{dtype}-temp-{temperature}"


def answers(rows: pd.DataFrame, meta: dict[int, dict], mid: str, stamp: float) -> list[dict]:
    """One cell's rows of one round -> Spec-Bench answer lines, one per question, turns in order."""
    questions: dict[object, list] = {}
    for row in rows.itertuples():
        info = meta[int(row.prompt_index)]
        questions.setdefault(info["question_id"], []).append((int(info["turn"]), info["category"], row))
    lines = []
    for question_id, turns in questions.items():
        turns.sort(key=lambda item: item[0])
        choice = {"index": 0, "turns": [], "decoding_steps": [], "new_tokens": [], "wall_time": [],
                  "accept_lengths": []}
        for _, _, row in turns:
            steps = [int(a) + 1 for a in row.step_accepted]
            choice["turns"].append(str(row.text))
            choice["decoding_steps"].append(int(row.verify_steps))
            choice["new_tokens"].append(int(row.new_tokens))
            choice["wall_time"].append(float(row.time_s))
            choice["accept_lengths"] += steps
        round_key = (int(turns[0][2].group), int(turns[0][2].round))
        lines.append({"question_id": question_id, "category": turns[0][1],
                      "answer_id": answer_id(mid, round_key, question_id), "model_id": mid,
                      "choices": [choice], "tstamp": stamp})
    return lines


def created(manifest: dict) -> float:
    text = (manifest.get("provenance") or {}).get("created")
    try:
        return time.mktime(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")) if text else 0.0
    except ValueError:
        return 0.0


def answer_sets(run_dir: Path | str) -> dict[tuple[int, int], dict[str, list[dict]]]:
    """(group, round) -> model_id -> that cell's answer lines in that round."""
    store = RunStore(run_dir)
    manifest = store.read_manifest()
    frame = complete_cells(store.read_cells(), (manifest.get("prompts") or {}).get("prompts"))
    out: dict[tuple[int, int], dict[str, list[dict]]] = {}
    if frame.empty:
        return out
    meta, stamp = prompt_meta(manifest, frame), created(manifest)
    for (_key, group, round_index), rows in frame.groupby(["cell_key", "group", "round"], sort=False):
        mid = model_id(manifest, str(rows["cell_label"].iloc[0]))
        out.setdefault((int(group), int(round_index)), {})[mid] = answers(rows.sort_values("prompt_index"), meta,
                                                                         mid, stamp)
    return out


def write_answer_files(run_dir: Path | str, out_dir: Path | str) -> list[Path]:
    """Every cell's answers, one file per cell and round (see the module's docstring)."""
    written = []
    for (group, round_index), cells in sorted(answer_sets(run_dir).items()):
        folder = Path(out_dir) / (f"run_{round_index + 1}" + (f"_g{group}" if group else ""))
        for mid, lines in cells.items():
            path = folder / f"{mid}.jsonl"
            write_atomic(path, "".join(json.dumps(line) + "\n" for line in lines).encode())
            written.append(path)
    return written


# --------------------------------------------------------------------------- Spec-Bench's speedup


def answers_speedup(lines: list[dict], base_lines: list[dict],
                    count: Callable[[str], int] | None = None) -> tuple[float, float, float]:
    """(tokens/s, baseline tokens/s, speedup) as Spec-Bench defines them: the mean over questions of each
    question's tokens over its time. ``count(text)``: the baseline's tokens recounted from its text (Spec-Bench
    tokenises again and subtracts one); None keeps the stored new_tokens."""
    speeds = [sum(c["new_tokens"]) / sum(c["wall_time"]) for c in (line["choices"][0] for line in lines)]
    base = []
    for choice in (line["choices"][0] for line in base_lines):
        tokens = sum(count(text) for text in choice["turns"]) if count else sum(choice["new_tokens"])
        base.append(tokens / sum(choice["wall_time"]))
    mean, base_mean = float(np.mean(speeds)), float(np.mean(base))
    return mean, base_mean, mean / base_mean


def rows_speedup(frame: pd.DataFrame, cell_key: str, base_key: str, round_index: int, meta: dict[int, dict],
                 group: int = 0) -> tuple[float, float, float]:
    """The same definition computed straight from a run's rows (one round), for checking an export."""

    def per_question(key: str) -> list[float]:
        rows = frame[(frame["cell_key"] == key) & (frame["round"] == round_index) & (frame["group"] == group)]
        question = rows["prompt_index"].map(lambda index: meta[int(index)]["question_id"])
        sums = rows.groupby(question, sort=False)[["new_tokens", "time_s"]].sum()
        return list(sums["new_tokens"] / sums["time_s"])

    mean, base_mean = float(np.mean(per_question(cell_key))), float(np.mean(per_question(base_key)))
    return mean, base_mean, mean / base_mean


# --------------------------------------------------------------------------- the per-category table


def category_summaries(run_dir: Path | str) -> dict[str, pd.DataFrame]:
    """category -> the run's summary over that category's prompts only (Spec-Bench's categories, in order of
    first appearance); {} when the run is not a Spec-Bench run."""
    store = RunStore(run_dir)
    manifest = store.read_manifest()
    stored = (manifest.get("prompts") or {}).get("spec_bench")
    if not stored:
        return {}
    frame = complete_cells(store.read_cells(), (manifest.get("prompts") or {}).get("prompts"))
    if frame.empty:
        return {}
    categories = list(dict.fromkeys(meta["category"] for meta in stored))
    out = {}
    for category in categories:
        indices = {index for index, meta in enumerate(stored) if meta["category"] == category}
        out[category] = summarize(frame[frame["prompt_index"].isin(indices)].reset_index(drop=True))
    return out


def write_category_table(run_dir: Path | str) -> list[Path]:
    """tables/categories.{md,tex,csv}: per cell, the speedup (with its interval) in each category, their mean
    and the tokens per step: the shape of the per-task table, over one run's categories."""
    summaries = category_summaries(run_dir)
    if not summaries:
        return []
    manifest = RunStore(run_dir).read_manifest()
    text, numbers = task_table(summaries)
    return write_table(Path(run_dir) / "tables", "categories", text, numbers, provenance_notes(manifest),
                       caption="speedup per Spec-Bench category")


def baseline_key(frame: pd.DataFrame, cell_key: str) -> str | None:
    cells = {key: Cell.from_record(rows.iloc[0]) for key, rows in frame.groupby("cell_key", sort=False)}
    base = baseline_of(cells[cell_key], list(cells.values()))
    return next((key for key, cell in cells.items() if cell == base), None)
