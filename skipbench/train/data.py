"""The training data: corpus files, a tokenizer trained on them, and the token chunks the loop samples.

Documents are tokenized whole, joined as <s> text </s>, and cut into fixed-length chunks; evaluation uses
whole held-out files, so no text of the held-out part is ever trained on.
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from skipbench.errors import UserError


# Defined here, in the module every other one of the package imports, so that none imports in a circle.
class TrainError(UserError):
    """A training run that cannot start (bad option, empty corpus, missing base); the message is one line."""


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2, as in skipbench.models.ByteTokenizer


def corpus_files(corpus: Path | None) -> tuple[Path, list[Path]]:
    """The corpus root and its files in a deterministic (sorted) order.

    Default: the standard library's *.py files, without site-packages (installed packages, not stdlib)."""
    if corpus is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [
            path
            for path in root.rglob("*.py")
            if not {"site-packages", "dist-packages"} & set(path.relative_to(root).parts)
        ]
    else:
        root = Path(corpus).expanduser()
        if not root.is_dir():
            raise TrainError(f"corpus {str(root)!r}: no such directory")
        files = [
            path
            for path in root.rglob("*")
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
        ]
    return root, sorted(files, key=lambda path: path.relative_to(root).as_posix())


def read_texts(files: list[Path]) -> list[str]:
    """The files' contents; binary, non-UTF-8 and blank files are left out."""
    texts = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if b"\0" in data:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            texts.append(text)
    return texts


def split_held_out(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held out): whole files are held out (a seeded choice, at least one); a single file is split
    by characters."""
    if len(texts) == 1:
        cut = int(len(texts[0]) * (1 - fraction))
        return [texts[0][:cut]], [texts[0][cut:]]
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(len(texts) * fraction))])
    return (
        [text for i, text in enumerate(texts) if i not in held],
        [text for i, text in enumerate(texts) if i in held],
    )


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`: <pad>=0, <s>=1, </s>=2, and <s> prepended on encode.

    Byte-level, so any text round-trips; the vocabulary is smaller than `vocab_size` on a tiny corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # The backend directly: batched, and no "longer than model_max_length" warnings for whole files.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Documents as <s> text </s>, concatenated: the model learns where files start and end."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: list[int] = []
    for document in _encode(tokenizer, texts):
        ids.extend(([bos] if bos is not None else []) + document + ([eos] if eos is not None else []))
    return torch.tensor(ids, dtype=torch.long)


def chunked(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The stream as (count, seq_len) rows; the tail shorter than a row is dropped."""
    count = len(stream) // seq_len
    return stream[: count * seq_len].view(count, seq_len)


def batches(num_chunks: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Chunk indices, batch by batch: a fresh seeded permutation each epoch."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(num_chunks, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]
