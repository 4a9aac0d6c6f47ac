"""Bad input through the command line, one table: exit status 2, exactly one `error:` line (the last line on
stderr; only the command's own "run:"/"sweep:" header may come before it), nothing on stdout, no traceback,
and nothing on disk changed: every file under the test's directory (given run directories, the --out that
must not appear, the default runs/ under the working directory) has the same names, sizes and mtimes after.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import make_gpt2
from typer.testing import CliRunner

from skipbench.cli import app

runner = CliRunner()
TINY = "synthetic:tiny"
QUICK = ("--max-new-tokens", "3", "--warmup", "0", "--repeats", "1", "--threads", "1")
# A sweep of the tiny model: every option given, so nothing comes from the default sweep but what a case says.
SWEEP = ("sweep", "--model", TINY, "-p", "x", "--exits", "1", "--speculations", "2", "--no-report", *QUICK)
# (a case's options after SWEEP override it: the last of a repeated option wins)
CUDA = torch.cuda.is_available()


@dataclass
class Case:
    id: str
    args: tuple  # "{name}" is replaced by the path of that name (see `paths`)
    message: str  # a fragment of the error line (user text in it must come out literally)
    env: dict = field(default_factory=dict)
    patch: dict = field(default_factory=dict)  # "module.attr" -> value, for the duration of the call
    hold_lock: str | None = None  # a path whose run-directory lock another process holds meanwhile
    usage: bool = False  # a click usage error: "Usage:" and "Try" lines come with the error line
    skip: str | None = None


def run(*args):
    """`skipbench run` of the tiny model, quick; the case's own options come last, so they win."""
    return ("run", "--model", TINY, *QUICK, *args, "-o", "{out}")


def sweep_file(name):
    return ("sweep", "{file:" + name + "}", "--no-report", "-o", "{out}")


# Device maps (JSON files) the cases name as {json:NAME}.
JSON_FILES = {
    "cpu-stages": {"": "cpu:0", "model.layers.1": "cpu:1", "lm_head": "cpu:1", "model.norm": "cpu:1"},
    "gpu-stages": {"": "cpu", "model.layers": "cuda:1"},
}

SWEEP_FILES = {
    "bad-toml": "x = [\n",
    "unknown-section": "[nope]\na = 1\n",
    "unknown-setup-key": '[setup]\nmodle = "synthetic:tiny"\n',
    "unknown-sweep-key": "[sweep]\nexit = 2\n",
    "prompts-string": '[setup]\nprompts = "hello"\n',
    "num-samples-string": '[setup]\nnum_samples = "two"\n',
    "sample-string": '[setup]\nsample = "yes"\n',
    "temperature-string": '[setup]\ntemperature = "hot"\n',
    "dataset-number": "[setup]\ndataset = 5\n",
    "setup-not-table": "setup = 5\n",
    "exits-garbage": '[sweep]\nexits = "a..b"\n',
    "control-string": '[sweep]\ncontrol = "yes"\n',
    "train-no-out": '[[train]]\nlabel = "a"\n',
    "execute-code": '[setup]\nmodel = "synthetic:tiny"\nprompts = ["def f():"]\nexecute_code = true\n'
                    '[sweep]\nexits = "1"\nspeculations = "2"\n',
}

