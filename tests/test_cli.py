"""The command line: good runs write parquet records; bad input gives one clear line and exit code 2."""

import json

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from skipbench.cli import app

runner = CliRunner()
TINY = "synthetic:tiny"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_run_writes_records_with_the_baseline(tmp_path):
    result = invoke("run", "--model", TINY, "--strategy", "self_speculative", "-e", 2, "-k", 3, "-p", "hello",
                    "-p", "world", "--max-new-tokens", 12, "--warmup", 0, "--threads", 1, "--repeats", 2,
                    "--out", tmp_path)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [c["strategy"] for c in manifest["cells"]] == ["autoregressive", "self_speculative"]
    assert manifest["models"]["target"]["synthetic"] is True
    assert manifest["provenance"]["cpu_threads"] == 1
    assert manifest["provenance"]["machine"]["after"]["cpu_count"] >= 1
    frame = pd.concat(pd.read_parquet(p) for p in (tmp_path / "cells").glob("*.parquet"))
    assert len(frame) == 8 and set(frame["prompt_index"]) == {0, 1} and set(frame["round"]) == {0, 1}
    ended = frame["stop_reason"] != "length"
    assert (frame["new_tokens"] <= 12).all()
    # Without an EOS or stop, every output token is a kept draft or a verifier's own token.
    assert (frame[~ended]["new_tokens"] == frame[~ended]["accepted"] + frame[~ended]["verify_steps"]).all()
    assert "self E=2 K=3" in result.output and "(SYNTHETIC weights)" in result.output
    # Piped output (not a terminal): plain progress lines instead of bars.
    assert "round 2/2 done" in result.output


def test_the_defaults_run_and_rerunning_the_same_command_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ("run", "--model", TINY, "-p", "hi", "--max-new-tokens", 5, "--warmup", 0, "--repeats", 1)
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and "self E=1 K=4" in first.output  # a quarter of the 4 layers, K=4
    files = {p: p.stat().st_mtime_ns for p in (runs[0] / "cells").glob("*.parquet")}
    again = invoke(*args)
    assert again.exit_code == 0 and "measuring" not in again.output
    assert list((tmp_path / "runs").iterdir()) == runs
    assert {p: p.stat().st_mtime_ns for p in (runs[0] / "cells").glob("*.parquet")} == files


@pytest.mark.parametrize("command", [[], ["run"], ["sweep"], ["report"], ["compare"], ["datasets"], ["roofline"],
                                     ["benchmark"], ["train"]])
def test_every_command_has_help(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "Traceback" not in result.output


def test_a_sweep_with_a_failed_cell_finishes_the_others_and_exits_3(tmp_path, monkeypatch):
    import skipbench.measure as measure_module

    real = measure_module.CellRunner.generate

    def generate(self, prompt):
        if self.cell.exit_layer == 2:
            raise RuntimeError("boom")
        return real(self, prompt)

    monkeypatch.setattr(measure_module.CellRunner, "generate", generate)
    result = invoke("sweep", "--model", TINY, "--exits", "1..3", "--speculations", "2", "-p", "abc",
                    "--max-new-tokens", 6, "--warmup", 0, "--repeats", 1, "--out", tmp_path, "--no-report")
    assert result.exit_code == 3, result.output
    assert "failed self_speculative E=2 K=2: RuntimeError: boom" in result.output
    assert len(list((tmp_path / "cells").glob("*.parquet"))) == 3


def test_sweep_runs_every_cell_and_reports(tmp_path):
    result = invoke("sweep", "--model", "synthetic:tiny?agree=2", "--exits", "1..3", "--speculations", "2",
                    "-p", "abc", "--max-new-tokens", 8, "--warmup", 0, "--repeats", 2, "--control", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "cells").glob("*.parquet"))) == 5
    assert (tmp_path / "tables" / "efficiency.md").is_file() and (tmp_path / "plots" / "speedup_by_cell.png").is_file()


def test_a_sweep_over_two_tasks_writes_one_run_per_task_and_the_task_table(tmp_path):
    prompts = tmp_path / "code.jsonl"
    prompts.write_text('{"prompt": "def add(a, b):"}\n{"prompt": "class Stack:"}\n')
    result = invoke("sweep", "--model", TINY, "--exits", "2", "--speculations", "2", "--dataset", "humaneval",
                    "--dataset", f"jsonl:{prompts}", "--num-samples", 2, "--max-new-tokens", 6, "--warmup", 0,
                    "--repeats", 1, "--out", tmp_path / "run", "--no-report")
    assert result.exit_code == 0, result.output
    for task in ("humaneval", "jsonl-code"):
        assert json.loads((tmp_path / "run" / task / "manifest.json").read_text())["prompts"]["prompts"] == 2
    table = pd.read_csv(tmp_path / "run" / "tables" / "tasks.csv")
    assert list(table["strategy"]) == ["autoregressive", "self_speculative"]
    assert {"speedup humaneval", f"speedup jsonl:{prompts}", "speedup mean over tasks"} <= set(table.columns)
    assert (table.loc[0, [c for c in table.columns if c.startswith("speedup") and not c.endswith(("low", "high"))]]
            == 1.0).all()


