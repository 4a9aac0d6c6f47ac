"""Results other tools read: the spec_bench task, Spec-Bench answer files, the JSON export and its schema, and
the regression gate as JUnit XML and Markdown."""

from __future__ import annotations

import io
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from skipbench import spec_bench_export as sbe
from skipbench.ci_reports import junit, markdown
from skipbench.cli import app
from skipbench.compare import compare_runs
from skipbench.exports import csv_text, document, jsonl_lines, schema
from skipbench.models import ByteTokenizer
from skipbench.prompts import build_prompts
from skipbench.spec import Cell, Setup, with_baseline
from skipbench.store import RunStore
from skipbench.sweep import execute
from skipbench.tasks import TaskError, load_task

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "fixtures" / "data"
CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
              "translation", "summarization", "qa", "math_reasoning", "rag"]
runner = CliRunner()


# --------------------------------------------------------------------------- the task


def test_spec_bench_first_turns_from_the_fixture():
    task = load_task("spec_bench", data_dir=DATA)
    assert (task.name, task.split, len(task.examples)) == ("spec_bench", "question", 13)
    assert task.source == str(DATA / "spec_bench" / "question.jsonl")
    assert [ex.extra["spec_bench"]["category"] for ex in task.examples] == CATEGORIES
    first = task.examples[0]
    assert first.id == "1" and first.extra["spec_bench"] == {"question_id": 1, "category": "writing", "turn": 1}
    assert first.prompt == "USER: Write a two-line poem about a lighthouse keeper.\nASSISTANT:"
    assert task.defaults.stop_sequences == ("\nUSER:",)
    assert len(load_task("spec_bench", data_dir=DATA, num_samples=4, seed=1).examples) == 4


def test_spec_bench_multi_turn_feeds_the_models_own_answer_back():
    task = load_task("spec_bench:multi_turn", data_dir=DATA)
    assert [ex.id for ex in task.examples][:4] == ["1", "1/2", "2", "2/2"] and len(task.examples) == 16
    written = []

    def answer(ids, max_new_tokens, stops):
        written.append((ByteTokenizer().decode(ids), max_new_tokens, stops))
        return f" answer {len(written)}"

    setup = Setup(model="synthetic:tiny", dataset="spec_bench:multi_turn", data_dir=str(DATA), max_new_tokens=7)
    prompts = build_prompts(setup, ByteTokenizer(), answer=answer)
    by_id = {prompt.id: prompt for prompt in prompts.prompts}
    assert len(written) == 3  # one answer per question with a second turn, written once
    assert written[0] == ("USER: Write a two-line poem about a lighthouse keeper.\nASSISTANT:", 7, ("\nUSER:",))
    assert by_id["1/2"].text == ("USER: Write a two-line poem about a lighthouse keeper.\nASSISTANT: answer 1\n"
                                 "USER: Now rewrite it so that every word starts with the letter L.\nASSISTANT:")
    assert prompts.describe()["spec_bench"][1] == {"question_id": 1, "category": "writing", "turn": 2}
    with pytest.raises(TaskError, match="earlier answers"):
        build_prompts(setup, ByteTokenizer())


def test_spec_bench_offline_without_a_local_copy_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TaskError) as error:
        load_task("spec_bench", data_dir=tmp_path)
    message = str(error.value)
    assert "\n" not in message and "spec_bench/question." in message and "GitHub" in message
    with pytest.raises(TaskError, match="only spec_bench has a multi-turn option"):
        load_task("topv2:multi_turn", data_dir=DATA)


# --------------------------------------------------------------------------- a Spec-Bench run


@pytest.fixture(scope="module")
def spec_run(tmp_path_factory):
    setup = Setup(model="synthetic:tiny?agree=2", dataset="spec_bench:multi_turn", data_dir=str(DATA),
                  num_samples=5, max_new_tokens=6, warmup=0, repeats=2, threads=1)
    cells = with_baseline([Cell("self_speculative", exit_layer=2, num_speculations=2)])
    return execute(setup, cells, tmp_path_factory.mktemp("spec") / "run").root


