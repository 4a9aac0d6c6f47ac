"""Train LayerSkip checkpoints offline: the training recipe of LayerSkip (arXiv 2404.16710).

`skipbench train` makes a model whose early layers already predict the final layer's tokens, so the
early-exit self-speculative decoder has a draft worth accepting, without downloading Meta's checkpoints.

The recipe (`recipe="layerskip"`) adds two things to ordinary next-token training:
- layer dropout (stochastic depth): each decoder layer skips its residual update for a whole sample with
  probability p_l, rising linearly from 0 at the first layer to `layer_dropout_max` at the last (in training);
- an early-exit loss: the final norm and LM head are applied to every layer's output, and the cross-entropy
  of each exit is summed with weights that grow with depth; the last layer is always included.
`recipe="none"` is the control: plain cross-entropy of the last layer, same model, data, steps and optimiser.

From scratch, a byte-level BPE tokenizer is trained on the corpus and a Llama of a preset shape is built;
with `base`, an existing checkpoint is trained further (continual pretraining) with its own tokenizer.
The model's own modules are driven layer by layer (embed_tokens, layers[i], norm, lm_head), so the result
is a plain Llama checkpoint, read by `AutoModelForCausalLM.from_pretrained` and `skipbench.models.load_model`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.masking_utils import create_causal_mask
from transformers.utils import logging as hf_logging

from skipbench.models import PRESETS as MODEL_PRESETS
from skipbench.models import ModelError, load_model, resolve_device


class TrainError(Exception):
    """A training run that cannot start (bad option, empty corpus, missing base); the message is one line."""


RECIPES = ("layerskip", "none")
CURRICULA = ("none", "gradual")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2, as in skipbench.models.ByteTokenizer

# Shapes for training from scratch; the vocabulary size comes from the tokenizer trained on the corpus.
# Any shape of skipbench.models.PRESETS (e.g. "tiny", "smollm2-135m") is accepted too.
TRAIN_PRESETS: dict[str, dict] = {
    # The GPU target: ~42M parameters (with an 8k vocab), head dim 64.
    "recipe-small": dict(
        num_hidden_layers=12,
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=1536,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    ),
    # Trains in a few minutes on a 2-core CPU and still shows the early-exit ordering: ~8M parameters;
    # with --vocab-size 4096 --seq-len 128 --batch-size 16, ~200 layerskip steps (400k tokens) in 8.5 minutes.
    "recipe-cpu": dict(
        num_hidden_layers=8,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=768,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    ),
}

# Help text of each TrainConfig field, for the CLI's options (`typer.Option(help=OPTION_HELP["steps"])`).
OPTION_HELP: dict[str, str] = {
    "out_dir": (
        "Directory to write the checkpoint into (must not exist or be empty); written atomically via OUT_DIR.partial."
    ),
    "base": (
        "Checkpoint to continue pretraining: a local checkpoint directory or 'smollm2-135m'. "
        "Without it, a model of --preset shape is trained from scratch with a new tokenizer."
    ),
    "preset": (
        f"Model shape when training from scratch: {', '.join(TRAIN_PRESETS)} "
        f"(or any skipbench model preset, e.g. tiny). recipe-small is the GPU target, "
        f"recipe-cpu trains in minutes on a CPU."
    ),
    "corpus": (
        "Directory of text/code files to train on (read recursively, binary and non-UTF-8 files "
        "skipped). Default: the Python standard library's *.py files."
    ),
    "recipe": "layerskip: layer dropout + early-exit loss; none: plain last-layer cross-entropy (the control).",
    "layer_dropout_max": (
        "Layer dropout rate of the last layer; rates rise linearly from 0 at the first layer. layerskip recipe only."
    ),
    "early_exit_scale": (
        "Weight of the early-exit loss terms relative to the last layer's (0 = plain "
        "last-layer loss). layerskip recipe only."
    ),
    "curriculum": (
        "none: every exit is trained from the first step; gradual: exits are enabled one by one, "
        "from the last layer down, all enabled by half way."
    ),
    "steps": "Number of optimiser steps. With --minutes too, whichever budget runs out first stops training.",
    "minutes": (
        "Time budget of the training loop in minutes (tokenizer training, data preparation and "
        "evaluation are extra). Runs under a time budget are not repeatable."
    ),
    "seq_len": "Tokens per training sequence.",
    "batch_size": "Sequences per optimiser step.",
    "lr": (
        "Peak learning rate (AdamW, warm-up then cosine decay to 10%). Default: 1e-3 from scratch, 1e-4 with --base."
    ),
    "vocab_size": "Vocabulary size of the byte-level BPE tokenizer trained on the corpus (from scratch only).",
    "seed": "Seed of the model initialisation, data split, batch order and layer dropout.",
    "device": "auto, cpu or cuda; on CUDA the forward pass runs under bf16 autocast (fp32 weights).",
    "held_out_fraction": "Fraction of the corpus files held out for evaluation (split by file, no leakage).",
    "eval_tokens": "At most this many held-out tokens are used for the final evaluation.",
}


@dataclass
class TrainConfig:
    """One training run; see OPTION_HELP for what each field means."""

    out_dir: Path
    base: str | None = None
    preset: str = "recipe-small"
    corpus: Path | None = None
    recipe: str = "layerskip"
    layer_dropout_max: float = 0.2
    early_exit_scale: float = 1.0
    curriculum: str = "none"
    steps: int | None = None
    minutes: float | None = None
    seq_len: int = 256
    batch_size: int = 16
    lr: float | None = None
    vocab_size: int = 8192
    seed: int = 0
    device: str = "auto"
    held_out_fraction: float = 0.05
    eval_tokens: int = 32768


@dataclass
class TrainResult:
    """What a run produced; agreement and loss are keyed by layer number 1..L (L = the final layer)."""

    out_dir: Path
    steps: int
    tokens_seen: int
    seconds: float  # time of the training loop
    held_out_loss: float  # cross-entropy of the final layer on the held-out files
    agreement_by_layer: dict[int, float]  # top-1 agreement of each layer's exit with the final layer
    loss_by_layer: dict[int, float]  # held-out cross-entropy of each layer's exit
    loss_curve: list[float] = field(default_factory=list)  # training loss of every step
    model: LlamaForCausalLM | None = field(default=None, repr=False)  # the trained model, in eval mode
    tokenizer: object = field(default=None, repr=False)


# --- the recipe -----------------------------------------------------------------------------------------


def layer_dropout_rates(num_layers: int, max_rate: float) -> list[float]:
    """Per-layer dropout rates: 0 at the first layer, rising linearly to `max_rate` at the last.

    Linear rather than the paper's exponential S(l): simpler to reason about, and the same end points.
    A one-layer model gets [0.0] (its only layer is also the first)."""
    if num_layers == 1:
        return [0.0]
    return [max_rate * layer / (num_layers - 1) for layer in range(num_layers)]


def early_exit_weights(
    num_layers: int, step: int, total_steps: int, curriculum: str, scale: float = 1.0
) -> list[float]:
    """Weights of each layer's exit loss, summing to 1.

    Before normalising, layer l (0-based) weighs `scale * (l + 1) / L` and the last layer 1, so deeper
    exits count more and, with scale 1, weight l is 2(l+1)/(L(L+1)). Normalising keeps the loss on the
    scale of a plain cross-entropy, so the learning rate means the same for both recipes.
    Curriculum "gradual" (the paper's): only the last layer at step 0, then exits are enabled from the
    last layer down, layer l once step >= (L-1-l) * total_steps / (2L); all are on by half way."""
    if curriculum not in CURRICULA:
        raise TrainError(f"unknown curriculum {curriculum!r}; choose {' or '.join(CURRICULA)}")
    last = num_layers - 1
    raw = []
    for layer in range(last):
        # Integer comparison so that the switch-on step is exact.
        enabled = curriculum == "none" or step * 2 * num_layers >= (last - layer) * total_steps
        raw.append(scale * (layer + 1) / num_layers if enabled else 0.0)
    raw.append(1.0)
    total = sum(raw)
    return [weight / total for weight in raw]


def _causal_mask(model: LlamaForCausalLM, hidden: torch.Tensor, position_ids: torch.Tensor):
    # transformers builds the mask its attention implementation wants: None for SDPA on full sequences
    # (SDPA's is_causal then masks), an explicit tensor for eager. One row, broadcast over any batch, so
    # it also fits the subset of samples that a dropped-out layer still runs on.
    return create_causal_mask(
        config=model.config,
        inputs_embeds=hidden[:1],
        attention_mask=None,
        past_key_values=None,
        position_ids=position_ids,
    )


def layer_outputs(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    dropout_rates: list[float] | None = None,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Hidden states after each decoder layer (before the final norm), with per-sample layer dropout.

    A dropped layer leaves a sample's hidden state unchanged and is not even computed for it."""
    inner = model.model
    hidden = inner.embed_tokens(input_ids)
    batch, length = input_ids.shape
    position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0)
    position_embeddings = inner.rotary_emb(hidden, position_ids)
    mask = _causal_mask(model, hidden, position_ids)

    def run(layer: torch.nn.Module, states: torch.Tensor) -> torch.Tensor:
        out = layer(states, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
        return out[0] if isinstance(out, tuple) else out  # transformers 4 returned a tuple

    outputs = []
    for index, layer in enumerate(inner.layers):
        rate = dropout_rates[index] if dropout_rates is not None else 0.0
        if rate > 0.0:
            # Draw on the CPU generator so that the masks are the same on any device.
            keep = torch.rand(batch, generator=generator) >= rate
            if keep.all():
                hidden = run(layer, hidden)
            elif keep.any():
                rows = keep.nonzero().squeeze(1).to(hidden.device)
                hidden = hidden.index_put((rows,), run(layer, hidden[rows]).to(hidden.dtype))
        else:
            hidden = run(layer, hidden)
        outputs.append(hidden)
    return outputs


def exit_logits(model: LlamaForCausalLM, hidden: torch.Tensor) -> torch.Tensor:
    """What an early exit predicts: the model's final norm and LM head applied to a layer's output."""
    return model.lm_head(model.model.norm(hidden))


def _next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # `logits` of positions 0..T-2, each predicting the next token; -100 labels are ignored, as usual.
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction=reduction
    )


