"""What to run: the setup shared by a run's cells, the cells themselves, and range parsing.

Everything here is checked before any model is loaded, so a typo costs a second, not a model load.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

STRATEGIES = ("autoregressive", "speculative", "self_speculative")
BACKENDS = ("native", "hf", "hf_static")  # hf_static: generate() with a static, compiled cache (AR only)


class SpecError(Exception):
    """An invalid option or combination; the message is one line for the user."""


@dataclass(frozen=True)
class Cell:
    """One decoding configuration: a row of a sweep's tables."""

    strategy: str
    exit_layer: int | None = None
    num_speculations: int | None = None
    draft_model: str | None = None
    backend: str = "native"

    def label(self) -> str:
        parts = [self.strategy if self.backend == "native" else f"{self.strategy} ({self.backend})"]
        if self.exit_layer is not None:
            parts.append(f"E={self.exit_layer}")
        if self.draft_model is not None:
            parts.append(f"draft={self.draft_model}")
        if self.num_speculations is not None:
            parts.append(f"K={self.num_speculations}")
        return " ".join(parts)

    def check(self, num_layers: int | None = None) -> None:
        """Refuse impossible knobs; with the model's layer count also an exit layer outside it."""
        if self.strategy not in STRATEGIES:
            raise SpecError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.backend not in BACKENDS:
            raise SpecError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.backend == "hf_static" and self.strategy != "autoregressive":
            raise SpecError("backend hf_static runs autoregressive decoding only (transformers cannot speculate "
                            "with a static cache)")
        if self.strategy == "autoregressive":
            if self.exit_layer is not None or self.draft_model is not None or self.num_speculations is not None:
                raise SpecError("autoregressive decoding takes no exit layer, draft model or speculations")
            return
        if self.num_speculations is None or self.num_speculations < 1:
            raise SpecError(f"{self.strategy} needs --num-speculations K >= 1 (got {self.num_speculations})")
        if self.strategy == "speculative":
            if not self.draft_model:
                raise SpecError("strategy speculative needs a draft model: --draft-model NAME")
            if self.exit_layer is not None:
                raise SpecError("strategy speculative takes no --exit-layer (that is self_speculative)")
        if self.strategy == "self_speculative":
            if self.exit_layer is None:
                raise SpecError("strategy self_speculative needs --exit-layer E")
            if self.draft_model is not None:
                raise SpecError("strategy self_speculative takes no --draft-model (it drafts with its own layers)")
            top = f"{num_layers - 1}" if num_layers else "num_layers-1"
            if self.exit_layer < 1 or (num_layers is not None and self.exit_layer >= num_layers):
                raise SpecError(f"--exit-layer {self.exit_layer} is outside 1..{top} for this model")