def test_answer_files_carry_the_cells_tokens_and_times(spec_run, tmp_path):
    files = sbe.write_answer_files(spec_run, tmp_path / "answers")
    assert sorted(path.parent.name for path in files) == ["run_1", "run_1", "run_2", "run_2"]
    store = RunStore(spec_run)
    manifest, frame = store.read_manifest(), store.read_cells()
    meta = sbe.prompt_meta(manifest, frame)
    for path in files:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(lines) == 5  # one line per question, whatever its turns
        mid = lines[0]["model_id"]
        rows = frame[(frame["round"] == int(path.parent.name[4:]) - 1)
                     & (frame["cell_label"].map(lambda label: sbe.model_id(manifest, label)) == mid)]
        for line in lines:
            assert set(line) == {"question_id", "category", "answer_id", "model_id", "choices", "tstamp"}
            choice = line["choices"][0]
            assert set(choice) == {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}
            mine = rows[rows["prompt_index"].map(lambda i: meta[int(i)]["question_id"]) == line["question_id"]]
            mine = mine.sort_values("prompt_index")
            assert choice["new_tokens"] == list(mine["new_tokens"]) and choice["wall_time"] == list(mine["time_s"])
            assert choice["turns"] == list(mine["text"]) and choice["decoding_steps"] == list(mine["verify_steps"])
            assert len(choice["turns"]) == (2 if line["question_id"] in (1, 2, 4) else 1)
            assert sum(choice["accept_lengths"]) >= sum(choice["new_tokens"])  # an EOS step commits one more
    # Spec-Bench's speedup from the answer files equals the one computed straight from the rows.
    key = frame.loc[frame["strategy"] == "self_speculative", "cell_key"].iloc[0]
    base_key = sbe.baseline_key(frame, key)
    for round_index in (0, 1):
        sets = sbe.answer_sets(spec_run)[(0, round_index)]
        spec = next(lines for mid, lines in sets.items() if "self-speculative" in mid)
        base = next(lines for mid, lines in sets.items() if "autoregressive" in mid)
        from_files = sbe.answers_speedup(spec, base)
        from_rows = sbe.rows_speedup(frame, key, base_key, round_index, meta)
        assert from_files == pytest.approx(from_rows, rel=1e-12)
        # Spec-Bench recounts the baseline's tokens from its text (ids minus the BOS); a count that gives each
        # text its stored tokens reproduces the rows' figure, so only the recount itself can move it.
        stored = {text: n for line in base for text, n in zip(line["choices"][0]["turns"],
                                                              line["choices"][0]["new_tokens"], strict=True)}
        assert sbe.answers_speedup(spec, base, count=stored.__getitem__) == pytest.approx(from_rows, rel=1e-12)


def test_the_category_table_has_the_task_tables_shape(spec_run):
    files = sbe.write_category_table(spec_run)
    assert [path.name for path in files] == ["categories.md", "categories.tex", "categories.csv"]
    numbers = pd.read_csv(files[2])
    chosen = list(dict.fromkeys(m["category"] for m in RunStore(spec_run).read_manifest()["prompts"]["spec_bench"]))
    assert [f"speedup {c}" for c in chosen] == [c for c in numbers.columns if c.startswith("speedup ")
                                                and not c.endswith((" low", " high", "over tasks"))]
    assert len(numbers) == 2 and "tokens per step" in numbers


# --------------------------------------------------------------------------- the JSON export


def committed_runs() -> list[Path]:
    return sorted(path.parent for path in (ROOT / "results").rglob("manifest.json"))


@pytest.mark.parametrize("run_dir", committed_runs(), ids=lambda path: str(path.relative_to(ROOT / "results")))
def test_every_committed_run_export_validates(run_dir):
    jsonschema.Draft202012Validator.check_schema(schema())
    doc = json.loads(json.dumps(document(run_dir), allow_nan=False))
    jsonschema.validate(doc, schema(), cls=jsonschema.Draft202012Validator)
    assert doc["rows"] and all(row["intervals"]["speedup"]["level"] == 0.95 for row in doc["rows"])


def test_jsonl_and_csv_hold_a_row_per_line():
    doc = document(ROOT / "results" / "ci-smoke")
    lines = [json.loads(line) for line in jsonl_lines(doc)]
    assert len(lines) == len(doc["rows"]) == 20 and all(line["records_schema_version"] == 2 for line in lines)
    frame = pd.read_csv(io.StringIO(csv_text(doc)))
    assert len(frame) == 20 and {"speedup", "speedup_low", "speedup_high", "tokens_per_s_low"} <= set(frame)
    broken = json.loads(json.dumps(doc))
    broken["rows"][0]["intervals"]["speedup"]["low"] = "1.0"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema(), cls=jsonschema.Draft202012Validator)


