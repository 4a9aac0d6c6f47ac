"""Draft policies: how many tokens a round drafts, and from which exit layer, decided while decoding.

A policy is part of a method (a cell's `draft_policy`). The round loop asks it before each round
(`plan`: how many drafts at most, from which exit, and below which confidence a draft ends the round)
and tells it after the verdict (`observe`: drafted, kept, and for `dynamic-exit` how often each
candidate exit would have predicted the committed tokens). A policy changes how fast tokens come,
never which: every draft is still verified by the full model.

The one list of policies is `POLICIES`; the CLI, the spec and the method registry check against it.
This module is plain Python (no torch): the engine computes tensors, the policy only counts.

- `static`: K drafts from exit E every round (the grid's cells).
- `confidence:T`: drafting stops once a draft's probability of the token it drafted falls below T
  (greedy: its top-1 probability), that draft included, as transformers' `ConfidenceCriteria`
  (`assistant_confidence_threshold`) does; K is the most a round drafts.
- `heuristic`: transformers' `num_assistant_tokens_schedule="heuristic"`
  (`AssistedCandidateGenerator.update_candidate_strategy`): start at K; after a round whose every draft
  was kept K += 2, otherwise K = max(1, K - 1). Like transformers, no maximum: --speculations is its
  start (the issue asked for it to be the maximum too; transformers has none, and the hf backend must
  count the same rounds).
- `dynamic-exit`: DEL (arXiv 2504.05598), see `DynamicExit`.
"""

from __future__ import annotations

from dataclasses import dataclass

from skipbench.errors import SpecError

STATIC = "static"


@dataclass(frozen=True)
class PolicyKind:
    """One registered policy: which drafters it fits and what it varies."""

    name: str
    description: str
    drafters: tuple[str, ...]  # methods.Method.drafter values it makes sense for
    varies_k: bool
    varies_exit: bool
    in_transformers: bool  # transformers' generate() has it as an option (the hf backend runs it)
    takes_value: bool = False  # "name:VALUE"


POLICIES: dict[str, PolicyKind] = {kind.name: kind for kind in (
    PolicyKind(STATIC, "K drafts from exit E every round", ("exit", "draft_model"), False, False, True),
    PolicyKind("confidence", "stop drafting once a draft's probability falls below T (confidence:T)",
               ("exit", "draft_model"), True, False, True, takes_value=True),
    PolicyKind("heuristic", "transformers' schedule: K+2 after a fully kept round, else K-1 (min 1)",
               ("exit", "draft_model"), True, False, True),
    PolicyKind("dynamic-exit", "DEL: exit layer and K per round from every candidate exit's agreement",
               ("exit",), True, True, False),
)}


def parse(text: str) -> tuple[PolicyKind, float | None]:
    """`static`, `confidence:0.4`, ... -> (kind, value); one line naming what exists otherwise."""
    name, _, value = str(text).strip().partition(":")
    kind = POLICIES.get(name)
    if kind is None:
        raise SpecError(f"unknown draft policy {text!r}; choose one of static, confidence:T, heuristic, dynamic-exit")
    if kind.takes_value != bool(value):
        form = f"{name}:T with 0 < T < 1, e.g. {name}:0.4" if kind.takes_value else name
        raise SpecError(f"draft policy {text!r}: write {form}")
    if not kind.takes_value:
        return kind, None
    try:
        number = float(value)
    except ValueError:
        raise SpecError(f"draft policy {text!r}: {value!r} is not a number") from None
    if not 0 < number < 1:
        raise SpecError(f"draft policy {text!r}: the threshold must lie strictly between 0 and 1")
    return kind, number


def check(text: str, strategy: str, drafter: str | None, backend: str, support: str) -> None:
    """Refuse a policy where it makes no sense. `support`: what the backend runs: "all", "transformers"
    (the options transformers' generate() has) or "static" (static shapes warmed for one K)."""
    kind, _ = parse(text)
    if kind.name == STATIC:
        return
    if drafter not in kind.drafters:
        fits = "self_speculative" if kind.drafters == ("exit",) else "speculative and self_speculative"
        raise SpecError(f"draft policy {kind.name} is for {fits} decoding, not {strategy}")
    if support == "static":
        raise SpecError(f"backend {backend} runs the static draft policy only (its compiled shapes are warmed for one "
                        f"K); use --backend native for {kind.name}")
    if support == "transformers" and not kind.in_transformers:
        raise SpecError(f"backend {backend} (transformers' generate) has no {kind.name} policy; use --backend native")


def varies_exit(text: str) -> bool:
    return parse(text)[0].varies_exit


@dataclass
class Plan:
    """What a round does: draft at most `count` tokens from `exit_layer` (None: the strategy's own), ending
    the round early after a draft whose confidence is below `threshold` (0: never)."""

    count: int
    exit_layer: int | None = None
    threshold: float = 0.0


class Static:
    """Today's behaviour: the same K (and the strategy's own exit) every round."""

    wants_shadow = False

    def __init__(self, num_speculations: int):
        self.k = num_speculations

    def plan(self) -> Plan:
        return Plan(self.k)

    def observe(self, drafted: int, kept: int, shadow: dict[int, tuple[int, int]] | None = None) -> None:
        pass


