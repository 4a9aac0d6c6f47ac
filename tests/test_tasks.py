"""Tests for skipbench.tasks. Fixture texts under tests/fixtures are invented; no network is used."""

import hashlib
import json
import shutil
import socket
import time
from pathlib import Path

import pytest

from skipbench.tasks import (
    Example,
    TaskData,
    TaskDefaults,
    TaskError,
    available_tasks,
    limit_prompt_tokens,
    load_task,
    score,
    truncate_completion,
)

FIXTURES = Path(__file__).parent / "fixtures"
DATA = FIXTURES / "data"

ASHBY = (
    "Ashby Marsh (Invented Wire) -- Researchers counted a record number of imaginary herons at the marsh "
    "this spring, crediting a wetter winter."
)
ELSEN = (
    "Mount Elsen (Invented Wire) -- Hikers on Mount Elsen will need a free permit from June, "
    "park rangers announced."
)
GENNER = (
    "Genner Vale (Invented Wire) -- A school choir from Genner Vale won the regional contest "
    "with a song about rain."
)
ASHBY_SHOT = (
    f"Article: {ASHBY}\nSummary: Record heron count at Ashby Marsh . Researchers credit a wetter winter .\n"
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Offline Hub settings, no outside SKIPBENCH_DATA_DIR; a name lookup or IP connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("SKIPBENCH_DATA_DIR", raising=False)
    attempts = []
    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("network disabled in tests")
        return real_connect(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror("name lookups disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    yield
    assert not attempts, f"tests tried to reach the network: {attempts}"


# --- prompts --------------------------------------------------------------------------------------


def test_cnn_dm_zero_shot_prompt_reference_and_metadata():
    task = load_task("cnn_dm", data_dir=DATA)
    path = DATA / "cnn_dm" / "test.jsonl"
    assert (task.name, task.split, task.seed, task.n_shot) == ("cnn_dm", "test", 0, 0)
    assert task.source == str(path)
    assert task.revision == hashlib.sha256(path.read_bytes()).hexdigest()
    assert task.defaults == TaskDefaults(128, ("\n",))
    assert len(task.examples) == 4
    first = task.examples[0]
    assert first.id == "b0" + "0" * 38
    assert first.prompt == (
        "Article: Harlow Bay (Invented Wire) -- The ferry between Harlow Bay and its twin island resumed "
        "service after repairs to the pier.\nSummary:"
    )
    assert first.reference == "Harlow Bay ferry service resumes .\nPier repairs are complete ."
    assert first.extra == {}


def test_cnn_dm_two_shot_prompt_bytes():
    task = load_task("cnn_dm", data_dir=DATA, n_shot=2, seed=0)
    shots = (
        ASHBY_SHOT + f"Article: {ELSEN}\nSummary: Free permits needed for Mount Elsen hikers from June . "
        "Rangers made the announcement .\n"
    )
    assert task.examples[1].prompt == shots + f"\nArticle: {GENNER}\nSummary:"
    # The same shots precede every test article; the test split is still read in file order.
    assert all(ex.prompt.startswith(shots + "\nArticle: ") for ex in task.examples)
    assert task.source == f"{DATA / 'cnn_dm' / 'test.jsonl'} + {DATA / 'cnn_dm' / 'train.jsonl'}"
    assert task.revision.count(" + ") == 1


def test_template_receives_the_whole_n_shot_prompt():
    task = load_task("cnn_dm", data_dir=DATA, n_shot=1, seed=0, template="Summarise.\n{prompt}")
    assert task.examples[1].prompt == f"Summarise.\n{ASHBY_SHOT}\nArticle: {GENNER}\nSummary:"
    # Other braces are left alone (no str.format).
    braces = load_task("topv2", data_dir=DATA, template='{"q": "{prompt}"} =>')
    assert braces.examples[4].prompt == '{"q": "play something calm"} =>'


def test_template_without_placeholder_is_refused():
    with pytest.raises(TaskError, match="prompt"):
        load_task("topv2", data_dir=DATA, template="no placeholder")


def test_n_shot_selection_is_seeded():
    a = load_task("cnn_dm", data_dir=DATA, n_shot=2, seed=0)
    b = load_task("cnn_dm", data_dir=DATA, n_shot=2, seed=0)
    c = load_task("cnn_dm", data_dir=DATA, n_shot=2, seed=1)
    assert [e.prompt for e in a.examples] == [e.prompt for e in b.examples]
    assert a.examples[0].prompt != c.examples[0].prompt
    assert "Brindle Falls" in c.examples[0].prompt  # seed 1 draws other train rows
    with pytest.raises(TaskError, match="only 6 rows"):
        load_task("cnn_dm", data_dir=DATA, n_shot=7)
    with pytest.raises(TaskError, match="only defined for cnn_dm"):
        load_task("topv2", data_dir=DATA, n_shot=1)


def test_sample_selection_is_seeded():
    ids = [e.id for e in load_task("topv2", data_dir=DATA, num_samples=3, seed=0).examples]
    assert ids == [e.id for e in load_task("topv2", data_dir=DATA, num_samples=3, seed=0).examples]
    assert ids == ["2", "1", "0"]
    # Smaller samples are prefixes of larger ones with the same seed.
    assert [e.id for e in load_task("topv2", data_dir=DATA, num_samples=2, seed=0).examples] == ids[:2]
    other = [e.id for e in load_task("topv2", data_dir=DATA, num_samples=5, seed=1).examples]
    assert other != [e.id for e in load_task("topv2", data_dir=DATA, num_samples=5, seed=0).examples]
    assert sorted(other) == ["0", "1", "2", "3", "4"]
    assert [e.id for e in load_task("topv2", data_dir=DATA).examples] == ["0", "1", "2", "3", "4"]
    assert len(load_task("topv2", data_dir=DATA, num_samples=50).examples) == 5
    with pytest.raises(TaskError):
        load_task("topv2", data_dir=DATA, num_samples=0)


def test_topv2_tsv():
    task = load_task("topv2", data_dir=DATA)
    assert task.defaults == TaskDefaults(64, ("\n",))
    ex = task.examples[2]
    assert ex.prompt == 'remind me to feed the "office" goldfish at noon'
    assert ex.reference == (
        '[IN:CREATE_REMINDER [SL:PERSON_REMINDED me ] [SL:TODO feed the "office" goldfish ] '
        "[SL:DATE_TIME at noon ] ]"
    )


def test_topv2_per_domain_files(tmp_path):
    (tmp_path / "topv2").mkdir()
    header = "domain\tutterance\tsemantic_parse\n"
    (tmp_path / "topv2" / "weather_test.tsv").write_text(header + "weather\tis it hot\t[IN:GET_WEATHER ]\n")
    (tmp_path / "topv2" / "alarm_test.tsv").write_text(header + "alarm\tstop my alarm\t[IN:SILENCE_ALARM ]\n")
    task = load_task("topv2", data_dir=tmp_path)
    assert [e.prompt for e in task.examples] == ["stop my alarm", "is it hot"]
    assert " + " in task.source


@pytest.mark.parametrize("fmt", ["json", "parquet", "tsv", "jsonl.gz"])
def test_other_local_formats_give_the_same_examples(tmp_path, fmt):
    import pandas

    (tmp_path / "cnn_dm").mkdir()
    rows = pandas.read_json(DATA / "cnn_dm" / "test.jsonl", lines=True, dtype=False)
    target = tmp_path / "cnn_dm" / f"test.{fmt}"
    if fmt == "json":
        target.write_text(json.dumps(rows.to_dict("records")))
    elif fmt == "parquet":
        rows.to_parquet(target)
    elif fmt == "tsv":
        # Highlights hold newlines, which TSV cannot; use a single-line copy for this format.
        rows["highlights"] = rows["highlights"].str.replace("\n", " ")
        rows.to_csv(target, sep="\t", index=False)
    else:
        rows.to_json(target, orient="records", lines=True, compression="gzip")
    local = load_task("cnn_dm", data_dir=tmp_path).examples
    expected = load_task("cnn_dm", data_dir=DATA).examples
    assert [(e.id, e.prompt) for e in local] == [(e.id, e.prompt) for e in expected]


def test_data_dir_from_environment(monkeypatch):
    monkeypatch.setenv("SKIPBENCH_DATA_DIR", str(DATA))
    assert len(load_task("topv2").examples) == 5


def test_humaneval_from_the_packaged_file():
    task = load_task("humaneval")
    assert task.source.endswith("HumanEval.jsonl.gz")
    assert len(task.examples) == 164
    first = task.examples[0]
    assert first.id == "HumanEval/0"
    assert first.prompt.startswith("from typing import List\n\n\ndef has_close_elements(")
    assert first.extra["entry_point"] == "has_close_elements"
    assert "def check(candidate)" in first.extra["test"]
    assert task.defaults == TaskDefaults(256, ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"))


def test_jsonl_fields():
    task = load_task(f"jsonl:{FIXTURES / 'custom.jsonl'}")
    assert (task.name, task.defaults) == ("jsonl", TaskDefaults(128, ()))
    assert [(e.id, e.prompt, e.reference) for e in task.examples] == [
        ("q1", "Say hello.", "hello there"),
        ("1", "No reference here.", None),
    ]
    custom = load_task(
        f"jsonl:{FIXTURES / 'custom_fields.jsonl'}", prompt_field="question", reference_field="answer"
    )
    assert [(e.prompt, e.reference) for e in custom.examples] == [
        ("Name a colour.", "blue"),
        ("Name a fruit.", "a ripe pear"),
    ]
    with pytest.raises(TaskError, match="'question'"):
        load_task(f"jsonl:{FIXTURES / 'custom.jsonl'}", prompt_field="question")
    with pytest.raises(TaskError, match="not found"):
        load_task(f"jsonl:{FIXTURES / 'missing.jsonl'}")


def test_unknown_dataset():
    with pytest.raises(TaskError, match="unknown dataset"):
        load_task("squad")


# --- hashing, truncation, limits ------------------------------------------------------------------


def test_prompt_set_hash_is_stable_and_sensitive():
    task = load_task("topv2", data_dir=DATA)
    again = load_task("topv2", data_dir=DATA)
    assert task.prompt_set_hash() == again.prompt_set_hash()
    assert len(task.prompt_set_hash()) == 64

    def with_examples(examples):
        return TaskData("topv2", "x", "y", "test", 0, 0, examples, task.defaults)

    exs = task.examples
    assert with_examples(exs).prompt_set_hash() == task.prompt_set_hash()  # metadata does not matter
    assert with_examples(exs[::-1]).prompt_set_hash() != task.prompt_set_hash()
    changed = [Example(exs[0].id, exs[0].prompt + " ", exs[0].reference, {}), *exs[1:]]
    assert with_examples(changed).prompt_set_hash() != task.prompt_set_hash()
    renamed = [Example("other", exs[0].prompt, exs[0].reference, {}), *exs[1:]]
    assert with_examples(renamed).prompt_set_hash() != task.prompt_set_hash()


def test_truncate_completion():
    assert truncate_completion(" The ferry runs again.\nArticle: x", ["\n"]) == " The ferry runs again."
    # A newline before any text does not end the summary.
    assert truncate_completion("\n The ferry runs.\n\nMore", ["\n"]) == "\n The ferry runs."
    assert truncate_completion("   \n", ["\n"]) == "   \n"
    stops = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
    body = "    return x + 1\n"
    assert truncate_completion(body + "\n\ndef other():\n    pass\n", stops) == body + "\n"
    assert truncate_completion(body + "\n# tests\nprint(f(1))", stops) == body
    assert truncate_completion("\ndef g():", stops) == ""  # a stop that reaches into text counts
    assert truncate_completion("no stop here", []) == "no stop here"
    assert truncate_completion("a b", ["", "z"]) == "a b"


def test_limit_prompt_tokens():
    ids = list(range(10))
    assert limit_prompt_tokens(ids, None, "left") == ids
    assert limit_prompt_tokens(ids, 10, "refuse") == ids
    assert limit_prompt_tokens(ids, 4, "left") == [6, 7, 8, 9]
    with pytest.raises(TaskError, match="10 tokens"):
        limit_prompt_tokens(ids, 4, "refuse")
    with pytest.raises(TaskError):
        limit_prompt_tokens(ids, 0, "left")
    with pytest.raises(TaskError):
        limit_prompt_tokens(ids, 4, "right")


# --- metrics --------------------------------------------------------------------------------------


def _task(name: str) -> TaskData:
    return TaskData(name, "x", "y", "test", 0, 0, [], TaskDefaults(1, ()))


def test_rouge_on_a_hand_computed_pair():
    # reference: the cat sat on the mat  /  candidate: the cat lay on a mat   (6 tokens each)
    # unigram overlap: the, cat, on, mat = 4 -> P = R = 4/6 -> F1 = 2/3
    # bigram overlap: "the cat" = 1 of 5 each -> F1 = 1/5; LCS "the cat on mat" = 4 -> F_L = 2/3
    ex = Example("0", "p", "the cat sat on the mat", {})
    got = score(_task("cnn_dm"), ex, "the cat lay on a mat")
    assert got == {
        "rouge1": pytest.approx(2 / 3),
        "rouge2": pytest.approx(1 / 5),
        "rougeL": pytest.approx(2 / 3),
    }
    # Stemming: "cats running" matches "cat run".
    assert score(_task("cnn_dm"), Example("0", "p", "cat run", {}), "cats running")["rouge1"] == 1.0
    assert score(_task("jsonl"), Example("0", "p", "hello there", {}), "hello")["rouge1"] == pytest.approx(
        2 / 3
    )
    assert score(_task("jsonl"), Example("0", "p", None, {}), "hello") == {}


def test_topv2_exact_match_normalisation():
    ex = Example("0", "p", "[IN:CREATE_TIMER [SL:DATE_TIME for 12 minutes ] ]", {})
    task = _task("topv2")
    assert score(task, ex, " [IN:CREATE_TIMER  [SL:DATE_TIME for 12\tminutes ] ]\n") == {"exact_match": 1.0}
    assert score(task, ex, "[IN:CREATE_TIMER [SL:DATE_TIME for 12 minutes]]") == {"exact_match": 0.0}
    assert score(task, ex, "[in:create_timer [SL:DATE_TIME for 12 minutes ] ]") == {"exact_match": 0.0}


def test_humaneval_execution():
    task = load_task("humaneval", num_samples=None)
    ex = task.examples[0]
    assert score(task, ex, ex.reference) == {}  # nothing runs unless asked
    assert score(task, ex, ex.reference, execute_code=True) == {"pass@1": 1.0}
    assert score(task, ex, "    return False\n", execute_code=True) == {"pass@1": 0.0}
    assert score(task, ex, "    return (\n", execute_code=True) == {"pass@1": 0.0}  # syntax error
    start = time.monotonic()
    assert score(task, ex, "    while True:\n        pass\n", execute_code=True, timeout_s=2) == {
        "pass@1": 0.0
    }
    assert time.monotonic() - start < 10


def test_humaneval_runs_in_a_scratch_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = load_task("humaneval", num_samples=1)
    ex = task.examples[0]
    body = "    open('left_behind.txt', 'w').write('x')\n" + ex.reference
    assert score(task, ex, body, execute_code=True) == {"pass@1": 1.0}
    assert not (tmp_path / "left_behind.txt").exists()


# --- offline behaviour and availability ------------------------------------------------------------


def _empty_hf_cache(monkeypatch, tmp_path):
    # Make sure a Hub cache on the test machine cannot satisfy the load.
    datasets_config = pytest.importorskip("datasets.config")
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    return datasets_config


def test_cnn_dm_without_data_dir_offline_is_a_one_line_error(monkeypatch, tmp_path):
    _empty_hf_cache(monkeypatch, tmp_path)
    with pytest.raises(TaskError) as err:
        load_task("cnn_dm")
    message = str(err.value)
    assert "\n" not in message
    assert "cnn_dm" in message and "abisee/cnn_dailymail" in message and "--data-dir" in message
    with pytest.raises(TaskError) as err:
        load_task("cnn_dm", data_dir=tmp_path)
    assert str(tmp_path / "cnn_dm" / "test.") in str(err.value)


def test_unreachable_hub_fails_fast_without_offline_variables(monkeypatch, tmp_path):
    import huggingface_hub
    import huggingface_hub.constants

    datasets_config = _empty_hf_cache(monkeypatch, tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # As if the libraries had been imported while online: they only read the variables at import.
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    start = time.monotonic()
    with pytest.raises(TaskError, match="Hub unreachable"):
        load_task("topv2")
    assert time.monotonic() - start < 10


def test_available_tasks(tmp_path):
    listed = {t["name"]: t for t in available_tasks(DATA)}
    assert list(listed) == ["cnn_dm", "humaneval", "topv2", "spec_bench", "jsonl"]
    assert all(set(t) == {"name", "source", "available", "where", "how"} for t in listed.values())
    assert listed["cnn_dm"]["available"] and listed["topv2"]["available"] and listed["humaneval"]["available"]
    assert str(DATA / "topv2" / "test.tsv") in listed["topv2"]["where"]

    shutil.copytree(DATA / "topv2", tmp_path / "topv2")
    listed = {t["name"]: t for t in available_tasks(tmp_path)}
    assert not listed["cnn_dm"]["available"]
    assert str(tmp_path / "cnn_dm" / "test.") in listed["cnn_dm"]["where"]
    assert listed["topv2"]["available"]
    assert listed["humaneval"]["where"].endswith("HumanEval.jsonl.gz")