def test_export_and_schema_commands(tmp_path):
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0 and json.loads(result.stdout)["properties"]["records_schema_version"] == {"const": 2}
    result = runner.invoke(app, ["export", str(ROOT / "results" / "ci-smoke")])
    assert result.exit_code == 0 and len(json.loads(result.stdout)["rows"]) == 20
    out = tmp_path / "x.jsonl"
    result = runner.invoke(app, ["export", str(ROOT / "results" / "ci-smoke"), "--format", "jsonl", "--out", str(out)])
    assert result.exit_code == 0 and len(out.read_text().splitlines()) == 20
    for command in (["export", "--help"], ["schema", "--help"], ["compare", "--help"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0 and "Usage" in result.stdout
    assert "--junit" in runner.invoke(app, ["compare", "--help"]).stdout


# --------------------------------------------------------------------------- the CI gate


def steady_copy(tmp_path: Path, name: str) -> Path:
    """results/ci-smoke with times proportional to verify steps plus 1% noise: known, tight intervals."""
    target = tmp_path / name
    shutil.copytree(ROOT / "results" / "ci-smoke", target)
    rng = np.random.default_rng(0)
    for path in sorted((target / "cells").glob("*.parquet")):
        frame = pd.read_parquet(path)
        frame["time_s"] = 0.01 * frame["verify_steps"] * rng.uniform(0.99, 1.01, len(frame))
        frame.to_parquet(path, index=False)
    return target


def test_junit_reports_an_injected_regression_as_a_failure(tmp_path):
    base, new = steady_copy(tmp_path, "base"), steady_copy(tmp_path, "new")
    slowed = "self_speculative E=2 K=4"
    for path in (new / "cells").glob("*.parquet"):
        frame = pd.read_parquet(path)
        if frame["cell_label"].iloc[0] == slowed:
            frame["time_s"] *= 1.3
            frame.to_parquet(path, index=False)
    comparison = compare_runs(base, new)
    suite = ET.fromstring(junit(comparison))
    cases = suite.findall("testcase")
    assert suite.tag == "testsuite" and len(cases) == len(comparison.rows) == 20
    assert suite.get("tests") == "20" and suite.get("failures") == "1"
    failed = [case for case in cases if case.find("failure") is not None]
    assert [case.get("name") for case in failed] == [slowed]
    message = failed[0].find("failure").get("message")
    row = comparison.rows.set_index("cell").loc[slowed]
    assert "speedup" in message and "5% tolerance" in message and "max slowdown 5%" in message
    for low, high in ((row["base_speedup_low"], row["base_speedup_high"]),
                      (row["new_speedup_low"], row["new_speedup_high"])):
        assert f"[{low:.2f}, {high:.2f}]" in message
    summary = markdown(comparison)
    assert "1 regression(s)" in summary and f"| {slowed} |" in summary and "**FAIL**" in summary
    assert ET.fromstring(junit(compare_runs(base, base))).get("failures") == "0"


def test_compare_writes_junit_and_markdown_and_keeps_its_exit_codes(tmp_path):
    base = steady_copy(tmp_path, "base")
    report, summary = tmp_path / "junit.xml", tmp_path / "summary.md"
    result = runner.invoke(app, ["compare", str(base), str(base), "--junit", str(report), "--markdown", str(summary)])
    assert result.exit_code == 0, result.output
    assert ET.parse(report).getroot().get("failures") == "0" and "no regression" in summary.read_text()
    new = steady_copy(tmp_path, "new")
    for path in (new / "cells").glob("*.parquet"):
        frame = pd.read_parquet(path)
        if frame["cell_label"].iloc[0] == "self_speculative E=2 K=4":
            frame["time_s"] *= 1.3
            frame.to_parquet(path, index=False)
    result = runner.invoke(app, ["compare", str(base), str(new), "--junit", str(report), "--markdown", str(summary)])
    assert result.exit_code == 1
    assert ET.parse(report).getroot().get("failures") == "1"
    assert summary.read_text().count("skipbench compare: ") == 2  # appended, as $GITHUB_STEP_SUMMARY collects steps
