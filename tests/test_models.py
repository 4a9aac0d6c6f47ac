import os
import subprocess
import sys

import pytest
import torch
import transformers

from skipbench.decoding.autoregressive import Autoregressive
from skipbench.decoding.layers import DecoderStack
from skipbench.decoding.loop import generate
from skipbench.decoding.sampling import Sampler
from skipbench.decoding.self_speculative import SelfSpeculative
from skipbench.models import PRESETS, ModelError, load_model, num_layers_of, smollm2_dir_name, synthetic_config


def test_presets_have_the_real_shapes():
    config = synthetic_config("synthetic:llama3-8b")
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads, config.vocab_size) == (
        32, 4096, 8, 128256)
    assert {"llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "llama3.2-1b", "codellama-7b",
            "tinyllama-1.1b", "tiny"} <= set(PRESETS)
    assert num_layers_of("synthetic:llama2-70b?layers=8") == 8


def test_synthetic_weights_are_seeded_and_shared_by_name():
    full, again = load_model("synthetic:tiny"), load_model("synthetic:tiny")
    short, other = load_model("synthetic:tiny?layers=2"), load_model("synthetic:tiny?seed=1")
    weight = lambda m, i: m.model.model.layers[i].self_attn.q_proj.weight  # noqa: E731
    assert torch.equal(weight(full, 1), weight(again, 1)) and torch.equal(weight(full, 1), weight(short, 1))
    assert not torch.equal(weight(full, 1), weight(other, 1))
    assert short.num_layers == 2 and full.synthetic


def test_agree_zeroes_the_output_projections_from_that_layer_on():
    model = load_model("synthetic:tiny?agree=2").model
    for index, layer in enumerate(model.model.layers):
        zeroed = not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
        assert zeroed == (index >= 2)
    with pytest.raises(ModelError, match="agree=9"):
        load_model("synthetic:tiny?agree=9")
    with pytest.raises(ModelError, match="unknown option"):
        load_model("synthetic:tiny?agre=2")


def test_smollm2_is_the_real_checkpoint_and_self_speculation_is_lossless_on_it():
    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    assert loaded.num_layers == 30 and not loaded.synthetic
    prompt = loaded.tokenizer.encode("def fibonacci(n):")
    expected = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):]
    stack = DecoderStack(loaded.model)
    common = dict(max_new_tokens=16, sampler=Sampler(), eos_ids=[loaded.tokenizer.eos_token_id],
                  device=torch.device("cpu"))
    ours = generate(Autoregressive(stack), prompt, num_speculations=0, **common)
    assert ours.tokens == expected.tolist()
    assert "return" in loaded.tokenizer.decode(ours.tokens)  # a real model writes real code
    early = generate(SelfSpeculative(stack, 8), prompt, num_speculations=4, **common)
    assert early.tokens == ours.tokens


def test_a_hub_model_in_the_local_cache_loads_offline(tmp_path, monkeypatch):
    from conftest import make_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # The Hugging Face cache layout of an earlier download of "someone/tiny-llama".
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    make_model("gqa").save_pretrained(snapshot)
    words = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(snapshot)
    # In a fresh process with the cache named in the environment, as a user runs it: transformers and the Hub
    # library read their cache location once, when imported (when and from where differs between releases).
    script = (
        "from skipbench.models import ModelError, load_model\n"
        "loaded = load_model('someone/tiny-llama', device='cpu')\n"
        "print(loaded.num_layers, loaded.tokenizer.encode('hello', add_special_tokens=False))\n"
        "try:\n"
        "    load_model('someone/other-model', device='cpu')\n"
        "except ModelError as error:\n"
        "    print(error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "4 [3]"
    assert "not in the Hugging Face cache" in lines[1]


# --------------------------------------------------------------------------- devices and memory


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_any_cuda_device_is_refused_in_one_line_where_there_is_none(device):
    from skipbench.models import resolve_device

    with pytest.raises(ModelError, match=rf"--device {device} was asked for but .*no CUDA"):
        resolve_device(device)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda:-1", "mps", "meta", ""])
def test_an_unknown_device_is_refused_in_one_line(device):
    from skipbench.models import resolve_device

    with pytest.raises(ModelError, match="unknown --device"):
        resolve_device(device)


def test_a_cuda_index_beyond_the_devices_is_refused(monkeypatch):
    from skipbench.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ModelError, match=r"--device cuda:2: torch sees 2 CUDA device\(s\), cuda:0..cuda:1"):
        resolve_device("cuda:2")


