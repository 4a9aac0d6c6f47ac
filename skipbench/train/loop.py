"""One training run: its options, the model to train, the optimiser loop, the evaluation and the checkpoint.

From scratch, a byte-level BPE tokenizer is trained on the corpus and a Llama of a preset shape is built;
with `base`, an existing checkpoint is trained further (continual pretraining) with its own tokenizer.
The result is a plain Llama checkpoint, read by `AutoModelForCausalLM.from_pretrained` and
`skipbench.models.load_model`, with `skipbench_train.json` beside it recording how it was made.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import tokenizers
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from skipbench.models import PRESETS as MODEL_PRESETS
from skipbench.models import ModelError, load_model, resolve_device
from skipbench.train.data import (
    SPECIAL_TOKENS,
    TrainError,
    batches,
    chunked,
    corpus_files,
    read_texts,
    split_held_out,
    token_stream,
    train_tokenizer,
)
from skipbench.train.recipe import (
    CURRICULA,
    RECIPES,
    early_exit_weights,
    exit_logits,
    layer_dropout_rates,
    layer_outputs,
    layerskip_loss,
    next_token_loss,
)

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


@dataclass
class TrainConfig:
    """One training run: the options of `skipbench train` and of a sweep file's [[train]] table."""

    out_dir: Path  # must not exist or be empty; written atomically via OUT_DIR.partial
    base: str | None = None  # a checkpoint to continue pretraining (a directory or smollm2-135m); else from scratch
    preset: str = "recipe-small"  # shape from scratch: TRAIN_PRESETS or any skipbench.models preset
    corpus: Path | None = None  # directory of text files, read recursively; default: the stdlib's *.py
    recipe: str = "layerskip"  # or "none", the control
    layer_dropout_max: float = 0.2  # the last layer's rate (layerskip only)
    early_exit_scale: float = 1.0  # weight of the early exits relative to the last layer (layerskip only)
    curriculum: str = "none"  # or "gradual": exits enabled from the last layer down, all by half way
    steps: int | None = None  # with `minutes` too, whichever budget runs out first stops training
    minutes: float | None = None  # the training loop only; runs under a time budget are not repeatable
    seq_len: int = 256
    batch_size: int = 16
    lr: float | None = None  # peak of AdamW's schedule; default 1e-3 from scratch, 1e-4 with a base
    vocab_size: int = 8192  # of the tokenizer trained on the corpus (from scratch only)
    seed: int = 0  # model initialisation, data split, batch order and layer dropout
    device: str = "auto"  # on CUDA the forward pass runs under bf16 autocast (fp32 weights)
    held_out_fraction: float = 0.05  # of the corpus files, held out for evaluation
    eval_tokens: int = 32768  # at most this many held-out tokens are evaluated


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


# --- options --------------------------------------------------------------------------------------------

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", Path: "a path"}


def config_from(options: dict) -> TrainConfig:
    """A TrainConfig from option names and values, as the CLI or a sweep file's [[train]] table gives them.

    A sweep file is read as plain TOML, so the names and types are checked here, each with a one-line
    TrainError; paths may be strings and whole numbers are accepted where a number is."""
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(options) - set(hints))
    if unknown:
        raise TrainError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(hints)}")
    missing = [
        option.name
        for option in fields(TrainConfig)
        if option.default is MISSING and option.default_factory is MISSING and option.name not in options
    ]
    if missing:
        raise TrainError(f"training needs {', '.join(missing)}")
    config = TrainConfig(**{name: _converted(name, value, hints[name]) for name, value in options.items()})
    _check(config)  # every value checked before anything is drawn or read
    return config


def _converted(name: str, value, hint) -> object:
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is Path and isinstance(value, (str, Path)):
            return Path(value)
        # bool is an int to Python, but `steps = true` is a mistake, not 1.
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind in (int, str) and isinstance(value, kind) and not isinstance(value, bool):
            return value
    expected = " or ".join(_TYPE_NAMES[kind] for kind in allowed if kind in _TYPE_NAMES)
    raise TrainError(f"training option {name} must be {expected}, not {value!r}")


