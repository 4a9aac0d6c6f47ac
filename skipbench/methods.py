"""The method registry: every (strategy, backend) skipbench can run, and what each one needs and does.

Everything that needs to know which methods exist asks here: spec validation, the measurement loop, the
cost columns, the tables, plots and compare. Adding a method (a dynamic draft length, a batched engine)
is one new decoder class plus one `register` call below.

A method builds a `Decoder` for one cell from the loaded models; a decoder turns a prompt into a
`Generation` record with per-step counts and the passes it really ran.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from skipbench.decoding import policy as policies
from skipbench.errors import SpecError, Unsupported

if TYPE_CHECKING:  # torch and the engines load when a decoder is built, not when the CLI parses its options
    import torch

    from skipbench.decoding.record import Generation
    from skipbench.decoding.sampling import Sampler
    from skipbench.models import LoadedModel


class Cell(Protocol):
    """What a method reads of a cell: `spec.Cell` has these (spec sits above the registry and asks it about
    strategies and backends, so the registry names the knobs it needs instead of importing spec)."""

    strategy: str
    backend: str
    exit_layer: int | None
    num_speculations: int | None
    draft_model: str | None
    draft_policy: str


class Decoder(Protocol):
    def generate(self, prompt: list[int], *, max_new_tokens: int, sampler: Sampler, eos_ids: Sequence[int],
                 stop: Callable[[list[int]], bool] | None, seed: int) -> Generation:
        """Decode one prompt, timed device-synchronised."""

    def generate_batch(self, prompts: Sequence[list[int]], *, max_new_tokens: int, samplers: Sequence[Sampler],
                       eos_ids: Sequence[int], stop: Callable[[list[int]], bool] | None,
                       seed: int) -> tuple[list[Generation], float]:
        """Decode prompts together (batch > 1): one record per row and the batch's wall time."""

    def warm(self) -> None:
        """Compile whatever the decoder will run, so no cell's time holds a compilation."""


@dataclass
class BuildContext:
    """What the cells of a run share when their decoders are built: one engine per model and kind (eager or
    compiled), so that a model is compiled once and every cell reuses it, and the one static cache
    capacity (the longest prompt, the token budget and the longest draft) compiled engines need. `prompts`: how
    many the run decodes (a batched cell's last batch holds the rest, a shape compiled engines warm too)."""

    capacity: int = 0
    stacks: dict = field(default_factory=dict)
    prompts: int = 0

    @classmethod
    def for_run(cls, cells: Sequence[Cell], longest_prompt: int, max_new_tokens: int,
                prompts: int = 0) -> BuildContext:
        most = max(cell.num_speculations or 0 for cell in cells)
        return cls(capacity=longest_prompt + max_new_tokens + most + 1, prompts=prompts)

    def batch_rows(self, batch_size: int) -> tuple[int, ...]:
        """The row counts a cell's batches have: B, and the rest of the prompts in the last batch."""
        rest = self.prompts % batch_size if self.prompts and batch_size > 1 else 0
        return (batch_size, rest) if rest else (batch_size,)

    def stack(self, loaded: LoadedModel, compiled: bool = False):
        from skipbench.decoding.layers import DecoderStack

        if (loaded.name, compiled) not in self.stacks:  # refuses architectures the engine cannot drive
            # A model spread over devices (--device-map) runs each device's layers there (`placement`).
            self.stacks[loaded.name, compiled] = DecoderStack(loaded.model, compile=compiled, capacity=self.capacity,
                                                              placement=loaded.placement)
        return self.stacks[loaded.name, compiled]

    def compile_seconds(self) -> dict[str, float]:
        return {name: round(stack.compile_seconds, 3) for (name, _), stack in self.stacks.items() if stack.compiled}

    def compiled_graphs(self) -> dict[str, int]:
        """Graphs compiled per model: one per unit and pass shape (rows x positions), shared by every exit."""
        return {name: stack.compiled_graphs for (name, _), stack in self.stacks.items() if stack.compiled}


