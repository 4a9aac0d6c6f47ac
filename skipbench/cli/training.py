"""`skipbench train`: a Llama-family model trained with the LayerSkip recipe, or without it."""

from __future__ import annotations

from pathlib import Path

import typer

from skipbench.cli.core import app, handled
from skipbench.cli.display import run_train, train_config


@app.command()
def train(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Where the checkpoint goes (a transformers directory)."),
    base: str = typer.Option(None, "--base", help="Continual pretraining of a local checkpoint or smollm2-135m."),
    preset: str = typer.Option("recipe-small", "--preset", help="Shape when training from scratch: recipe-small "
                               "(12 layers, hidden 512; GPU) or recipe-cpu (smaller, for a CPU)."),
    corpus: Path = typer.Option(None, "--corpus", help="Directory of text/code files (default: Python's stdlib)."),
    recipe: str = typer.Option("layerskip", "--recipe", help="layerskip (layer dropout + early-exit loss) or none."),
    layer_dropout_max: float = typer.Option(0.2, "--layer-dropout-max", help="Layer dropout rate of the last "
                                            "layer (rising linearly from 0 at the first)."),
    early_exit_scale: float = typer.Option(1.0, "--early-exit-scale", help="Weight of the early-exit losses."),
    curriculum: str = typer.Option("none", "--curriculum", help="none or gradual."),
    steps: int = typer.Option(None, "--steps", help="Optimiser steps (a budget: --steps, --minutes or both)."),
    minutes: float = typer.Option(None, "--minutes", help="Minutes of training (whichever budget ends first)."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per training sequence."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per step."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default 1e-3 from scratch, 1e-4 with --base)."),
    vocab_size: int = typer.Option(8192, "--vocab-size", help="Tokenizer size, trained on the corpus (from "
                                   "scratch only)."),
    seed: int = typer.Option(0, "--seed", help="Seed for weights, data order and layer dropout."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Train (or continue training) a Llama-family model with the LayerSkip recipe, or without it."""
    with handled():
        run_train(train_config(out_dir=out_dir, base=base, preset=preset, corpus=corpus, recipe=recipe,
                               layer_dropout_max=layer_dropout_max, early_exit_scale=early_exit_scale,
                               curriculum=curriculum, steps=steps, minutes=minutes, seq_len=seq_len,
                               batch_size=batch_size, lr=lr, vocab_size=vocab_size, seed=seed, device=device))