def layerskip_loss(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    recipe: str = "layerskip",
    dropout_rates: list[float] | None = None,
    exit_weights: list[float] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The training loss and each computed exit's cross-entropy, keyed by layer number 1..L.

    `labels` default to `input_ids` and are shifted inside, as transformers does. recipe "none" is plain
    last-layer cross-entropy (rates and weights ignored); "layerskip" applies `dropout_rates` (only while
    `model.training`) and sums the exits' losses with `exit_weights` (default: early_exit_weights without a
    curriculum). Exits of weight 0 are not computed."""
    if recipe not in RECIPES:
        raise TrainError(f"unknown recipe {recipe!r}; choose {' or '.join(RECIPES)}")
    num_layers = model.config.num_hidden_layers
    labels = input_ids if labels is None else labels
    if recipe == "none":
        dropout_rates, exit_weights = None, [0.0] * (num_layers - 1) + [1.0]
    else:
        if exit_weights is None:
            exit_weights = early_exit_weights(num_layers, 0, 1, "none")
        if not model.training:
            dropout_rates = None
    if len(exit_weights) != num_layers or (dropout_rates is not None and len(dropout_rates) != num_layers):
        raise ValueError(f"need one dropout rate and one exit weight per layer ({num_layers})")
    hiddens = layer_outputs(model, input_ids, dropout_rates, generator)
    per_layer: dict[int, torch.Tensor] = {}
    total = None
    for index, (hidden, weight) in enumerate(zip(hiddens, exit_weights, strict=True)):
        if weight == 0.0:
            continue
        # Drop the last position before the head: no target, and no full-size logits gradient to slice.
        loss = _next_token_loss(exit_logits(model, hidden[:, :-1]), labels)
        per_layer[index + 1] = loss
        total = weight * loss if total is None else total + weight * loss
    return total, per_layer


# --- data -----------------------------------------------------------------------------------------------


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


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Documents as <s> text </s>, concatenated: the model learns where files start and end."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: list[int] = []
    for document in _encode(tokenizer, texts):
        ids.extend(([bos] if bos is not None else []) + document + ([eos] if eos is not None else []))
    return torch.tensor(ids, dtype=torch.long)


def _chunks(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    count = len(stream) // seq_len
    return stream[: count * seq_len].view(count, seq_len)


def _batches(num_chunks: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Chunk indices, batch by batch: a fresh seeded permutation each epoch."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(num_chunks, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


# --- building the model ---------------------------------------------------------------------------------


def preset_shape(preset: str) -> dict:
    if preset in TRAIN_PRESETS:
        return dict(TRAIN_PRESETS[preset])
    if preset in MODEL_PRESETS:
        shape = dict(MODEL_PRESETS[preset])
        shape.pop("vocab_size", None)
        return shape
    raise TrainError(f"unknown preset {preset!r}; presets: {', '.join([*TRAIN_PRESETS, *MODEL_PRESETS])}")


def build_model(shape: dict, tokenizer, seq_len: int, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama of `shape`, its vocabulary and special tokens from `tokenizer`."""
    config = LlamaConfig(
        **{**shape, "max_position_embeddings": max(shape.get("max_position_embeddings", 0), seq_len)},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# --- evaluation -----------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: LlamaForCausalLM, chunks: torch.Tensor, batch_size: int, device: torch.device
) -> tuple[float, dict[int, float], dict[int, float]]:
    """Held-out loss of the final layer, and each layer's exit loss and top-1 agreement with the final layer.

    Agreement counts every position: does the argmax of exit l's logits equal the final layer's argmax?
    That is the acceptance a greedy self-speculative draft of depth l would see, token by token."""
    model.eval()
    num_layers = model.config.num_hidden_layers
    loss_sums = [0.0] * num_layers
    agree_counts = [0] * num_layers
    targets = positions = 0
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hiddens = layer_outputs(model, batch)
            final_logits = exit_logits(model, hiddens[-1])
            final_top = final_logits.argmax(-1)
            for index, hidden in enumerate(hiddens):
                logits = final_logits if index == num_layers - 1 else exit_logits(model, hidden)
                loss_sums[index] += _next_token_loss(logits[:, :-1], batch, reduction="sum").item()
                agree_counts[index] += int((logits.argmax(-1) == final_top).sum())
        targets += batch[:, 1:].numel()
        positions += batch.numel()
    loss_by_layer = {index + 1: loss_sums[index] / targets for index in range(num_layers)}
    agreement = {index + 1: agree_counts[index] / positions for index in range(num_layers)}
    return loss_by_layer[num_layers], loss_by_layer, agreement


