import pytest
import torch

from skipbench.decoding.autoregressive import Autoregressive
from skipbench.decoding.layers import DecoderStack
from skipbench.decoding.loop import generate
from skipbench.decoding.sampling import Sampler
from skipbench.decoding.self_speculative import SelfSpeculative
from skipbench.models import PRESETS, ModelError, load_model, num_layers_of, synthetic_config


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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("someone/tiny-llama", device="cpu")
    assert loaded.num_layers == 4 and loaded.tokenizer.encode("hello", add_special_tokens=False) == [3]
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        load_model("someone/other-model", device="cpu")