def test_datasets_lists_what_is_available_offline(monkeypatch):
    monkeypatch.delenv("SKIPBENCH_DATA_DIR", raising=False)
    result = runner.invoke(app, ["datasets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") >= 4}
    assert "│ yes " in rows["humaneval"] and "│ no " in rows["cnn_dm"] and "│ no " in rows["topv2"]


def test_roofline_measures_this_device():
    result = invoke("roofline", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "GB/s" in result.output and "--peak-bandwidth" in result.output


def test_report_overlays_two_runs(tmp_path):
    for name, model in (("a", "synthetic:tiny?agree=2"), ("b", "synthetic:tiny")):
        assert invoke("sweep", "--model", model, "--exits", "1..2", "--speculations", "2", "-p", "abc",
                      "--max-new-tokens", 6, "--warmup", 0, "--repeats", 1, "--out", tmp_path / name,
                      "--no-report").exit_code == 0
    result = invoke("report", tmp_path / "a", "--overlay", tmp_path / "b", "--labels", "agree,random")
    assert result.exit_code == 0, result.output
    png = tmp_path / "a" / "plots" / "overlay.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert (tmp_path / "a" / "tables" / "efficiency.md").read_text().count("\n| synthetic") == 3
    bad = invoke("report", tmp_path / "a", "--overlay", tmp_path / "b", "--labels", "only-one")
    assert bad.exit_code == 2 and "labels" in bad.output


def test_a_gpt2_checkpoint_runs_autoregressive_and_two_model_on_the_hf_backend(tmp_path):
    from conftest import make_gpt2

    target, draft = make_gpt2(tmp_path / "gpt2"), make_gpt2(tmp_path / "draft[/x]")  # markup in a name: literal
    common = ("--model", target, "-p", "hello", "--max-new-tokens", 4, "--warmup", 0, "--repeats", 1, "--threads", 1,
              "--backend", "hf")
    alone = invoke("run", *common, "-s", "autoregressive", "--out", tmp_path / "ar")
    assert alone.exit_code == 0, alone.output
    assert alone.stderr.startswith(f"run: 1 cell(s) of {target} -> ")
    pair = invoke("run", *common, "-s", "speculative", "--draft-model", draft, "-k", 2, "--out", tmp_path / "pair")
    assert pair.exit_code == 0, pair.output
    assert "2-model K=2 hf d1" in pair.stdout and f"d1: draft model {draft}" in pair.stdout
    same = runner.invoke(app, ["compare", str(tmp_path / "pair"), str(tmp_path / "pair")],
                         env={"COLUMNS": "400"})  # labels holding [/x] in a rich table, unfolded
    assert same.exit_code == 0, same.output
    assert "draft[/x]" in same.stdout and "no regression" in same.stdout


def test_library_warnings_and_progress_bars_stay_out_of_the_output(tmp_path):
    """transformers warns during assisted generation and draws a bar while loading weights; neither shows."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import make_gpt2

    model = make_gpt2(tmp_path / "gpt2")
    script = Path(sys.executable).with_name("skipbench")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "skipbench.cli"]
    result = subprocess.run([*command, "run", "--model", str(model), "-s", "speculative", "--draft-model",
                             str(model), "-k", "2", "--backend", "hf", "-p", "hello", "--max-new-tokens", "6",
                             "--warmup", "0", "--repeats", "1", "--threads", "1", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    for noise in ("[transformers]", "generation_config", "Loading weights", "it/s]", "Warning", "warn("):
        assert noise not in output, output
    assert "2-model K=2 hf" in result.stdout


def test_report_on_a_run_with_an_hf_static_cell(tmp_path):
    result = invoke("run", "--model", TINY, "-s", "autoregressive", "--backend", "hf_static", "-p", "hi",
                    "--max-new-tokens", 4, "--warmup", 0, "--repeats", 1, "--threads", 1, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    report = invoke("report", tmp_path)
    assert report.exit_code == 0, report.output
    assert "hf_static" in (tmp_path / "tables" / "efficiency.md").read_text()


@pytest.mark.parametrize("given", [dict(dataset=["topv2"]), dict(prompts=("x",))])
def test_a_sweep_without_a_file_takes_the_tasks_defaults_not_the_default_sweeps(given):
    from skipbench import sweep as sweeping
    from skipbench.cli.runs import DEFAULT_SWEEP

    plan = sweeping.plan(None, dict(given), {}, None, DEFAULT_SWEEP)
    assert plan.tasks == given.get("dataset", [])
    # None: the task's own (topv2: 64 new tokens, stop at the newline, every example); --prompt: 128 tokens
    assert (plan.setup.num_samples, plan.setup.max_new_tokens, plan.setup.stop_sequences) == (None, None, None)
    # the default sweep itself keeps its choices
    default = sweeping.plan(None, {}, {}, None, DEFAULT_SWEEP)
    assert default.tasks == ["humaneval"] and default.setup.num_samples == 3 and default.setup.max_new_tokens == 48
    assert DEFAULT_SWEEP.setup["dataset"] == "humaneval"  # not consumed by planning


COMMANDS = list(typer.main.get_command(app).commands)  # every registered command, new ones included


def test_every_command_is_in_the_help_checks():
    assert {"run", "sweep", "report", "compare", "datasets", "roofline", "benchmark", "train", "export", "schema",
            "policies"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_every_value_plainly_and_explains_every_option(command):
    import re

    import typer

    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "<list[" not in result.output, result.output
    # "{prompt}" is what --template's user types; any other {name} is a placeholder leaking out
    assert not [name for name in re.findall(r"\{(\w+)\}", result.output) if name != "prompt"], result.output
    options = typer.main.get_command(app).commands[command].params
    silent = [param.opts[0] for param in options if param.param_type_name == "option" and not param.help]
    assert silent == [], f"{command}: options without help: {silent}"
    if command == "datasets":
        assert "see skipbench datasets" not in " ".join(result.output.split())  # it does not point to itself


def test_runs_warning_points_only_to_tables_that_exist(tmp_path, monkeypatch):
    import skipbench.verdicts

    shared = skipbench.verdicts.report_lines  # every warning said once for all the cells that have it
    monkeypatch.setattr(skipbench.verdicts, "report_lines", lambda summary, where: shared(summary, 1, where))
    result = invoke("run", "--model", TINY, "-e", 1, "-k", 2, "-p", "hi", "--max-new-tokens", 4, "--warmup", 0,
                    "--threads", 1, "--repeats", 2, "--out", tmp_path / "r")  # 2 units: too few for an interval
    assert result.exit_code == 0, result.output
    text, squashed = " ".join(result.output.split()), "".join(result.output.split())  # a long path may wrap anywhere
    assert "too few units" in text and f"(skipbenchreport{tmp_path / 'r'}liststhem)" in squashed, text
    assert "tables/efficiency.md" not in text or (tmp_path / "r" / "tables" / "efficiency.md").is_file(), text


def test_the_console_summary_says_which_baseline_each_speedup_divides_by(tmp_path):
    import shutil
    from pathlib import Path

    shutil.copytree(Path(__file__).parent.parent / "results" / "ci-smoke", tmp_path / "ci-smoke")
    result = runner.invoke(app, ["report", str(tmp_path / "ci-smoke")], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "speedups divide by AR, * by AR hf" in lines
    rows = {line.split("│")[1].strip(): line for line in lines if line.count("│") >= 6}
    assert rows["AR hf"].split("│")[3].strip().endswith("]")  # native-engine baseline: unmarked
    assert rows["AR hf control"].split("│")[3].strip().endswith("]*")
    assert rows["self E=2 K=4 hf"].split("│")[3].strip().endswith("]*")
    assert "AR #2" not in result.output and "AR control" in rows


def test_report_compare_and_datasets_fit_80_columns(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    monkeypatch.delenv("SKIPBENCH_DATA_DIR", raising=False)
    run = tmp_path / "ci-smoke"
    shutil.copytree(Path(__file__).parent.parent / "results" / "ci-smoke", run)
    for args in (["report", run], ["compare", run, run], ["datasets"]):
        result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        wide = [line for line in result.output.splitlines() if len(line) > 80]
        assert wide == [], f"{args[0]}: {wide}"
        assert "…" not in result.output, result.output  # nothing cut short
        if args[0] == "compare":
            assert "0/0" not in result.output and "nothing to check" in result.output
            assert len([line for line in result.output.splitlines() if line.startswith("│")]) == 20  # a line a cell
        if args[0] == "report":
            assert "|:---" not in result.output and "(efficiency.md: every column)" in " ".join(result.output.split())


def test_run_help_names_every_task_its_dataset_option_takes():
    result = runner.invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # the help is wrapped at the terminal's width
    text = text[text.index("--dataset"):text.index("--num-samples")]
    tasks = ("cnn_dm", "humaneval", "topv2", "spec_bench", "spec_bench:multi_turn", "jsonl:PATH")
    assert all(name in text for name in tasks), text  # the names `unknown dataset` lists