@dataclass(frozen=True)
class Setup:
    """What every cell of a run shares: model, prompts and decoding settings."""

    model: str = "smollm2-135m"
    dataset: str | None = None  # None: the --prompt texts
    prompts: tuple[str, ...] = ()
    num_samples: int | None = None
    seed: int = 0
    n_shot: int = 0
    template: str | None = None
    max_prompt_tokens: int | None = None
    prompt_policy: str = "left"  # what --max-prompt-tokens does to longer prompts: "left" cut, "refuse"
    data_dir: str | None = None
    max_new_tokens: int | None = None  # None: the task's default
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    dtype: str = "auto"
    device: str = "auto"
    warmup: int = 1
    threads: int | None = None  # CPU threads for torch; None keeps torch's default
    execute_code: bool = False
    stop_sequences: tuple[str, ...] | None = None  # None: the task's default

    def check(self) -> None:
        if self.dataset is None and not self.prompts:
            raise SpecError("nothing to decode: give --prompt TEXT or --dataset NAME")
        if self.dataset is not None and self.prompts:
            raise SpecError("give either --prompt or --dataset, not both")
        if self.num_samples is not None and self.num_samples < 1:
            raise SpecError(f"--num-samples must be >= 1 (got {self.num_samples})")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise SpecError(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")
        if self.threads is not None and self.threads < 1:
            raise SpecError(f"--threads must be >= 1 (got {self.threads})")
        if self.warmup < 0:
            raise SpecError(f"--warmup must be >= 0 (got {self.warmup})")
        if self.sample and not self.temperature > 0:
            raise SpecError(f"--temperature must be > 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise SpecError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.prompt_policy not in ("left", "refuse"):
            raise SpecError(f"--prompt-policy must be left or refuse (got {self.prompt_policy!r})")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise SpecError(f"--dtype must be auto, float32, bfloat16 or float16 (got {self.dtype!r})")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise SpecError(f"--device must be auto, cpu or cuda (got {self.device!r})")


def cell_key(setup: Setup, cell: Cell) -> str:
    """Stable id of a finished cell: a hash of everything that defines its numbers."""
    measured = {k: v for k, v in asdict(setup).items() if k not in ("warmup",)}
    text = json.dumps({"setup": measured, "cell": asdict(cell)}, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_baseline(cells: list[Cell], backends: Sequence[str] | None = None) -> list[Cell]:
    """Put the autoregressive baseline first (once per backend) so speedups share prompts and run."""
    if backends is None:
        backends = sorted({cell.backend for cell in cells}, key=BACKENDS.index)
    baselines = [Cell("autoregressive", backend=name) for name in backends]
    rest = [cell for cell in cells if cell not in baselines]
    return [*baselines, *rest]


_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?::(\d+))?$")


def parse_range(text: str) -> list[int]:
    """`2..16` (inclusive), `2..16:2` (step), `1,2,4`, and combinations `1,2,8..12` -> sorted unique ints."""
    values: set[int] = set()
    for part in str(text).replace(" ", "").split(","):
        if not part:
            raise SpecError(f"empty item in range {text!r}")
        match = _RANGE.match(part)
        if match:
            low, high, step = int(match[1]), int(match[2]), int(match[3] or 1)
            if high < low or step < 1:
                raise SpecError(f"range {part!r} in {text!r} is empty or has a step < 1")
            values.update(range(low, high + 1, step))
        elif re.fullmatch(r"-?\d+", part):
            values.add(int(part))
        else:
            raise SpecError(f"cannot read {part!r} in {text!r}: use 2..16, 2..16:2, 1,2,4 or 1,2,8..12")
    return sorted(values)


def override(setup: Setup, **changes) -> Setup:
    """A copy of `setup` with the given non-None values."""
    return replace(setup, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class Grid:
    """The knobs a sweep crosses; `expand` turns them into cells."""

    strategies: tuple[str, ...] = ("self_speculative",)
    exits: tuple[int, ...] = ()
    speculations: tuple[int, ...] = (2, 4, 6)
    draft_models: tuple[str, ...] = ()
    backends: tuple[str, ...] = ("native",)

    def expand(self) -> list[Cell]:
        """Every (strategy, exit, K, draft, backend) asked for, after the autoregressive baseline(s)."""
        cells = []
        for backend in self.backends:
            for strategy in self.strategies:
                if strategy == "self_speculative":
                    if not self.exits:
                        raise SpecError("a self_speculative sweep needs --exits (e.g. 2..16)")
                    cells += [Cell(strategy, e, k, None, backend) for e in self.exits for k in self.speculations]
                elif strategy == "speculative":
                    if not self.draft_models:
                        raise SpecError("a speculative sweep needs at least one --draft-model")
                    cells += [Cell(strategy, None, k, d, backend) for d in self.draft_models
                              for k in self.speculations]
                elif strategy != "autoregressive":
                    raise SpecError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
        return with_baseline(cells, self.backends)


def _as_list(value, name: str) -> list:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list):
        return value
    raise SpecError(f"{name} must be a list or a comma-separated string")


def _as_ints(value, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list):
        return tuple(parse_range(",".join(str(v) for v in value)))
    return tuple(parse_range(str(value)))


def grid_from(values: dict) -> Grid:
    """A Grid from a sweep file's [sweep] table or the CLI (strings like "2..16" or lists)."""
    known = {"strategies", "exits", "speculations", "draft_models", "backends"}
    unknown = set(values) - known
    if unknown:
        raise SpecError(f"unknown sweep key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    grid = Grid()
    changes = {}
    if "strategies" in values:
        changes["strategies"] = tuple(_as_list(values["strategies"], "strategies"))
    if "exits" in values:
        changes["exits"] = _as_ints(values["exits"], "exits")
    if "speculations" in values:
        changes["speculations"] = _as_ints(values["speculations"], "speculations")
    if "draft_models" in values:
        changes["draft_models"] = tuple(_as_list(values["draft_models"], "draft_models"))
        if "strategies" not in values:
            changes["strategies"] = ("self_speculative", "speculative") if "exits" in values else ("speculative",)
    if "backends" in values:
        changes["backends"] = tuple(_as_list(values["backends"], "backends"))
    return replace(grid, **changes)


@dataclass
class SweepFile:
    setup: dict
    grid: dict
    out: str | None
    train: list[dict]  # [[train]] tables: models to train (or reuse) and sweep one after the other


def load_sweep_file(path: str) -> SweepFile:
    """A sweep file: `[setup]` (any Setup field), `[sweep]` (grid keys), an optional top-level `out`, and
    optional `[[train]]` tables (`label` plus `skipbench train` options) naming models to train and sweep."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise SpecError(f"sweep file {path} does not exist")
    try:
        data = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"sweep file {path}: {error}") from None
    unknown = set(data) - {"setup", "sweep", "out", "description", "train"}
    if unknown:
        raise SpecError(f"sweep file {path}: unknown section(s) {', '.join(sorted(unknown))}")
    setup = data.get("setup", {})
    allowed = set(Setup.__dataclass_fields__)
    if set(setup) - allowed:
        raise SpecError(f"sweep file {path}: unknown setup key(s) {', '.join(sorted(set(setup) - allowed))}")
    for key in ("prompts", "stop_sequences"):
        if key in setup:
            setup[key] = tuple(setup[key])
    train = data.get("train", [])
    for entry in train:
        if not {"label", "out_dir"} <= set(entry):
            raise SpecError(f"sweep file {path}: every [[train]] table needs a label and an out_dir")
    return SweepFile(setup, data.get("sweep", {}), data.get("out"), train)