@dataclass(frozen=True)
class Method:
    """What one (strategy, backend) is.

    `drafter`: who proposes tokens: None (autoregressive), "exit" (the target's own first E layers) or
    "draft_model" (a separate model). `draft_cache`: which extra KV cache it keeps besides the target's:
    None, "draft_model" (the draft model's), or "exit_layers" (a separate cache for layers < E, as
    transformers' assistant_early_exit keeps; the native engine shares one cache).
    """

    strategy: str
    backend: str
    short: str  # a few characters for narrow tables: "AR", "self", "2-model"
    description: str
    drafter: str | None
    draft_cache: str | None
    build: Callable[[Cell, LoadedModel, LoadedModel | None, BuildContext], Decoder]
    # Refuses (EngineError) models whose architecture the method cannot drive, before anything is timed.
    check_models: Callable[[Cell, LoadedModel, LoadedModel | None], None] = lambda cell, target, draft: None
    # Its passes run the model's layers eagerly, as `calibrate` times them: the time model predicts it.
    eager_layers: bool = True
    # Which draft policies (decoding.policy) it runs: "all", "transformers" (generate()'s own options) or "static".
    policy_support: str = "all"
    # Why it cannot decode batches (B > 1); empty: it can. Such cells are recorded as unsupported, with this reason.
    batch_refusal: str = ""

    def check_batch(self, batch_size: int) -> None:
        """Raise Unsupported, with the reason, for a batch this method cannot decode."""
        if batch_size > 1 and self.batch_refusal:
            raise Unsupported(f"unsupported at batch {batch_size}: {self.batch_refusal}")

    @property
    def speculates(self) -> bool:
        return self.drafter is not None

    @property
    def separate_draft_model(self) -> bool:
        return self.drafter == "draft_model"

    def check(self, cell: Cell, num_layers: int | None = None) -> None:
        """Refuse knobs the method does not take or lacks; with the layer count also an exit outside it."""
        if not self.speculates:
            if getattr(cell, "draft_policy", policies.STATIC) != policies.STATIC:
                raise SpecError(f"{self.strategy} decoding drafts nothing: it takes no draft policy")
            if cell.exit_layer is not None or cell.draft_model is not None or cell.num_speculations is not None:
                raise SpecError(f"{self.strategy} decoding takes no exit layer, draft model or speculations")
            return
        if cell.num_speculations is None or cell.num_speculations < 1:
            raise SpecError(f"{self.strategy} needs --num-speculations K >= 1 (got {cell.num_speculations})")
        if self.drafter == "draft_model":
            if not cell.draft_model:
                raise SpecError(f"strategy {self.strategy} needs a draft model: --draft-model NAME")
            if cell.exit_layer is not None:
                raise SpecError(f"strategy {self.strategy} takes no --exit-layer (that is self_speculative)")
        draft_policy = getattr(cell, "draft_policy", policies.STATIC)
        policies.check(draft_policy, self.strategy, self.drafter, self.backend, self.policy_support)
        if self.drafter == "exit" and policies.varies_exit(draft_policy):
            if cell.exit_layer is not None:
                raise SpecError(f"draft policy {draft_policy} chooses the exit layer itself: give no --exit-layer")
            return
        if self.drafter == "exit":
            if cell.exit_layer is None:
                raise SpecError(f"strategy {self.strategy} needs --exit-layer E")
            if cell.draft_model is not None:
                raise SpecError(f"strategy {self.strategy} takes no --draft-model (it drafts with its own layers)")
            top = f"{num_layers - 1}" if num_layers else "num_layers-1"
            if cell.exit_layer < 1 or (num_layers is not None and cell.exit_layer >= num_layers):
                raise SpecError(f"--exit-layer {cell.exit_layer} is outside 1..{top} for this model")


REGISTRY: dict[tuple[str, str], Method] = {}


def register(method: Method) -> Method:
    REGISTRY[(method.strategy, method.backend)] = method
    return method


def strategies() -> tuple[str, ...]:
    return tuple(dict.fromkeys(strategy for strategy, _ in REGISTRY))


def backends() -> tuple[str, ...]:
    return tuple(dict.fromkeys(backend for _, backend in REGISTRY))


def baseline_strategy() -> str:
    """The strategy every speedup divides by: the one that drafts nothing."""
    return next(method.strategy for method in REGISTRY.values() if not method.speculates)


def compiled_backend(backend: str) -> str:
    """What --compile turns a backend into: skipbench's own engine runs compiled; transformers' stay as they are."""
    return "compiled" if backend == "native" else backend


def method_for(strategy: str, backend: str) -> Method:
    """The registered method, or one line naming what exists."""
    if strategy not in strategies():
        raise SpecError(f"unknown strategy {strategy!r}; choose one of {', '.join(strategies())}")
    if backend not in backends():
        raise SpecError(f"unknown backend {backend!r}; choose one of {', '.join(backends())}")
    method = REGISTRY.get((strategy, backend))
    if method is None:
        offered = [name for (s, name) in REGISTRY if s == strategy]
        raise SpecError(f"backend {backend} does not run {strategy} decoding; for {strategy} choose "
                        f"{', '.join(offered)}")
    return method


