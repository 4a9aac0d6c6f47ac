"""LayerSkip self-speculative decoding: layers < E of the model itself draft, the full model verifies.

Draft and verifier are one model, so they share more than weights:
- one KV cache: layers < E fill it while drafting, and the verify pass does not redo them;
- the exit-query cache: the verifier resumes from the layer-E hidden states the draft computed, so
  layers < E process each token position exactly once (only the last draft, which the draft never fed
  back in, goes through layers < E during verification).
Drafts stay on the device: each is chosen there and fed back as a tensor.

Draft policies (`decoding.policy`): `threshold` ends drafting after a draft below that confidence (one host
read per draft); the loop may set `exit_layer` before each round; `watch`/`shadow` give the dynamic-exit
policy every candidate exit's greedy prediction at the round's positions from states the round computed.
"""

from __future__ import annotations

import torch

from skipbench.decoding.autoregressive import Autoregressive
from skipbench.decoding.layers import DecoderStack, EngineError
from skipbench.decoding.record import Pass
from skipbench.decoding.sampling import Sampler


class SelfSpeculative(Autoregressive):
    def __init__(self, stack: DecoderStack, exit_layer: int):
        if not 1 <= exit_layer < stack.num_layers:
            raise EngineError(f"exit layer {exit_layer} is outside 1..{stack.num_layers - 1} for this model")
        super().__init__(stack)
        self.exit_layer = exit_layer
        self.exit_states: list[torch.Tensor] = []  # layer-E hidden states of positions not yet verified
        self.watched: tuple[int, ...] = ()  # candidate exits whose states this round taps
        self.shadow_rows = (0, 0)  # (context, positions) of the round's shadow head rows, recorded at commit

    def draft(self, last: torch.Tensor, count: int, sampler: Sampler,
              threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        stack = self.stack
        if not sampler.sample and not threshold:  # greedy: each draft is the argmax of the last, on the device
            states, drafts = stack.chain(last, self.cache, self.exit_layer, count)
            self.exit_states = [states]
            return drafts, None
        drafts, probs = [], []
        token = last
        for _ in range(count):
            # The exit head is the model's own final norm and LM head applied at layer E.
            hidden, logits = stack.run(token, self.cache, 0, self.exit_layer, head=1)
            self.exit_states.append(hidden)
            token, token_probs = sampler.choose(logits)
            drafts.append(token)
            probs.append(token_probs)
            if threshold and sampler.confidence(logits, token, token_probs).item() < threshold:
                break  # transformers' ConfidenceCriteria: the unsure draft is still proposed
        return torch.cat(drafts), torch.cat(probs) if sampler.sample else None

    def watch(self, exits: tuple[int, ...]) -> None:
        """Tap the states after each of `exits` layers at every position this round runs (eager only)."""
        self.watched = exits
        self.stack.taps = {layer: [] for layer in exits}

    def shadow(self) -> torch.Tensor:
        """After verify: (len(exits), positions) the greedy token each watched exit predicts at each of the round's
        positions (the last input, then each draft), from the states the draft and the verifier computed. Its
        head rows are recorded as one pass at commit, where it is known which rows predicted committed tokens."""
        taps, self.stack.taps = self.stack.taps, None
        states = torch.cat([torch.cat(taps[layer], dim=1) for layer in self.watched])  # (exits, positions, d)
        self.shadow_rows = (self.cache.lengths[-1] - states.shape[1], states.shape[1])
        return self.stack.head(states).argmax(dim=-1)

    def commit(self, length: int, inputs: list[int]) -> None:
        super().commit(length, inputs)
        context, positions = self.shadow_rows
        if positions and self.cache.trace is not None:
            rows, used = len(self.watched) * positions, len(self.watched) * min(positions, length - context)
            trace, top = self.cache.trace, self.stack.num_layers
            trace.passes.append(Pass("verify", self.model, top, top, rows, context, rows, kept_positions=used,
                                     kept_head_positions=used, step=trace.step))
        self.shadow_rows = (0, 0)

    def shapes(self, k: int, rows: int = 1) -> list[tuple[DecoderStack, str, set[tuple[str, int, int]]]]:
        # Draft passes and the verify pass over the last draft's low layers (one position each, the exit head on
        # drafts), and the verify block: the same shapes at every exit.
        shapes = {("layers", rows, 1), ("head", rows, 1), ("layers", rows, k + 1), ("head", rows, k + 1)}
        return [(self.stack, self.model, shapes)]

    def verify(self, last: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        stack = self.stack
        unseen = drafts[-1:] if drafts.shape[0] else last  # the one position layers < E have not processed
        fresh, _ = stack.run(unseen, self.cache, 0, self.exit_layer)
        hidden = torch.cat([*self.exit_states, fresh], dim=1)
        self.exit_states = []
        _, logits = stack.run(hidden, self.cache, self.exit_layer, stack.num_layers, head=drafts.shape[0] + 1)
        return logits
