"""The LayerSkip training recipe: schedules, losses, the training loop and its checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from skipbench.models import load_model
from skipbench.train import TrainConfig, TrainError, config_from, train
from skipbench.train.data import train_tokenizer
from skipbench.train.recipe import early_exit_weights, exit_logits, layer_dropout_rates, layer_outputs, layerskip_loss


def write_corpus(directory: Path, files: int = 6) -> Path:
    """Small, repetitive Python-like files: enough structure for a tiny model to learn in a few steps."""
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        lines = [f"# module {index}: café ☕\n"]
        for number in range(25):
            lines.append(f"def function_{number}(value):\n    return value * {number % 7} + {index}\n\n")
        (directory / f"module_{index}.py").write_text("".join(lines), encoding="utf-8")
    return directory


def tiny_config(tmp_path: Path, **changes) -> TrainConfig:
    config = TrainConfig(
        out_dir=tmp_path / "out",
        preset="tiny",
        corpus=tmp_path / "corpus",
        steps=12,
        seq_len=32,
        batch_size=4,
        vocab_size=300,
        lr=3e-3,
        held_out_fraction=0.2,
        device="cpu",
    )
    return replace(config, **changes)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_corpus(root / "corpus")
    config = tiny_config(root, steps=30, curriculum="gradual")
    seen = []
    result = train(config, progress=lambda *args: seen.append(args))
    return config, result, seen


@pytest.fixture()
def tiny_model():
    torch.manual_seed(0)
    model = load_model("synthetic:tiny", device="cpu").model  # 4 layers, vocab 320
    return model


# --- schedules ------------------------------------------------------------------------------------------


def test_layer_dropout_rates_rise_linearly_from_zero():
    assert layer_dropout_rates(5, 0.2) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert layer_dropout_rates(3, 0.0) == [0.0, 0.0, 0.0]
    assert layer_dropout_rates(1, 0.3) == [0.0]


def test_early_exit_weights_grow_with_depth_and_sum_to_one():
    # Raw (l+1)/L = .25, .5, .75 and 1 for the last layer, over 2.5.
    assert early_exit_weights(4, 0, 10, "none") == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert early_exit_weights(4, 0, 10, "none", scale=0.0) == [0.0, 0.0, 0.0, 1.0]
    # Scale 0.5 on 2 layers: raw .25 and 1.
    assert early_exit_weights(2, 0, 10, "none", scale=0.5) == pytest.approx([0.2, 0.8])
    assert early_exit_weights(1, 0, 10, "none") == [1.0]


def test_gradual_curriculum_enables_exits_from_the_last_layer_down():
    # L=4, T=80: one more layer every T/(2L) = 10 steps, all on at step 30.
    assert early_exit_weights(4, 0, 80, "gradual") == [0.0, 0.0, 0.0, 1.0]
    assert early_exit_weights(4, 9, 80, "gradual") == [0.0, 0.0, 0.0, 1.0]
    assert early_exit_weights(4, 10, 80, "gradual") == pytest.approx([0.0, 0.0, 3 / 7, 4 / 7])
    assert early_exit_weights(4, 20, 80, "gradual") == pytest.approx([0.0, 2 / 9, 3 / 9, 4 / 9])
    assert early_exit_weights(4, 30, 80, "gradual") == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert early_exit_weights(4, 79, 80, "gradual") == pytest.approx([0.1, 0.2, 0.3, 0.4])
    with pytest.raises(TrainError):
        early_exit_weights(4, 0, 80, "sudden")


# --- the layer-by-layer forward and the losses ----------------------------------------------------------


def test_layer_by_layer_forward_matches_the_model_and_is_causal(tiny_model):
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = exit_logits(tiny_model, layer_outputs(tiny_model, ids)[-1])
        theirs = tiny_model(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        # Changing token 10 changes no logits before position 10, and changes position 10.
        changed = ids.clone()
        changed[:, 10] = (changed[:, 10] + 1 - 3) % 317 + 3
        after = exit_logits(tiny_model, layer_outputs(tiny_model, changed)[-1])
    torch.testing.assert_close(after[:, :10], ours[:, :10])
    assert not torch.allclose(after[:, 10], ours[:, 10])


def layer_masks(model) -> list:
    """The attention mask each decoder layer is called with, recorded by a hook on the layers."""
    seen = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    return seen


def test_eager_attention_gets_an_explicit_causal_mask(tiny_model):
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(2))
    masks = layer_masks(tiny_model)
    with torch.no_grad():
        sdpa = exit_logits(tiny_model, layer_outputs(tiny_model, ids)[-1])
        assert masks == [None] * 4  # SDPA masks a fresh sequence itself (is_causal)
        masks.clear()
        tiny_model.config._attn_implementation = "eager"
        eager = exit_logits(tiny_model, layer_outputs(tiny_model, ids)[-1])
        theirs = tiny_model(ids).logits
    # Eager attention masks nothing by itself: each layer gets one (1, 1, n, n) row blocking later keys.
    mask = masks[0]
    assert mask is not None and mask.shape == (1, 1, 16, 16)
    assert all(other is mask for other in masks[:4])
    blocked = torch.ones(16, 16, dtype=torch.bool).triu(1)
    assert bool((mask[0, 0][blocked] < -1e30).all()) and bool((mask[0, 0][~blocked] == 0).all())
    torch.testing.assert_close(eager, sdpa, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eager, theirs, rtol=1e-5, atol=1e-5)


def test_the_eager_mask_fits_the_samples_a_dropped_layer_still_runs_on(tiny_model):
    tiny_model.config._attn_implementation = "eager"
    ids = torch.randint(3, 320, (16, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = layer_outputs(tiny_model, ids)
        half = layer_outputs(tiny_model, ids, [0.0, 0.0, 0.0, 0.5], torch.Generator().manual_seed(0))
    ran = ~(half[3] == half[2]).flatten(1).all(1)
    assert 0 < int(ran.sum()) < 16
    torch.testing.assert_close(half[3][ran], full[3][ran])


def test_recipe_none_is_plain_cross_entropy(tiny_model):
    tiny_model.train()  # no dropout may happen even in training mode
    ids = torch.randint(3, 320, (3, 20), generator=torch.Generator().manual_seed(3))
    loss, per_layer = layerskip_loss(tiny_model, ids, recipe="none", dropout_rates=[0.5] * 4, exit_weights=[0.25] * 4)
    logits = tiny_model(ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert list(per_layer) == [4]


def test_layerskip_loss_is_the_weighted_sum_of_exit_losses(tiny_model):
    tiny_model.eval()  # eval: the dropout rates must be ignored
    ids = torch.randint(3, 320, (2, 20), generator=torch.Generator().manual_seed(4))
    weights = early_exit_weights(4, 0, 1, "none")
    loss, per_layer = layerskip_loss(tiny_model, ids, dropout_rates=[0.9] * 4, exit_weights=weights)
    with torch.no_grad():
        hiddens = layer_outputs(tiny_model, ids)
    expected = 0.0
    for index, hidden in enumerate(hiddens):
        logits = exit_logits(tiny_model, hidden)
        layer_loss = F.cross_entropy(logits[:, :-1].reshape(-1, 320), ids[:, 1:].reshape(-1))
        torch.testing.assert_close(per_layer[index + 1], layer_loss, rtol=1e-5, atol=1e-6)
        expected = expected + weights[index] * layer_loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # Exits of weight 0 are not computed.
    _, only_some = layerskip_loss(tiny_model, ids, exit_weights=[0.0, 0.5, 0.0, 0.5])
    assert list(only_some) == [2, 4]


def test_layer_dropout_skips_whole_layers_per_sample(tiny_model):
    tiny_model.train()
    ids = torch.randint(3, 320, (32, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        dropped = layer_outputs(tiny_model, ids, [0.0, 1.0, 1.0, 1.0], torch.Generator().manual_seed(0))
        for hidden in dropped[1:]:
            torch.testing.assert_close(hidden, dropped[0])  # layers 2..4 skipped for every sample
        full = layer_outputs(tiny_model, ids)
        half = layer_outputs(tiny_model, ids, [0.0, 0.0, 0.0, 0.5], torch.Generator().manual_seed(0))
    unchanged = (half[3] == half[2]).flatten(1).all(1)  # samples whose last layer was skipped
    assert 0 < int(unchanged.sum()) < 32
    torch.testing.assert_close(half[3][~unchanged], full[3][~unchanged])


def test_a_few_steps_change_the_weights_and_lower_the_loss(tiny_model):
    tiny_model.train()
    ids = torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(6))
    before = {name: param.detach().clone() for name, param in tiny_model.named_parameters()}
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2)
    rates, generator = layer_dropout_rates(4, 0.2), torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        loss, _ = layerskip_loss(tiny_model, ids, dropout_rates=rates, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(not torch.equal(before[name], param) for name, param in tiny_model.named_parameters())


# --- the whole run --------------------------------------------------------------------------------------


def test_train_writes_a_checkpoint_and_its_record(trained):
    config, result, seen = trained
    out = config.out_dir
    assert result.out_dir == out and result.steps == 30 and result.tokens_seen == 30 * 4 * 32
    assert not out.with_name(out.name + ".partial").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json", "skipbench_train.json"} <= {
        path.name for path in out.iterdir()
    }
    record = json.loads((out / "skipbench_train.json").read_text())
    assert record["recipe"] == "layerskip" and record["steps"] == 30
    assert record["config"]["curriculum"] == "gradual" and record["config"]["out_dir"] == str(out)
    assert record["held_out_loss"] == pytest.approx(result.held_out_loss)
    assert set(record["agreement_by_layer"]) == {"1", "2", "3", "4"}
    assert {"torch", "transformers"} <= set(record["versions"])
    assert record["corpus"]["held_out_files"] == 1 and record["corpus"]["train_files"] == 5
    assert result.agreement_by_layer[4] == 1.0
    assert all(0.0 <= value <= 1.0 for value in result.agreement_by_layer.values())
    assert result.loss_by_layer[4] == result.held_out_loss
    # The loss falls on this repetitive corpus, and progress saw every step.
    assert sum(result.loss_curve[-5:]) / 5 < result.loss_curve[0] - 0.3
    assert [args[0] for args in seen] == list(range(1, 31))
    assert all(args[1] == 30 and args[3] > 0 for args in seen)


def test_the_checkpoint_reloads_and_generates_the_same_tokens(trained):
    config, result, _ = trained
    prompt = result.tokenizer("def function_3(value):", return_tensors="pt").input_ids

    def greedy(model):
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=12, do_sample=False)[0].tolist()

    expected = greedy(result.model)
    assert greedy(AutoModelForCausalLM.from_pretrained(config.out_dir)) == expected
    loaded = load_model(str(config.out_dir), device="cpu")
    assert greedy(loaded.model) == expected
    assert loaded.tokenizer.encode("x = 1") == result.tokenizer.encode("x = 1")


def test_the_from_scratch_tokenizer_round_trips(trained, tmp_path):
    config, result, _ = trained
    tokenizer = result.tokenizer
    assert len(tokenizer) <= 300
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = "def function_9(value):\n    return 'ünïcode ✓'\n"
    ids = tokenizer.encode(text)
    assert ids[0] == 1 and len(ids) < len(text.encode())  # <s> first; merges learnt
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert AutoTokenizer.from_pretrained(config.out_dir).encode(text) == ids
    # Directly, on a handful of strings: a vocabulary below the requested size is fine.
    small = train_tokenizer(["aaa bbb aaa bbb", "ccc"], 300)
    assert small.decode(small.encode("bbb ccc zz"), skip_special_tokens=True) == "bbb ccc zz"


def test_training_is_repeatable_and_recipe_none_runs(tmp_path):
    write_corpus(tmp_path / "corpus", files=3)
    first = train(tiny_config(tmp_path, out_dir=tmp_path / "a", steps=4, recipe="none"))
    second = train(tiny_config(tmp_path, out_dir=tmp_path / "b", steps=4, recipe="none"))
    assert first.loss_curve == second.loss_curve
    assert first.held_out_loss == second.held_out_loss


def test_continual_pretraining_from_a_local_checkpoint(trained, tmp_path):
    config, base, _ = trained
    result = train(tiny_config(tmp_path, corpus=config.corpus, base=str(config.out_dir), steps=3))
    assert result.tokenizer.get_vocab() == base.tokenizer.get_vocab()
    record = json.loads((result.out_dir / "skipbench_train.json").read_text())
    assert record["base"] == str(config.out_dir) and record["lr"] == 3e-3


def one_line_error(config: TrainConfig) -> str:
    with pytest.raises(TrainError) as caught:
        train(config)
    message = str(caught.value)
    assert message and "\n" not in message
    return message


def test_bad_inputs_raise_one_line_errors(tmp_path):
    (tmp_path / "corpus").mkdir()
    assert "no readable text files" in one_line_error(tiny_config(tmp_path))
    (tmp_path / "corpus" / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "corpus" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "no readable text files" in one_line_error(tiny_config(tmp_path))
    assert "no such directory" in one_line_error(tiny_config(tmp_path, corpus=tmp_path / "missing"))
    write_corpus(tmp_path / "good", files=2)
    good = tiny_config(tmp_path, corpus=tmp_path / "good")
    assert "--base" in one_line_error(replace(good, base=str(tmp_path / "no-such-checkpoint")))
    assert "synthetic" in one_line_error(replace(good, base="synthetic:tiny"))
    assert "budget" in one_line_error(replace(good, steps=None, minutes=None))
    assert "recipe" in one_line_error(replace(good, recipe="fancy"))
    assert "curriculum" in one_line_error(replace(good, curriculum="sudden"))
    assert "preset" in one_line_error(replace(good, preset="huge"))
    assert "too small" in one_line_error(replace(good, seq_len=100_000))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert "already exists" in one_line_error(replace(good, out_dir=tmp_path / "taken"))


def test_config_from_checks_names_and_types(tmp_path):
    config = config_from({"out_dir": str(tmp_path / "out"), "corpus": str(tmp_path), "steps": 5, "lr": 1})
    assert config == TrainConfig(out_dir=tmp_path / "out", corpus=tmp_path, steps=5, lr=1.0)
    assert isinstance(config.out_dir, Path) and isinstance(config.corpus, Path) and isinstance(config.lr, float)
    assert config_from({"out_dir": tmp_path, "corpus": None, "steps": 1}).corpus is None

    def error(options: dict) -> str:
        with pytest.raises(TrainError) as caught:
            config_from(options)
        message = str(caught.value)
        assert message and "\n" not in message
        return message

    unknown = error({"out_dir": "out", "stpes": 5})
    assert "stpes" in unknown and "steps" in unknown  # names the mistake and the known options
    assert "steps" in error({"out_dir": "out", "steps": "two"}) and "'two'" in error({"out_dir": "out", "steps": "two"})
    assert "integer" in error({"out_dir": "out", "steps": 2.5})
    assert "steps" in error({"out_dir": "out", "steps": True})  # a bool is no step count
    assert "lr" in error({"out_dir": "out", "lr": "fast"})
    assert "recipe" in error({"out_dir": "out", "recipe": 1})
    assert "corpus" in error({"out_dir": "out", "corpus": ["a", "b"]})
    assert "out_dir" in error({"steps": 5})