# --------------------------------------------------------------------------- native engine


@dataclass
class NativeDecoder:
    """skipbench's own engine: one strategy object over the target's (and a draft's) layers."""

    strategy: object
    num_speculations: int
    device: torch.device
    draft_policy: str = policies.STATIC
    num_layers: int = 0
    head_layers: float = 0.0  # LM head parameters over one decoder layer's (the dynamic-exit policy's cost model)
    batched: object = None  # decoding.batch.BatchEngine: the same strategy on batches
    batch_rows: tuple[int, ...] = (1,)  # the row counts of its batches (what a compiled engine warms)

    def generate(self, prompt, *, max_new_tokens, sampler, eos_ids, stop, seed) -> Generation:
        from skipbench.decoding.loop import generate

        policy = policies.build(self.draft_policy, self.num_speculations, self.num_layers, self.head_layers)
        return generate(self.strategy, prompt, max_new_tokens=max_new_tokens,
                        num_speculations=self.num_speculations, sampler=sampler, eos_ids=eos_ids,
                        device=self.device, stop=stop, policy=policy)

    def generate_batch(self, prompts, *, max_new_tokens, samplers, eos_ids, stop, seed):
        from skipbench.decoding.batch import generate_batch

        return generate_batch(self.batched, prompts, max_new_tokens=max_new_tokens,
                              num_speculations=self.num_speculations, samplers=samplers, eos_ids=eos_ids,
                              device=self.device, stop=stop)

    def warm(self) -> None:
        from skipbench.decoding.layers import EngineError

        plans = [plan for rows in self.batch_rows for plan in self.strategy.shapes(self.num_speculations, rows)]
        for stack, role, shapes in plans:
            try:
                stack.warm(shapes, role)
            except Exception as error:  # a compiler missing or failing: one line, and eager still works
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise EngineError(f"torch.compile failed ({type(error).__name__}: {first[:200]}); run without "
                                  f"--compile") from error


def _engine_drives(cell: Cell, target: LoadedModel, draft: LoadedModel | None) -> None:
    from skipbench.decoding.layers import DecoderStack, EngineError

    for loaded in (target, draft) if draft is not None else (target,):
        try:
            DecoderStack(loaded.model)
        except EngineError as error:
            raise EngineError(f"model {loaded.name!r}: {error}") from None


