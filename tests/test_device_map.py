"""`--device-map` on real runs: models loaded where their placement puts them (over CPU "devices" cpu:N, which
skipbench's engine tells apart, so every stage boundary is a real move), the same tokens as one device, the
placement in the manifest, the device set in the rows, and `benchmark --dry-run`."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import make_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

import skipbench.models
from skipbench import dryrun, placement, summary, sweep
from skipbench.cli import app
from skipbench.decoding.autoregressive import Autoregressive
from skipbench.decoding.layers import DecoderStack
from skipbench.decoding.loop import generate
from skipbench.decoding.sampling import Sampler
from skipbench.models import load_model
from skipbench.spec import Cell, Setup
from skipbench.store import RunStore

runner = CliRunner()
TINY = "synthetic:tiny"
QUICK = ("--max-new-tokens", "12", "--warmup", "0", "--repeats", "1", "--threads", "1")
# Embedding and layers 0-1 on cpu:0, layers 2-3 on cpu:1, final norm and head on cpu:2.
MAP = {"": "cpu:0", "model.layers.2": "cpu:1", "model.layers.3": "cpu:1", "model.norm": "cpu:2", "lm_head": "cpu:2"}


@pytest.fixture
def device_map(tmp_path) -> Path:
    path = tmp_path / "map.json"
    path.write_text(json.dumps(MAP))
    return path


def tokens(run_dir: Path) -> dict[str, list]:
    rows = RunStore(run_dir).read_cells()
    return {label: [list(t) for t in group.sort_values("prompt_index")["tokens"]]
            for label, group in rows.groupby("cell_label")}


@pytest.mark.parametrize("method", [("-s", "self_speculative", "-e", "2", "-k", "3"),
                                    ("-s", "autoregressive", "--backend", "hf")])
def test_a_run_with_a_device_map_gives_the_single_device_tokens_and_records_its_placement(tmp_path, device_map,
                                                                                         method):
    common = ["run", "--model", TINY, "-p", "hello world", "-p", "def f(x):", *QUICK, *method]
    single = runner.invoke(app, [*common, "-o", str(tmp_path / "single")])
    spread = runner.invoke(app, [*common, "--device-map", str(device_map), "-o", str(tmp_path / "spread")])
    assert single.exit_code == 0 and spread.exit_code == 0, spread.output
    assert tokens(tmp_path / "spread") == tokens(tmp_path / "single") != {}
    manifest = RunStore(tmp_path / "spread").read_manifest()
    assert manifest["placement"][TINY]["devices"] == ["cpu:0", "cpu:1", "cpu:2"]
    assert manifest["placement"][TINY]["stages"] == [{"layers": [0, 2], "device": "cpu:0"},
                                                    {"layers": [2, 4], "device": "cpu:1"}]
    # A cell's device is the set of devices it used: in every row and the provenance, so the report reads it
    # as one device; and never the single-device run's, so times are never divided across the two.
    rows = [RunStore(tmp_path / name).read_cells() for name in ("single", "spread")]
    devices = summary.run_devices(tmp_path / "spread")
    assert len(devices) == 1 and devices[0].startswith("3 x cpu") and devices[0].endswith("(cpu:0, cpu:1, cpu:2)")
    assert manifest["provenance"]["device"] == devices[0]
    summary.load_summary(tmp_path / "spread")  # one device: no MixedDevices
    assert len(summary.devices_of(pd.concat(rows))) == 2
    assert "placement" not in RunStore(tmp_path / "single").read_manifest()


def test_load_run_builds_each_stack_with_its_placement_and_samples_on_the_heads_device(device_map):
    draft = "synthetic:tiny?layers=2"
    cells = [Cell("autoregressive"), Cell("self_speculative", 2, 3), Cell("speculative", None, 2, draft)]
    results = {}
    for name, where in (("single", None), ("spread", str(device_map))):
        setup = Setup(model=TINY, prompts=("hello world",), max_new_tokens=12, warmup=0, repeats=1, threads=1,
                      device="cpu", device_map=where, sample=True, seed=3)
        loaded = sweep.load_run(setup, cells)
        make = loaded.runner(setup)
        runners = [make(cell) for cell in cells]
        results[name] = [run.generate(loaded.prompt_set.prompts[0]).tokens for run in runners]
        if where is None:
            assert loaded.target.placement is None and runners[0].sample_device == torch.device("cpu")
            continue
        # The target as the map says; the draft model its own placement, on what the target left.
        assert loaded.target.placement.layers == ["cpu:0", "cpu:0", "cpu:1", "cpu:1"]
        assert loaded.drafts[draft].placement is not None and set(loaded.manifest["placement"]) == {TINY, draft}
        assert all(run.sample_device == torch.device("cpu:2") for run in runners)  # where the logits are
        target_stack = loaded.context.stacks[TINY, False]
        assert target_stack.spread and target_stack.moves > 0
    assert results["spread"] == results["single"]


def test_a_checkpoint_is_loaded_through_from_pretrained_with_the_placements_device_map(tmp_path, monkeypatch):
    make_model("gqa").save_pretrained(tmp_path / "llama")
    words = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(tmp_path / "llama")
    spread = placement.Placement(embed="cpu:0", layers=["cpu:0", "cpu:1", "cpu:1", "cpu:2"], head="cpu:2")
    asked = []
    original = skipbench.models.AutoModelForCausalLM.from_pretrained

    def from_pretrained(*args, **kwargs):
        asked.append(kwargs.get("device_map"))
        return original(*args, **kwargs)

    monkeypatch.setattr(skipbench.models.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    loaded = load_model(str(tmp_path / "llama"), dtype="float32", device="cpu", placement=spread)
    single = load_model(str(tmp_path / "llama"), dtype="float32", device="cpu")
    assert loaded.placement is spread and single.placement is None
    assert asked == [spread.device_map(), None]  # accelerate's map (cpu:N is its cpu), then none
    assert set(spread.device_map().values()) == {"cpu"}

    def decode(stack):
        return generate(Autoregressive(stack), [1, 3, 3, 3], max_new_tokens=8, num_speculations=0,
                        sampler=Sampler(), eos_ids=[], device=torch.device("cpu")).tokens

    stack = DecoderStack(loaded.model, placement=loaded.placement)
    assert decode(stack) == decode(DecoderStack(single.model)) and stack.moves > 0


def test_benchmark_dry_run_prints_its_cells_placement_memory_and_estimate_without_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["benchmark", "--model", "synthetic:tiny?agree=2", "--draft-model",
                                 "synthetic:tiny?agree=2&layers=2", "--exits", "1,2", "--speculations", "2",
                                 "--prompt-tokens", "16", "--new-tokens", "8", "--prompts", "2", "--dry-run",
                                 "--gpus", "2", "--gpu-memory", "1GB", "--peak-bandwidth", "1e11",
                                 "--peak-flops", "1e12"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "dry run: 13 cell(s), nothing loaded" in text and "self_speculative (hf) E=2 K=4" in text
    assert "placement (auto) of synthetic:tiny?agree=2:" in text and "memory per device" in text
    assert "fits: yes" in text and "estimated wall time" in text and "estimated compile time" in text
    assert not (tmp_path / "runs").exists()  # nothing measured, nothing written


def test_the_dry_run_compile_estimate_counts_graphs_that_every_exit_shares(tmp_path, monkeypatch):
    """Compiled graphs are per (rows, positions), not per exit: exits {1, 2, 3} cost the compile time of {1}, and a
    batch size adds its own graphs."""
    monkeypatch.chdir(tmp_path)

    def compile_estimate(exits: str, batches: str = "1") -> str:
        result = runner.invoke(app, ["benchmark", "--model", "synthetic:tiny?agree=2", "--draft-model", "",
                                     "--exits", exits, "--speculations", "2,4", "--no-hf", "--dry-run",
                                     "--batch-sizes", batches, "--prompts", "4", "--gpus", "1", "--peak-bandwidth",
                                     "1e11", "--peak-flops", "1e12"])
        assert result.exit_code == 0, result.output
        return next(line for line in result.stdout.splitlines() if line.startswith("estimated compile time"))

    one = compile_estimate("1")
    assert one == compile_estimate("1,2,3")
    assert f"{9 * dryrun.COMPILE_SECONDS_PER_GRAPH['cuda']:.0f} s" in one  # (inputs, layer, head) x {1, 3, 5}
    assert compile_estimate("1", "1,4") != one
