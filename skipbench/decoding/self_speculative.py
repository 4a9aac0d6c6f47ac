"""LayerSkip self-speculative decoding: layers < E of the model itself draft, the full model verifies.

Draft and verifier are one model, so they share more than weights:
- one KV cache: layers < E fill it while drafting, and the verify pass does not redo them;
- the exit-query cache: the verifier resumes from the layer-E hidden states the draft computed, so
  layers < E process each token position exactly once (only the last draft, which the draft never fed
  back in, goes through layers < E during verification).
"""

from __future__ import annotations

import torch

from skipbench.decoding.autoregressive import Autoregressive
from skipbench.decoding.layers import DecoderStack, EngineError
from skipbench.decoding.sampling import Sampler


class SelfSpeculative(Autoregressive):
    def __init__(self, stack: DecoderStack, exit_layer: int):
        if not 1 <= exit_layer < stack.num_layers:
            raise EngineError(f"exit layer {exit_layer} is outside 1..{stack.num_layers - 1} for this model")
        super().__init__(stack)
        self.exit_layer = exit_layer
        self.exit_states: list[torch.Tensor] = []  # layer-E hidden states of positions not yet verified

    def draft(self, last: int, count: int, sampler: Sampler) -> tuple[list[int], list[torch.Tensor] | None]:
        stack = self.stack
        drafts, probs = [], []
        token = last
        for _ in range(count):
            # The exit head is the model's own final norm and LM head applied at layer E.
            hidden, logits = stack.run(stack.embed([token]), self.cache, 0, self.exit_layer, head=1)
            self.exit_states.append(hidden)
            token, token_probs = sampler.choose(logits[0])
            drafts.append(token)
            probs.append(token_probs)
        return drafts, probs if sampler.sample else None

    def verify(self, last: int, drafts: list[int]) -> torch.Tensor:
        stack = self.stack
        unseen = drafts[-1] if drafts else last  # the one position layers < E have not processed
        fresh, _ = stack.run(stack.embed([unseen]), self.cache, 0, self.exit_layer)
        hidden = torch.cat([*self.exit_states, fresh], dim=1)
        self.exit_states = []
        _, logits = stack.run(hidden, self.cache, self.exit_layer, stack.num_layers, head=len(drafts) + 1)
        return logits