def _native(kind: str, compiled: bool = False) -> Callable[[Cell, LoadedModel, LoadedModel | None, BuildContext],
                                                              Decoder]:
    def build(cell: Cell, target: LoadedModel, draft: LoadedModel | None, context: BuildContext) -> Decoder:
        from skipbench.decoding.autoregressive import Autoregressive
        from skipbench.decoding.batch import BatchEngine
        from skipbench.decoding.batch_stack import BatchStack
        from skipbench.decoding.self_speculative import SelfSpeculative
        from skipbench.decoding.speculative import TwoModel

        stack = context.stack(target, compiled)
        draft_policy = getattr(cell, "draft_policy", policies.STATIC)
        if kind == "exit":
            # A policy that chooses the exit starts from the deepest candidate; it sets the exit every round.
            strategy = SelfSpeculative(stack, cell.exit_layer or max(1, stack.num_layers // 2))
        elif kind == "draft_model":
            strategy = TwoModel(stack, context.stack(draft, compiled))
        else:
            strategy = Autoregressive(stack)
        batched = None
        if getattr(cell, "batch_size", 1) > 1 and stack.spread:
            raise Unsupported(f"unsupported at batch {cell.batch_size}: skipbench's batched engine runs a model on one "
                              f"device (a model spread over devices decodes one prompt at a time)")
        if getattr(cell, "batch_size", 1) > 1:
            draft_stack = BatchStack(context.stack(draft, compiled)) if kind == "draft_model" else None
            batched = BatchEngine(BatchStack(stack), None if kind == "none" else kind,
                                  getattr(strategy, "exit_layer", None), draft_stack)
        layer = sum(weight.numel() for weight in stack.layers[0].parameters())
        return NativeDecoder(strategy, cell.num_speculations or 0, target.model.device, draft_policy,
                             stack.num_layers, stack.lm_head.weight.numel() / layer, batched,
                             context.batch_rows(getattr(cell, "batch_size", 1)))

    return build


# --------------------------------------------------------------------------- transformers generate()


@dataclass
class HfDecoder:
    target: torch.nn.Module
    draft: torch.nn.Module | None
    exit_layer: int | None
    num_speculations: int
    static_cache: bool
    draft_policy: str = policies.STATIC

    def generate(self, prompt, *, max_new_tokens, sampler, eos_ids, stop, seed) -> Generation:
        from skipbench.hf import generate_hf

        return generate_hf(self.target, prompt, max_new_tokens=max_new_tokens, sampler=sampler, eos_ids=eos_ids,
                           device=self.target.device, exit_layer=self.exit_layer, draft=self.draft,
                           num_speculations=self.num_speculations, seed=seed, static_cache=self.static_cache,
                           stop=stop, draft_policy=self.draft_policy)

    def generate_batch(self, prompts, *, max_new_tokens, samplers, eos_ids, stop, seed):
        from skipbench.hf_batch import generate_hf_batch

        return generate_hf_batch(self.target, prompts, max_new_tokens=max_new_tokens, sampler=samplers[0],
                                 eos_ids=eos_ids, device=self.target.device, seed=seed,
                                 static_cache=self.static_cache, stop=stop)

    def warm(self) -> None:
        pass  # transformers compiles its static cache path itself, in the cell's uncounted warm-up


def _early_exit_works(cell: Cell, target: LoadedModel, draft: LoadedModel | None) -> None:
    from skipbench.decoding.layers import EngineError
    from skipbench.hf import check_early_exit

    try:
        check_early_exit(target.model)
    except EngineError as error:
        raise EngineError(f"model {target.name!r}: {error}") from None


def _hf(static_cache: bool = False) -> Callable[[Cell, LoadedModel, LoadedModel | None, BuildContext], Decoder]:
    def build(cell: Cell, target: LoadedModel, draft: LoadedModel | None, context: BuildContext) -> Decoder:
        return HfDecoder(target.model, draft.model if draft else None, cell.exit_layer, cell.num_speculations or 0,
                         static_cache, getattr(cell, "draft_policy", policies.STATIC))

    return build


register(Method("autoregressive", "native", "AR", "the full model, one token per step (skipbench's engine)",
                drafter=None, draft_cache=None, build=_native("none"), check_models=_engine_drives))
register(Method("speculative", "native", "2-model", "a separate draft model proposes K tokens, the target verifies",
                drafter="draft_model", draft_cache="draft_model", build=_native("draft_model"),
                check_models=_engine_drives))
register(Method("self_speculative", "native", "self", "layers < E draft K tokens; shared KV and exit-query cache",
                drafter="exit", draft_cache=None, build=_native("exit"), check_models=_engine_drives))
# The same engine with static shapes and torch.compile; `--compile` selects it.
ASSISTED_BATCH = ("transformers' assisted generation decodes one prompt at a time (generate() refuses a batch "
                  "larger than 1)")
register(Method("autoregressive", "compiled", "AR", "skipbench's engine, static shapes, torch.compile",
                drafter=None, draft_cache=None, build=_native("none", compiled=True), check_models=_engine_drives,
                eager_layers=False, policy_support="static"))
register(Method("speculative", "compiled", "2-model", "the two-model engine, static shapes, torch.compile",
                drafter="draft_model", draft_cache="draft_model", build=_native("draft_model", compiled=True),
                check_models=_engine_drives, eager_layers=False, policy_support="static"))
register(Method("self_speculative", "compiled", "self", "the self-speculative engine, static shapes, torch.compile",
                drafter="exit", draft_cache=None, build=_native("exit", compiled=True), check_models=_engine_drives,
                eager_layers=False, policy_support="static"))
register(Method("autoregressive", "hf", "AR", "transformers generate()", drafter=None, draft_cache=None, build=_hf()))
register(Method("speculative", "hf", "2-model", "transformers generate(assistant_model=D)",
                drafter="draft_model", draft_cache="draft_model", build=_hf(), policy_support="transformers",
                batch_refusal=ASSISTED_BATCH))
register(Method("self_speculative", "hf", "self", "transformers generate(assistant_early_exit=E): shares weights only",
                drafter="exit", draft_cache="exit_layers", build=_hf(), check_models=_early_exit_works,
                policy_support="transformers", batch_refusal=ASSISTED_BATCH))
register(Method("autoregressive", "hf_static", "AR", "transformers generate() with a static cache (compiled on CUDA)",
                drafter=None, draft_cache=None, build=_hf(static_cache=True), eager_layers=False))