# --- the run --------------------------------------------------------------------------------------------


def _check(config: TrainConfig) -> None:
    if config.recipe not in RECIPES:
        raise TrainError(f"unknown recipe {config.recipe!r}; choose {' or '.join(RECIPES)}")
    if config.curriculum not in CURRICULA:
        raise TrainError(f"unknown curriculum {config.curriculum!r}; choose {' or '.join(CURRICULA)}")
    if config.steps is None and config.minutes is None:
        raise TrainError("give a budget: --steps, --minutes or both")
    if config.steps is not None and config.steps < 1:
        raise TrainError(f"--steps must be >= 1, not {config.steps}")
    if config.minutes is not None and config.minutes <= 0:
        raise TrainError(f"--minutes must be > 0, not {config.minutes}")
    if config.seq_len < 2 or config.batch_size < 1:
        raise TrainError("--seq-len must be >= 2 and --batch-size >= 1")
    if not 0.0 <= config.layer_dropout_max < 1.0:
        raise TrainError(f"--layer-dropout-max must be within [0, 1), not {config.layer_dropout_max}")
    if config.early_exit_scale < 0:
        raise TrainError(f"--early-exit-scale must be >= 0, not {config.early_exit_scale}")
    if not 0.0 < config.held_out_fraction < 1.0:
        raise TrainError(f"--held-out-fraction must be within (0, 1), not {config.held_out_fraction}")
    if config.lr is not None and config.lr <= 0:
        raise TrainError(f"--lr must be > 0, not {config.lr}")
    if config.base is None:
        preset_shape(config.preset)
        if config.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise TrainError(f"--vocab-size must be >= {256 + len(SPECIAL_TOKENS)} (bytes and special tokens)")
    out_dir = Path(config.out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise TrainError(f"output {str(out_dir)!r} already exists; remove it or choose another directory")


def _split(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out whole files (a seeded choice, at least one); a single file is split by characters."""
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


def _load_base(config: TrainConfig, device: torch.device):
    if config.base.startswith("synthetic:"):
        raise TrainError(
            f"--base {config.base!r}: synthetic models have no tokenizer to train with; "
            f"use a checkpoint directory or smollm2-135m"
        )
    try:
        loaded = load_model(config.base, dtype="float32", device=str(device))
    except ModelError as error:
        raise TrainError(f"--base: {error}") from None
    return loaded.model, loaded.tokenizer


def _learning_rate(peak: float, step: int, warmup: int, done: float) -> float:
    # Linear warm-up, then cosine decay to 10% of the peak over the budget.
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(done, 1.0))))


def _jsonable(config: TrainConfig) -> dict:
    return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()}


def train(config: TrainConfig, progress: Callable[[int, int | None, float, float], None] | None = None) -> TrainResult:
    """Train a model with `config.recipe` and save it to `config.out_dir`.

    `progress(step, total_steps_or_None, loss, tokens_per_second)` is called after every step (total is
    None under a --minutes-only budget). Raises TrainError, with a one-line message, on bad input."""
    _check(config)
    started = time.perf_counter()
    try:
        device = resolve_device(config.device)
    except ModelError as error:
        raise TrainError(str(error)) from None
    out_dir = Path(config.out_dir)

    root, files = corpus_files(config.corpus)
    texts = read_texts(files)
    if not texts:
        raise TrainError(f"corpus {str(root)!r} has no readable text files")
    train_texts, held_texts = _split(texts, config.held_out_fraction, config.seed)

    if config.base is not None:
        model, tokenizer = _load_base(config, device)
        peak_lr = config.lr or 1e-4  # continual pretraining: gentle, not to wash out what the base knows
    else:
        tokenizer = train_tokenizer(train_texts, config.vocab_size)
        model = build_model(preset_shape(config.preset), tokenizer, config.seq_len, config.seed)
        peak_lr = config.lr or 1e-3
    model.to(device=device, dtype=torch.float32)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    train_chunks = _chunks(_token_stream(tokenizer, train_texts), config.seq_len)
    held_stream = _token_stream(tokenizer, held_texts)
    if len(train_chunks) == 0:
        raise TrainError(f"corpus {str(root)!r} is too small: fewer than --seq-len {config.seq_len} training tokens")
    held_stream = held_stream[: max(config.eval_tokens, 2)]
    if len(held_stream) < 2:
        raise TrainError(f"corpus {str(root)!r}: the held-out part is empty; raise --held-out-fraction")
    held_chunks = _chunks(held_stream, min(config.seq_len, len(held_stream)))

    num_layers = model.config.num_hidden_layers
    layerskip = config.recipe == "layerskip"
    rates = layer_dropout_rates(num_layers, config.layer_dropout_max) if layerskip else None
    # Weight decay on matrices only, not on norms' gains.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak_lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, min(100, config.steps // 20)) if config.steps else 100
    # Separate generators: the batches are the same whatever the recipe draws for layer dropout.
    data_generator = torch.Generator().manual_seed(config.seed)
    dropout_generator = torch.Generator().manual_seed(config.seed + 1)
    batches = _batches(len(train_chunks), config.batch_size, data_generator)

    model.train()
    loss_curve: list[float] = []
    step = tokens_seen = 0
    loop_start = time.perf_counter()
    budget_s = config.minutes * 60 if config.minutes is not None else None
    while True:
        elapsed = time.perf_counter() - loop_start
        done = max(step / config.steps if config.steps else 0.0, elapsed / budget_s if budget_s else 0.0)
        if done >= 1.0:
            break
        # Under a time budget the curriculum follows the elapsed fraction, on a 10000-step scale.
        at, total = (step, config.steps) if config.steps and not budget_s else (int(done * 10000), 10000)
        weights = (
            early_exit_weights(num_layers, at, total, config.curriculum, config.early_exit_scale) if layerskip else None
        )
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(peak_lr, step, warmup, done)
        batch = train_chunks[next(batches)].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = layerskip_loss(
                model,
                batch,
                recipe=config.recipe,
                dropout_rates=rates,
                exit_weights=weights,
                generator=dropout_generator,
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens_seen += batch.numel()
        loss_curve.append(loss.item())
        if progress is not None:
            progress(step, config.steps, loss_curve[-1], tokens_seen / max(time.perf_counter() - loop_start, 1e-9))
    seconds = time.perf_counter() - loop_start

    held_out_loss, loss_by_layer, agreement = evaluate(model, held_chunks, config.batch_size, device)
    model.eval()

    record = {
        "config": _jsonable(config),
        "recipe": config.recipe,
        "base": config.base,
        "steps": step,
        "tokens_seen": tokens_seen,
        "seconds": round(seconds, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
        "lr": peak_lr,
        "device": str(device),
        "num_layers": num_layers,
        "num_params": sum(p.numel() for p in model.parameters()),
        "corpus": {
            "root": str(root),
            "files": len(texts),
            "train_files": len(train_texts),
            "held_out_files": len(held_texts),
            "train_tokens": int(train_chunks.numel()),
            "held_out_tokens": int(held_chunks.numel()),
        },
        "held_out_loss": held_out_loss,
        "agreement_by_layer": {str(layer): value for layer, value in agreement.items()},
        "loss_by_layer": {str(layer): value for layer, value in loss_by_layer.items()},
        "loss_curve": loss_curve,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    # Written beside the target, then renamed: a run that dies half way never leaves a half checkpoint.
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" would break the CLI's progress display
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    (partial / "skipbench_train.json").write_text(json.dumps(record, indent=2) + "\n")
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked at the start
    partial.rename(out_dir)

    return TrainResult(
        out_dir=out_dir,
        steps=step,
        tokens_seen=tokens_seen,
        seconds=seconds,
        held_out_loss=held_out_loss,
        agreement_by_layer=agreement,
        loss_by_layer=loss_by_layer,
        loss_curve=loss_curve,
        model=model,
        tokenizer=tokenizer,
    )