# --- checks ---------------------------------------------------------------------------------------------


def preset_shape(preset: str) -> dict:
    """The LlamaConfig arguments of a preset, without a vocabulary size (the tokenizer decides it)."""
    if preset in TRAIN_PRESETS:
        return dict(TRAIN_PRESETS[preset])
    if preset in MODEL_PRESETS:
        shape = dict(MODEL_PRESETS[preset])
        shape.pop("vocab_size", None)
        return shape
    raise TrainError(f"unknown preset {preset!r}; presets: {', '.join([*TRAIN_PRESETS, *MODEL_PRESETS])}")


def _check(config: TrainConfig) -> None:
    # Everything that can be checked before reading the corpus, so a bad option fails at once.
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


# --- the model ------------------------------------------------------------------------------------------


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


def _model_and_tokenizer(config: TrainConfig, train_texts: list[str], device: torch.device):
    """The model to train, its tokenizer and the peak learning rate."""
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
    return model, tokenizer, peak_lr


def _optimizer(model: LlamaForCausalLM, peak_lr: float) -> torch.optim.AdamW:
    # Weight decay on matrices only, not on norms' gains.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak_lr,
        betas=(0.9, 0.95),
    )


def _learning_rate(peak: float, step: int, warmup: int, done: float) -> float:
    # Linear warm-up, then cosine decay to 10% of the peak over the budget.
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(done, 1.0))))


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
                loss_sums[index] += next_token_loss(logits[:, :-1], batch, reduction="sum").item()
                agree_counts[index] += int((logits.argmax(-1) == final_top).sum())
        targets += batch[:, 1:].numel()
        positions += batch.numel()
    loss_by_layer = {index + 1: loss_sums[index] / targets for index in range(num_layers)}
    agreement = {index + 1: agree_counts[index] / positions for index in range(num_layers)}
    return loss_by_layer[num_layers], loss_by_layer, agreement


# --- the run --------------------------------------------------------------------------------------------


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

    root, files = corpus_files(config.corpus)
    texts = read_texts(files)
    if not texts:
        raise TrainError(f"corpus {str(root)!r} has no readable text files")
    train_texts, held_texts = split_held_out(texts, config.held_out_fraction, config.seed)
    model, tokenizer, peak_lr = _model_and_tokenizer(config, train_texts, device)

    train_chunks = chunked(token_stream(tokenizer, train_texts), config.seq_len)
    if len(train_chunks) == 0:
        raise TrainError(f"corpus {str(root)!r} is too small: fewer than --seq-len {config.seq_len} training tokens")
    held_stream = token_stream(tokenizer, held_texts)[: max(config.eval_tokens, 2)]
    if len(held_stream) < 2:
        raise TrainError(f"corpus {str(root)!r}: the held-out part is empty; raise --held-out-fraction")
    held_chunks = chunked(held_stream, min(config.seq_len, len(held_stream)))

    num_layers = model.config.num_hidden_layers
    layerskip = config.recipe == "layerskip"
    rates = layer_dropout_rates(num_layers, config.layer_dropout_max) if layerskip else None
    optimizer = _optimizer(model, peak_lr)
    warmup = max(1, min(100, config.steps // 20)) if config.steps else 100
    # Separate generators: the batches are the same whatever the recipe draws for layer dropout.
    data_generator = torch.Generator().manual_seed(config.seed)
    dropout_generator = torch.Generator().manual_seed(config.seed + 1)
    order = batches(len(train_chunks), config.batch_size, data_generator)

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
        batch = train_chunks[next(order)].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = layerskip_loss(
                model, batch, recipe=config.recipe, dropout_rates=rates, exit_weights=weights,
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
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()},
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
    out_dir = Path(config.out_dir)
    _save(model, tokenizer, record, out_dir)
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


def _save(model: LlamaForCausalLM, tokenizer, record: dict, out_dir: Path) -> None:
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
