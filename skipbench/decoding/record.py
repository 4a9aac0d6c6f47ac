"""The record of one generation: its tokens, its verify steps, and every forward pass it ran.

Both backends fill the same record. Costs (FLOPs, bytes, predicted times) are computed from the
passes recorded here, so they describe what really ran, never a second model of the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

PHASES = ("prefill", "draft", "verify")
# The counts of a generation: the same in every repeat of a greedy run, and between runs of a deterministic one.
COUNTS = ("new_tokens", "drafted", "accepted", "verify_steps")
MODELS = ("target", "draft")  # "draft": a separate draft model (two-model speculation)


@dataclass
class Step:
    context: int  # tokens in the full model's cache when the step began
    drafted: int
    accepted: int  # drafts kept and emitted; the step may also emit one token of the verifier's own
    exit_layer: int | None = None  # the exit the step drafted from, where a draft policy chose it


@dataclass
class Pass:
    """One forward pass: layers [start, end) of `model` over `positions` new tokens after `context` cached
    ones, and the final norm + LM head on the last `head_positions` of them (start == end: the head alone).

    `kept_positions` / `kept_head_positions` are the part whose result survived the step's rollback; the
    rest is wasted work (work on rejected drafts, and a draft head that proposed a rejected token).
    `window` is how many keys each query is scored against: context + positions, or a static cache's whole
    capacity (`static`), which is what a compiled engine computes; `kept_window` the same for the kept part.
    """

    phase: str
    model: str
    start: int
    end: int
    positions: int
    context: int
    head_positions: int = 0
    kept_positions: int = 0
    kept_head_positions: int = 0
    step: int = -1  # -1: prefill
    window: int = 0
    kept_window: int = 0
    static: bool = False
    batch: int = 1  # rows of a batch that ran this pass together: its weights were read once for all of them

    def __post_init__(self) -> None:
        if not self.window:
            self.window = self.context + self.positions
        if not self.kept_window:
            self.kept_window = self.window

    def settle(self, committed: int) -> None:
        """Judge the pass once the cache keeps `committed` positions of its model.

        Layer work on a position below `committed` stays in the cache. A head row at position p predicts
        the token at p + 1: a verify row is used when that token is committed or is the step's own token
        (p + 1 <= committed); a draft row only when its proposal was kept (p + 1 < committed).
        """
        self.kept_positions = max(0, min(self.positions, committed - self.context))
        self.kept_window = self.window if self.static else self.context + self.kept_positions
        first_head = self.context + self.positions - self.head_positions
        limit = committed if self.phase == "verify" else committed - 1
        self.kept_head_positions = max(0, min(self.head_positions, limit - first_head))


class Trace:
    """Collects the passes of one generation as the engine runs them."""

    def __init__(self) -> None:
        self.passes: list[Pass] = []
        self.phase = "prefill"
        self.step = -1
        self.pending: list[Pass] = []  # passes of the current step, judged at commit

    def record(self, model: str, start: int, end: int, positions: int, context: int, head_positions: int = 0,
               capacity: int | None = None) -> None:
        """One pass; `capacity`: the static cache every query of it is scored against (none: the causal window)."""
        entry = Pass(self.phase, model, start, end, positions, context, head_positions, step=self.step,
                     window=capacity or 0, static=capacity is not None)
        if self.phase == "prefill":
            entry.kept_positions, entry.kept_head_positions = positions, head_positions
        else:
            self.pending.append(entry)
        self.passes.append(entry)

    def begin_step(self, step: int) -> None:
        self.step = step

    def settle(self, model: str, committed: int) -> None:
        for entry in self.pending:
            if entry.model == model:
                entry.settle(committed)
        self.pending = [entry for entry in self.pending if entry.model != model]


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)  # emitted ids, EOS excluded
    steps: list[Step] = field(default_factory=list)
    passes: list[Pass] = field(default_factory=list)
    time_s: float = 0.0
    prefill_s: float = 0.0  # until the first generated token is known
    stop_reason: str = "length"  # "length" | "eos" | "stop"
    # Seconds from the start when each emitted token was known on the host (one timestamp per round: a
    # speculative round emits a burst of tokens at one time); empty where the decoder did not record them.
    token_times: list[float] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def drafted(self) -> int:
        return sum(step.drafted for step in self.steps)

    @property
    def accepted(self) -> int:
        return sum(step.accepted for step in self.steps)

    @property
    def verify_steps(self) -> int:
        return len(self.steps)

    @property
    def ended(self) -> bool:
        return self.stop_reason != "length"

    def emit(self, block: Sequence[int], kept: int, eos: set[int], stop: Callable[[list[int]], bool] | None) -> bool:
        """Append one step's committed tokens (its `kept` drafts, then its own token) one at a time.

        Every strategy and backend passes through here, so all are cut at the same token: the first EOS
        (not emitted, but counted as the step's output, so an autoregressive step is one token even then)
        or the first token after which the stop rule fires (emitted). Tokens past the cut were computed but
        never emitted, and drafts past it do not count as accepted. Returns True when generation ends.
        """
        step = self.steps[-1]
        for index, token in enumerate(block):
            if token in eos:
                self.stop_reason = "eos"
            else:
                self.tokens.append(token)
                if stop is not None and stop(self.tokens):
                    self.stop_reason = "stop"
            if self.ended:
                step.accepted = min(kept, index + 1)
                return True
        step.accepted = kept
        return False