CASES = [
    # ------------------------------------------------------------------ methods and cells (from test_cli)
    Case("exit-0", run("-p", "x", "-e", "0"), "outside 1..3"),
    Case("exit-too-high", run("-p", "x", "-e", "4"), "outside 1..3"),
    Case("k-0", run("-p", "x", "-e", "2", "-k", "0"), "K >= 1"),
    Case("speculative-without-draft", run("-p", "x", "--strategy", "speculative"), "needs a draft model"),
    Case("speculative-with-exit", run("-p", "x", "-s", "speculative", "--draft-model", TINY, "-e", "1"),
         "takes no --exit-layer"),
    Case("autoregressive-with-exit", run("-p", "x", "-s", "autoregressive", "-e", "1"), "takes no exit layer"),
    Case("unknown-strategy", run("-p", "x", "--strategy", "nope"), "unknown strategy 'nope'"),
    Case("unknown-backend", run("-p", "x", "--backend", "foo"), "unknown backend 'foo'"),
    Case("backend-without-strategy", run("-p", "x", "-e", "1", "--backend", "hf_static"),
         "backend hf_static does not run self_speculative"),
    Case("draft-other-vocab", run("-p", "x", "-s", "speculative", "--draft-model",
                                  "synthetic:smollm2-135m?layers=1"), "vocabulary"),
    # ------------------------------------------------------------------ models
    Case("unknown-preset", run("-p", "x", "--model", "synthetic:llama9"), "unknown synthetic preset 'llama9'"),
    Case("preset-option-not-int", run("-p", "x", "--model", "synthetic:tiny?agree=x", "-e", "1"), "not an integer"),
    Case("preset-unknown-option", run("-p", "x", "--model", "synthetic:tiny?agre=2", "-e", "1"), "unknown option"),
    Case("preset-agree-outside", run("-p", "x", "--model", "synthetic:tiny?agree=9", "-e", "1"), "agree=9"),
    Case("missing-model-dir", run("-p", "x", "--model", "/no/such/checkpoint", "-e", "1"), "no such directory"),
    Case("unreachable-hub-id", run("-p", "x", "--model", "someone/some-model", "-e", "1"), "Hub is unreachable"),
    Case("gated-layerskip-id", run("-p", "x", "--model", "facebook/layerskip-llama3-8B"),
         "gated on the Hugging Face Hub"),
    Case("gated-layerskip-local-copy", run("-p", "x", "--model", "facebook/layerskip-llama2-7B", "-e", "8"),
         "a local copy works with --model DIR"),
    Case("gated-id-with-a-dot", run("-p", "x", "--model", "facebook/layerskip-llama3.2-1B", "-e", "4"),
         "facebook/layerskip-llama3.2-1B is gated"),  # a dot in a Hub id does not make it a file path
    Case("checkpoint-file-not-dir", run("-p", "x", "--model", "weights.safetensors", "-e", "1"),
         "no such directory"),
    Case("model-id-with-markup", run("-p", "x", "--model", "a[/x]b", "-e", "1"), "model 'a[/x]b'"),
    Case("draft-id-with-markup", run("-p", "x", "-s", "speculative", "--draft-model", "[bold]d[/bold]"),
         "model '[bold]d[/bold]'"),
    Case("gpt2-native-backend", run("-p", "x", "--model", "{gpt2}", "-s", "autoregressive"),
         "the native engine cannot drive GPT2LMHeadModel"),
    Case("gpt2-self-speculative-hf", run("-p", "x", "--model", "{gpt2}", "--backend", "hf"),
         "assistant_early_exit cannot draft with it"),
    Case("bad-dtype", run("-p", "x", "-e", "1", "--dtype", "float8"), "--dtype"),
    Case("bad-device", run("-p", "x", "-e", "1", "--device", "tpu"), "--device"),
    Case("cuda-on-cpu-build", run("-p", "x", "-e", "1", "--device", "cuda"), "no CUDA",
         skip="CUDA is available here" if CUDA else None),
    Case("cuda-index-on-cpu-build", run("-p", "x", "-e", "1", "--device", "cuda:0"), "--device cuda:0",
         skip="CUDA is available here" if CUDA else None),
    Case("cuda-bad-index", run("-p", "x", "-e", "1", "--device", "cuda:99"), "--device cuda:99"),
    Case("benchmark-too-big-for-memory", ("benchmark", "--out", "{out}"), "is available; what fits: --dtype "
         "bfloat16 (21.7 GB)", patch={"skipbench.models.available_memory": lambda device: 26 * 10**9}),
    # the target alone would fit in bfloat16 (16.1 GB), but not with its draft (5.6 GB more): bfloat16 is no advice
    Case("batch-larger-than-prompts", ("run", "--model", "synthetic:tiny", "-p", "a", "-p", "b", "-p", "c",
                                       "--batch-sizes", "1,4", "--max-new-tokens", "2", "--warmup", "0",
                                       "--repeats", "1", "-o", "{out}"),
         "--batch-sizes 4 is larger than the 3 prompt(s) of this run: give at least 4 prompts"),
    Case("benchmark-target-and-draft-too-big", ("benchmark", "--out", "{out}"), "synthetic:llama3-8b?agree=8 with "
         "synthetic:llama3-8b?agree=8&layers=8 need 43.3 GB for their float32 weights but 20.0 GB of memory is "
         "available; in bfloat16 they need 21.7 GB",
         patch={"skipbench.models.available_memory": lambda device: 20 * 10**9}),
    Case("benchmark-too-big-anywhere", ("benchmark", "--model", "synthetic:llama2-70b", "--draft-model", "",
                                        "--out", "{out}"), "needs 275.9 GB"),
    # --device-map: each device's memory checked before loading; one line naming the device that does not fit.
    Case("device-map-too-big-for-a-device", run("-p", "x", "-e", "1", "--model", "synthetic:llama3.2-1b",
                                                "--device-map", "{json:cpu-stages}"),
         "needs 4.9 GB on cpu (weights, KV cache, draft) but 2.0 GB is available there",
         patch={"skipbench.models.available_memory": lambda device: 2 * 10**9}),
    Case("device-map-balanced-too-big", run("-p", "x", "-e", "1", "--model", "synthetic:llama3.2-1b",
                                            "--device-map", "balanced"), "does not fit on 1 device(s) with room for "
         "cpu 1.8 GB", patch={"skipbench.models.available_memory": lambda device: 2 * 10**9}),
    Case("device-map-absent-gpu", run("-p", "x", "-e", "1", "--device-map", "{json:gpu-stages}"),
         "is placed on cuda:1, which this machine lacks; it has cpu", skip="CUDA is available here" if CUDA else None),
    Case("benchmark-bad-exits", ("benchmark", "--exits", "x", "--out", "{out}"), "cannot read 'x'"),
    Case("roofline-cuda", ("roofline", "--device", "cuda"), "no CUDA", skip="CUDA is available here" if CUDA else None),
    # ------------------------------------------------------------------ prompts and decoding settings
    Case("empty-prompt", run("-p", "", "-e", "1"), "empty --prompt"),
    Case("blank-prompt", run("-p", "   ", "-e", "1"), "empty --prompt"),
    Case("prompt-and-dataset", run("-p", "x", "-e", "1", "--dataset", "humaneval"), "either --prompt or --dataset"),
    Case("template-without-placeholder", run("-p", "x", "-e", "1", "--template", "[INST] [/INST]"),
         "--template '[INST] [/INST]' has no {prompt} placeholder"),
    Case("n-shot-negative", run("-p", "x", "-e", "1", "--n-shot", "-1"), "--n-shot must be >= 0"),
    Case("n-shot-without-dataset", run("-p", "x", "-e", "1", "--n-shot", "2"), "needs a --dataset"),
    Case("temperature-negative-greedy", run("-p", "x", "-e", "1", "--temperature", "-1"), "--temperature must be > 0"),
    Case("temperature-zero-sampled", run("-p", "x", "-e", "1", "--sample", "--temperature", "0"),
         "--temperature must be > 0"),
    Case("top-p-zero", run("-p", "x", "-e", "1", "--top-p", "0"), "--top-p must be in (0, 1]"),
    Case("top-p-above-one", run("-p", "x", "-e", "1", "--top-p", "1.5"), "--top-p must be in (0, 1]"),
    Case("repeats-zero", run("-p", "x", "-e", "1", "--repeats", "0"), "--repeats must be >= 1"),
    Case("threads-zero", run("-p", "x", "-e", "1", "--threads", "0"), "--threads must be >= 1"),
    Case("warmup-negative", run("-p", "x", "-e", "1", "--warmup", "-1"), "--warmup must be >= 0"),
    Case("max-new-tokens-zero", run("-p", "x", "-e", "1", "--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
    Case("max-prompt-tokens-zero", run("-p", "x", "-e", "1", "--max-prompt-tokens", "0"),
         "--max-prompt-tokens must be >= 1"),
    Case("num-samples-zero", run("-p", "x", "-e", "1", "-n", "0"), "--num-samples must be >= 1"),
    Case("prompt-policy-unknown", run("-p", "x", "-e", "1", "--prompt-policy", "right"), "--prompt-policy"),
    Case("prompt-over-max-positions", run("-p", "word " * 2100, "-e", "1"), "passes the model's 2048 positions"),
    Case("prompt-over-limit-refused", run("-p", "a longer prompt", "-e", "1", "--max-prompt-tokens", "2",
                                          "--prompt-policy", "refuse"), "over the limit of 2"),
    Case("dataset-offline", run("-e", "1", "--dataset", "cnn_dm"), "cnn_dm"),
    Case("dataset-unknown", run("-e", "1", "--dataset", "nope"), "nope"),
    Case("dataset-jsonl-missing", run("-e", "1", "--dataset", "jsonl:/no/such.jsonl"), "/no/such.jsonl"),
    Case("dataset-jsonl-empty", run("-e", "1", "--dataset", "jsonl:{data:empty.jsonl}"), "holds no examples"),
    Case("dataset-jsonl-blank-lines", run("-e", "1", "--dataset", "jsonl:{data:blank.jsonl}"), "holds no examples"),
    Case("data-dir-empty-file", run("-e", "1", "--dataset", "topv2", "--data-dir", "{data:}"), "holds no examples"),
    Case("threads-not-a-number", run("-p", "x", "-e", "1", "--threads", "abc"), "Invalid value for '--threads'",
         usage=True),
    # ------------------------------------------------------------------ run directories
    Case("other-settings-run-dir", ("run", "--model", TINY, "-p", "another", "-e", "1", *QUICK, "-o", "{run}"),
         "holds a run with other settings (prompts differ)"),
    Case("locked-run-dir", ("run", "--model", TINY, "-p", "one", "-e", "1", *QUICK, "-o", "{run}"),
         "is in use by pid", hold_lock="{run}"),
    Case("read-only-out-dir", ("run", "--model", TINY, "-p", "x", "-e", "1", *QUICK, "-o", "{readonly}/run"),
         "Read-only file system"),
    Case("out-is-a-file", ("run", "--model", TINY, "-p", "x", "-e", "1", *QUICK, "-o", "{file:prompts-string}"),
         "File exists"),
    Case("force-with-missing-model", ("run", "--model", "/no/such/checkpoint", "-p", "one", "-e", "1", *QUICK,
                                      "-o", "{run}", "--force"), "no such directory"),
    Case("force-with-long-prompt", ("run", "--model", TINY, "-p", "word " * 2100, "-e", "1", *QUICK,
                                    "-o", "{run}", "--force"), "positions"),
    # ------------------------------------------------------------------ sweeps and sweep files
    Case("sweep-file-missing", ("sweep", "/no/such.toml"), "sweep file /no/such.toml does not exist"),
    *[Case(f"sweep-file-{name}", sweep_file(name), message) for name, message in [
        ("bad-toml", "Invalid value"), ("unknown-section", "unknown section(s) nope"),
        ("unknown-setup-key", "unknown setup key(s) modle"), ("unknown-sweep-key", "unknown sweep key(s) exit"),
        ("prompts-string", "prompts must be a list of strings"), ("num-samples-string", "must be a whole number"),
        ("sample-string", "sample must be true or false"), ("temperature-string", "temperature must be a number"),
        ("dataset-number", "dataset must be a task name"), ("setup-not-table", "must be tables"),
        ("exits-garbage", "cannot read 'a..b'"), ("control-string", "control must be true or false"),
        ("train-no-out", "needs a label and an out_dir"),
        ("execute-code", "--execute-code to confirm"),
    ]],
    Case("sweep-empty-range", (*SWEEP, "--exits", "5..2", "-o", "{out}"), "is empty"),
    Case("sweep-range-garbage", (*SWEEP, "--exits", "x", "-o", "{out}"), "cannot read 'x'"),
    Case("sweep-range-empty-item", (*SWEEP, "--exits", "1,,2", "-o", "{out}"), "empty item"),
    Case("sweep-unknown-strategy", (*SWEEP, "--strategies", "nope", "-o", "{out}"), "unknown strategy"),
    Case("sweep-unknown-backend", (*SWEEP, "--backends", "foo", "-o", "{out}"), "unknown backend"),
    Case("sweep-k-zero", (*SWEEP, "--speculations", "0", "-o", "{out}"), "K >= 1"),
    Case("sweep-speculative-without-draft", (*SWEEP, "--strategies", "speculative", "-o", "{out}"),
         "needs at least one --draft-model"),
    Case("sweep-default-exits-outside-model", ("sweep", "--model", TINY, "-p", "x", "--no-report", *QUICK,
                                               "-o", "{out}"), "outside 1..3"),
    Case("sweep-gpt2-native-and-hf", (*SWEEP, "--model", "{gpt2}", "--backends", "native,hf", "-o", "{out}"),
         "use --backend hf"),
    # ------------------------------------------------------------------ report and compare
    Case("report-not-a-run", ("report", "{gpt2}"), "is not a skipbench run directory"),
    Case("report-missing-dir", ("report", "{out}"), "is not a skipbench run directory"),
    Case("report-empty-run", ("report", "{empty}"), "holds no finished cells"),
    Case("report-old-schema", ("report", "{old}"), "older skipbench"),
    Case("report-damaged-manifest", ("report", "{damaged}"), "cannot be read"),
    Case("report-setup-a-list", ("report", "{badsetup}"), "manifest.json: setup must be an object"),
    Case("report-prompts-a-string", ("report", "{badprompts}"), "manifest.json: prompts must be an object"),
    Case("report-manifest-a-list", ("report", "{badtop}"), "manifest.json must be an object"),
    Case("sweep-into-setup-a-list", (*SWEEP, "-o", "{badsetup}"), "manifest.json: setup must be an object"),
    Case("sweep-into-prompts-a-string", (*SWEEP, "-o", "{badprompts}"), "manifest.json: prompts must be an object"),
    Case("compare-cells-a-dict", ("compare", "{badcells}", "{run}"), "manifest.json: cells must be a list"),
    Case("report-labels-mismatch", ("report", "{run}", "--overlay", "{other}", "--labels", "only-one"),
         "--labels gives 1 labels for 2 runs"),
    Case("report-missing-argument", ("report",), "Missing argument", usage=True),
    Case("compare-incomparable", ("compare", "{run}", "{other}"), "different prompt sets"),
    Case("compare-empty-base", ("compare", "{empty}", "{run}"), "base run"),
    Case("compare-empty-new", ("compare", "{run}", "{empty}"), "new run"),
    Case("compare-not-a-run", ("compare", "{gpt2}", "{run}"), "is not a skipbench run directory"),
    Case("compare-max-slowdown-text", ("compare", "{run}", "{run}", "--max-slowdown", "abc"), "cannot read 'abc'"),
    Case("compare-max-slowdown-range", ("compare", "{run}", "{run}", "--max-slowdown", "150%"),
         "must be a fraction in [0, 1)"),
    Case("compare-max-latency-increase-text", ("compare", "{run}", "{run}", "--max-latency-increase", "ten"),
         "cannot read 'ten' as an increase; use 10%, 0.10 or off"),
    Case("compare-max-latency-increase-negative", ("compare", "{run}", "{run}", "--max-latency-increase=-5%"),
         "'-5%' must be an increase of 0% or more (or off)"),
    Case("compare-junit-missing-folder", ("compare", "{run}", "{run}", "--junit", "{out}/x/report.xml"),
         "does not exist"),
    Case("compare-markdown-is-a-folder", ("compare", "{run}", "{run}", "--markdown", "{run}"), "is a folder"),
    # ------------------------------------------------------------------ export
    Case("export-missing-run-dir", ("export", "{out}"), "is not a skipbench run directory"),
    Case("export-unknown-format", ("export", "{run}", "--format", "xml"), "unknown export format 'xml'"),
    Case("export-out-missing-folder", ("export", "{run}", "--out", "{out}/x/run.json"), "does not exist"),
    Case("export-out-is-a-folder", ("export", "{run}", "--format", "csv", "--out", "{run}"), "is a folder"),
    Case("export-spec-bench-without-out", ("export", "{run}", "--format", "spec-bench"), "give --out DIR"),
    Case("export-spec-bench-out-is-a-file", ("export", "{run}", "--format", "spec-bench", "--out",
                                             "{run}/manifest.json"), "is a file"),
    Case("export-empty-run", ("export", "{empty}", "--format", "csv"), "holds no finished cells"),
    Case("export-spec-bench-empty-run", ("export", "{empty}", "--format", "spec-bench", "--out", "{out}"),
         "holds no finished cells"),
    # ------------------------------------------------------------------ policies
    Case("policies-empty-run", ("policies", "{empty}"), "holds no finished cells"),
    Case("policies-without-policy-cells", ("policies", "{run}"), "holds no draft-policy cells"),
    Case("policies-not-a-run", ("policies", "{out}"), "is not a skipbench run directory"),
    # ------------------------------------------------------------------ dry runs: the same input errors as a real run
    Case("dry-run-device-map-not-json", run("-p", "x", "-e", "1", "--dry-run", "--device-map",
                                            "{data:bad-map.json}"), "cannot read it as JSON"),
    Case("dry-run-device-map-absent-gpu", run("-p", "x", "-e", "1", "--dry-run", "--device-map", "{json:gpu-stages}"),
         "is placed on cuda:1, which this machine lacks; it has cpu", skip="CUDA is available here" if CUDA else None),
    Case("dry-run-gpus-0", run("-p", "x", "-e", "1", "--dry-run", "--gpus", "0"), "--gpus must be >= 1 (got 0)"),
    Case("dry-run-gpu-memory-garbage", run("-p", "x", "-e", "1", "--dry-run", "--gpu-memory", "abc"),
         "cannot read the memory size 'abc'"),
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """Run directories and a checkpoint made once; each test works on copies."""
    from skipbench.spec import Grid, Setup
    from skipbench.store import RunStore
    from skipbench.sweep import execute

    root = tmp_path_factory.mktemp("stored")
    setup = Setup(model=TINY, prompts=("one",), max_new_tokens=3, warmup=0, repeats=1, threads=1)
    cells = Grid(exits=(1,), speculations=(4,)).expand()
    execute(setup, cells, root / "run")
    execute(Setup(**{**setup.__dict__, "prompts": ("two",)}), cells, root / "other")
    shutil.copytree(root / "run", root / "empty")
    shutil.rmtree(root / "empty" / "cells")
    shutil.copytree(root / "run", root / "old")
    manifest = json.loads((root / "old" / "manifest.json").read_text())
    (root / "old" / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 1}))
    shutil.copytree(root / "run", root / "damaged")
    (root / "damaged" / "manifest.json").write_text('{"schema_version": 2, "setup": ')
    for name, change in [("badsetup", {"setup": [1, 2]}), ("badprompts", {"prompts": "x"}), ("badtop", None),
                         ("badcells", {"cells": {"a": 1}})]:  # valid JSON of the wrong shape
        shutil.copytree(root / "run", root / name)
        wrong = [1, 2] if change is None else {**manifest, "schema_version": 2, **change}
        (root / name / "manifest.json").write_text(json.dumps(wrong))
    (root / "data" / "topv2").mkdir(parents=True)
    (root / "data" / "topv2" / "test.jsonl").write_text("")
    (root / "data" / "empty.jsonl").write_text("")
    (root / "data" / "blank.jsonl").write_text("\n  \n\t\n")
    (root / "data" / "bad-map.json").write_text("{bad")
    make_gpt2(root / "gpt2")
    assert RunStore(root / "run").has_cells()
    return root


def read_only_dir(path: Path):
    """A directory nobody may write, root included (a read-only tmpfs); None where none can be made."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return path, lambda: path.chmod(0o755)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    if made.returncode != 0:
        return None, None
    return path, lambda: subprocess.run(["umount", str(path)], check=False)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_dir() and not any(p.iterdir())}


def hold_lock(directory: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from skipbench.store import RunStore\n"
         "with RunStore(sys.argv[1]).lock():\n    print('locked', flush=True); time.sleep(120)", str(directory)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, stored, tmp_path, monkeypatch):
    if case.skip:
        pytest.skip(case.skip)
    work = tmp_path / "work"
    work.mkdir()
    paths = {"out": work / "out", "gpt2": stored / "gpt2"}
    paths |= {f"data:{path.name}": path for path in (stored / "data").iterdir()} | {"data:": stored / "data"}
    for name in ("run", "other", "empty", "old", "damaged", "badsetup", "badprompts", "badtop", "badcells"):
        paths[name] = work / name
        shutil.copytree(stored / name, paths[name])
    for name, text in SWEEP_FILES.items():
        paths[f"file:{name}"] = work / f"{name}.toml"
        paths[f"file:{name}"].write_text(text)
    for name, mapping in JSON_FILES.items():
        paths[f"json:{name}"] = work / f"{name}.json"
        paths[f"json:{name}"].write_text(json.dumps(mapping))
    cleanup = None
    if any("{readonly}" in str(arg) for arg in case.args):
        paths["readonly"], cleanup = read_only_dir(tmp_path / "readonly")
        if paths["readonly"] is None:
            pytest.skip("no read-only directory can be made here")
    args = []
    for arg in case.args:
        for name, path in paths.items():
            arg = arg.replace("{" + name + "}", str(path))
        args.append(arg)
    for target, value in case.patch.items():
        monkeypatch.setattr(target, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a Hub id never reaches the network here
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(work)  # a default run directory would appear as runs/ here
    holder = hold_lock(Path(case.hold_lock.format(run=paths["run"]))) if case.hold_lock else None
    before = snapshot(tmp_path) | {f"stored/{name}": value for name, value in snapshot(stored).items()}
    try:
        result = runner.invoke(app, args)
    finally:
        if holder is not None:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        after = snapshot(tmp_path) | {f"stored/{name}": value for name, value in snapshot(stored).items()}
        if cleanup is not None:
            cleanup()

    shown = f"stdout={result.stdout!r}\nstderr={result.stderr!r}\nexception={result.exception!r}"
    assert result.exit_code == 2, shown
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], shown
    assert case.message in errors[0], shown
    allowed = ("Usage:", "Try ") if case.usage else ("run: ", "sweep: ")
    assert all(line.startswith(allowed) for line in lines[:-1]), shown
    assert result.stdout.strip() == "", shown
    assert after == before, "files changed:\n" + "\n".join(
        sorted(set(after.items()) ^ set(before.items()), key=str))
    if holder is not None:
        assert f"pid {holder.pid}" in errors[0]


def test_the_table_covers_every_kind_of_bad_input():
    assert len(CASES) >= 80
    assert {args[0] for args in (case.args for case in CASES)} >= {"run", "sweep", "report", "compare", "benchmark",
                                                                   "roofline"}


# --------------------------------------------------------------------------- not errors: notes


def test_asking_for_more_samples_than_prompts_is_a_note_not_an_error(tmp_path):
    result = runner.invoke(app, ["run", "--model", TINY, "-p", "x", "-e", "1", "-n", "1000000", *QUICK,
                                 "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "note: --num-samples 1000000 but 1 prompt(s) given: decoding all 1" in result.stderr


def test_a_sweep_with_prompts_does_not_inherit_the_default_sweeps_sample_count(tmp_path):
    result = runner.invoke(app, ["sweep", "--model", TINY, "-p", "x", "--exits", "1", "--speculations", "2",
                                 "--no-report", *QUICK, "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "--num-samples" not in result.output
