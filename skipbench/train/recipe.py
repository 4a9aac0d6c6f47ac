"""The LayerSkip training recipe (arXiv 2404.16710): layer dropout and the early-exit loss.

`recipe="layerskip"` adds two things to ordinary next-token training:
- layer dropout (stochastic depth): each decoder layer skips its residual update for a whole sample with
  probability p_l, rising linearly from 0 at the first layer to `layer_dropout_max` at the last (in training);
- an early-exit loss: the final norm and LM head are applied to every layer's output, and the cross-entropy
  of each exit is summed with weights that grow with depth; the last layer is always included.
`recipe="none"` is the control: plain cross-entropy of the last layer, same model, data, steps and optimiser.

The model's own modules are driven layer by layer through the decoding engine's layer runner, so the
trained model stays a plain Llama checkpoint and training runs the same layer calls as decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from skipbench.decoding.layers import causal_mask, run_layers
from skipbench.train.data import TrainError

RECIPES = ("layerskip", "none")
CURRICULA = ("none", "gradual")


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
    positions = torch.arange(length, device=input_ids.device).unsqueeze(0)
    position_embeddings = inner.rotary_emb(hidden, positions)
    # None (SDPA masks itself) or one (1, 1, n, n) row: both broadcast over any batch, so they also fit the
    # subset of samples that a dropped-out layer still runs on; so do the positions and rotary embeddings.
    mask = causal_mask(model.config, 0, length, hidden.device, hidden.dtype)

    def run(layer: torch.nn.Module, states: torch.Tensor) -> torch.Tensor:
        return run_layers([layer], states, mask=mask, positions=positions, position_embeddings=position_embeddings)

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


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of `logits` of positions 0..T-2, each predicting the next label; -100 labels are ignored."""
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
        loss = next_token_loss(exit_logits(model, hidden[:, :-1]), labels)
        per_layer[index + 1] = loss
        total = weight * loss if total is None else total + weight * loss
    return total, per_layer