def test_a_synthetic_model_too_big_for_memory_is_refused_before_allocating(monkeypatch):
    import skipbench.models as models

    monkeypatch.setattr(models, "available_memory", lambda device: 24 * 10**9)
    monkeypatch.setattr(models.LlamaForCausalLM, "__init__", lambda *a, **k: pytest.fail("allocated"))
    with pytest.raises(ModelError) as refused:
        load_model("synthetic:llama3-8b?agree=8", dtype="float32", device="cpu")
    message = str(refused.value)
    assert "\n" not in message
    assert "needs 32.1 GB for its float32 weights but 24.0 GB of memory is available" in message
    assert "--dtype bfloat16 (16.1 GB)" in message and "synthetic:llama3.2-1b (4.9 GB)" in message


def test_the_weight_size_is_the_parameter_count_times_the_dtype(monkeypatch):
    import skipbench.models as models

    loaded = load_model("synthetic:tiny", dtype="bfloat16")
    assert models.weight_bytes(loaded.model.config, torch.bfloat16) == 2 * loaded.num_params
    assert models.available_memory(torch.device("cpu")) > 0


def test_a_synthetic_model_is_built_in_its_dtype_with_the_float32_weights_rounded():
    full, half = load_model("synthetic:tiny", dtype="float32"), load_model("synthetic:tiny", dtype="bfloat16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert half.model.model.rotary_emb.inv_freq.dtype == torch.float32
    for (name, a), (_, b) in zip(full.model.named_parameters(), half.model.named_parameters(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name


# --------------------------------------------------------------------------- checkpoints that are not here


def test_a_gated_layerskip_checkpoint_offline_says_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as refused:
        load_model("facebook/layerskip-llama3-8B", device="cpu")
    message = str(refused.value)
    assert "\n" not in message
    assert "gated on the Hugging Face Hub" in message and "accept its licence" in message
    assert "log in" in message and "about 16 GB" in message and "--model DIR" in message
    with pytest.raises(ModelError) as other:
        load_model("someone/some-model", device="cpu")
    assert "gated" not in str(other.value) and "--model DIR" in str(other.value)


def test_the_layer_count_of_any_local_architecture_is_read_from_its_config(tmp_path):
    from conftest import make_gpt2

    from skipbench.models import num_layers_of, pretrained_config

    make_gpt2(tmp_path / "gpt2")
    assert num_layers_of(str(tmp_path / "gpt2")) == 3  # GPT-2 calls it n_layer
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    assert num_layers_of(str(tmp_path / "broken")) is None  # loading it will say what is wrong
    with pytest.raises(ModelError, match="could not be loaded"):
        pretrained_config(str(tmp_path / "broken"))


# --------------------------------------------------------------------------- the one-time conversion


@pytest.mark.slow
def test_two_first_conversions_at_once_make_one_checkpoint_and_leave_nothing_behind(tmp_path):
    """Two `skipbench run --model smollm2-135m` started together on an empty cache (with the leftovers of a
    killed conversion in it): one converts and says so, the other waits; both decode."""
    import subprocess
    import sys
    from pathlib import Path

    cache = tmp_path / "cache"
    (cache / f"{smollm2_dir_name()}.partial-killed").mkdir(parents=True)
    (cache / f"{smollm2_dir_name()}.partial-killed" / "model.safetensors").write_bytes(b"\0" * 1000)
    script = Path(sys.executable).with_name("skipbench")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "skipbench.cli"]
    env = {**__import__("os").environ, "SKIPBENCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    runs = [subprocess.Popen([*command, "run", "--model", "smollm2-135m", "-s", "autoregressive", "-p", "def f():",
                              "--max-new-tokens", "2", "--warmup", "0", "--repeats", "1", "--threads", "1",
                              "-o", str(tmp_path / f"run{index}")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for index in range(2)]
    results = [run.communicate(timeout=600) for run in runs]
    for run, (_, stderr) in zip(runs, results, strict=True):
        assert run.returncode == 0, stderr
        assert "Traceback" not in stderr and "it/s]" not in stderr  # no library progress bars either
    stderrs = [stderr for _, stderr in results]
    announced = [s for s in stderrs if f"converting the GGUF of SmolLM2-135M once into {cache}" in s]
    assert len(announced) == 1 and "(about 1 minute, 540 MB)" in announced[0]
    assert sum("waiting for another skipbench process converting SmolLM2-135M" in s for s in stderrs) <= 1
    name = smollm2_dir_name()
    assert name == f"smollm2-135m-transformers{transformers.__version__.split('.')[0]}"
    assert sorted(path.name for path in cache.iterdir()) == [f".{name}.lock", name]
    assert {path.name for path in (cache / name).iterdir()} >= {"config.json", "model.safetensors",
                                                                        "tokenizer.json"}
    assert not [path for path in cache.rglob("*") if "partial" in path.name or path.name.startswith("tmp")]
