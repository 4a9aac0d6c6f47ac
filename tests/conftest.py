import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Tests never reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One thread: tiny models gain nothing from more, and a busy second core makes two threads crawl.
torch.set_num_threads(1)

# Several shapes the engine must drive: GQA, tied embeddings, odd sizes, multi-query attention.
CONFIGS = {
    "gqa": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=300),
    "tied": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=80, vocab_size=259, tie_word_embeddings=True),
    "odd": dict(hidden_size=48, num_hidden_layers=5, num_attention_heads=3, num_key_value_heads=1,
                intermediate_size=100, vocab_size=301, rope_theta=500000.0),
}


def make_model(name: str, seed: int = 0, **changes) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**(CONFIGS[name] | changes), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@pytest.fixture(params=list(CONFIGS))
def model(request) -> LlamaForCausalLM:
    return make_model(request.param)


def make_gpt2(directory):
    """A tiny GPT-2 checkpoint with a byte-level BPE tokenizer, built offline."""
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["hello world def fibonacci(n): return n"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=128, n_embd=32, n_layer=3, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(directory)
    return Path(directory)