class Confidence(Static):
    def __init__(self, num_speculations: int, threshold: float):
        super().__init__(num_speculations)
        self.threshold = threshold

    def plan(self) -> Plan:
        return Plan(self.k, threshold=self.threshold)


class Heuristic(Static):
    """transformers' heuristic schedule, to the letter (see the module docstring)."""

    def observe(self, drafted: int, kept: int, shadow: dict[int, tuple[int, int]] | None = None) -> None:
        self.k = self.k + 2 if kept == drafted else max(1, self.k - 1)


class DynamicExit(Static):
    """DEL ("Context-Aware Dynamic Exit Layer", Entezari Zarch et al., arXiv 2504.05598), as implemented here.

    DEL's parts (from the paper's abstract and its code's README; the method section could not be read here):
    shadow tokens, token-per-layer (TPL) and dynamic draft exiting. Here:

    1. Shadow tokens: after each verify pass the engine applies the exit head (final norm + LM head) to the
       hidden states of every candidate exit l (see 6) at the round's positions, and counts how many of the
       committed tokens (the kept drafts and the verifier's own token) each would have predicted (greedy
       match). The draft computed the states below E and the verifier those above, so no layer is rerun; the
       head rows are recorded passes (their FLOPs show in the cell's costs).
    2. Acceptance per exit: alpha_l = matches / trials, each decayed by GAMMA per round, so recent context
       weighs more (DEL is "context-aware"; the decay and its value are this implementation's choice).
    3. Choice of (E, K): maximise expected tokens per unit cost, DEL's TPL: a round drafting k tokens at
       exit l yields (1 - a^(k+1)) / (1 - a) tokens (drafts kept while they agree, plus the verifier's own),
       and costs k (l + h) + L + 2h layer-weight reads (k draft passes through l layers and the head, one
       verify pass through all L layers and the head, the shadow head rows), h = head / layer parameters.
       Deviation: DEL's TPL counts layers only; the head is counted here because on small models (SmolLM2:
       h ~ 8) it is a large share of a draft step.
    4. Deviation: DEL's dynamic draft exiting (stopping a round's drafting early on low confidence) is not
       part of this policy: K is the planned length; `confidence:T` is that mechanism on its own.
    5. The first round, with no statistics yet, drafts one token from the deepest candidate.
    6. Deviation: DEL considers every layer; here at most MAX_CANDIDATES exits, evenly spread over 1..L/2, so
       the shadow rows stay a bounded cost on CPUs and small models, where a head row is expensive.
    Under sampling the estimate is still the greedy match rate (an approximation of acceptance; exactness
    is unaffected: the verifier decides).
    """

    wants_shadow = True
    GAMMA = 0.9
    MAX_CANDIDATES = 8

    def __init__(self, num_speculations: int, num_layers: int, head_layers: float):
        super().__init__(num_speculations)
        self.layers = num_layers
        self.head = head_layers
        top = max(1, num_layers // 2)
        count = min(top, self.MAX_CANDIDATES)
        self.candidates = tuple(sorted({round(1 + (top - 1) * i / max(1, count - 1)) for i in range(count)}))
        self.matches = {layer: 0.0 for layer in self.candidates}
        self.trials = {layer: 0.0 for layer in self.candidates}
        self.choice = (self.candidates[-1], 1)

    def plan(self) -> Plan:
        return Plan(self.choice[1], exit_layer=self.choice[0])

    def alpha(self, layer: int) -> float:
        return self.matches[layer] / self.trials[layer] if self.trials[layer] else 0.0

    def expected_tokens(self, alpha: float, k: int) -> float:
        return k + 1.0 if alpha >= 1 - 1e-9 else (1 - alpha ** (k + 1)) / (1 - alpha)

    def cost(self, layer: int, k: int) -> float:
        return k * (layer + self.head) + self.layers + 2 * self.head

    def observe(self, drafted: int, kept: int, shadow: dict[int, tuple[int, int]] | None = None) -> None:
        if not shadow:
            return
        for layer, (matched, tried) in shadow.items():
            self.matches[layer] = self.GAMMA * self.matches[layer] + matched
            self.trials[layer] = self.GAMMA * self.trials[layer] + tried
        options = [(self.expected_tokens(self.alpha(layer), k) / self.cost(layer, k), -layer, -k)
                   for layer in self.candidates for k in range(1, self.k + 1)]
        _, layer, k = max(options)
        self.choice = (-layer, -k)


def build(text: str, num_speculations: int, num_layers: int = 0, head_layers: float = 0.0) -> Static:
    """The policy object for one generation (policies keep state between rounds: build one per prompt)."""
    kind, value = parse(text)
    if kind.name == "confidence":
        return Confidence(num_speculations, value)
    if kind.name == "heuristic":
        return Heuristic(num_speculations)
    if kind.name == "dynamic-exit":
        return DynamicExit(num_speculations, num_layers, head_layers)
    return Static(num_speculations)
