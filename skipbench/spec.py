"""What to run: the setup shared by a run's cells, the cells themselves, and range parsing.

Everything here is checked before any model is loaded, so a typo costs a second, not a model load.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from skipbench import methods
from skipbench.decoding import policy as policies
from skipbench.errors import SpecError
from skipbench.launch_options import options_from

__all__ = ["Cell", "Grid", "Setup", "SpecError", "cell_key", "parse_range"]


@dataclass(frozen=True)
class Cell:
    """One decoding configuration: a row of a sweep's tables."""

    strategy: str
    exit_layer: int | None = None
    num_speculations: int | None = None
    draft_model: str | None = None
    backend: str = "native"
    replica: int = 0  # > 0: an independent copy of the same cell, e.g. an autoregressive A/A control
    draft_policy: str = "static"  # decoding.policy: static (E and K fixed), confidence:T, heuristic, dynamic-exit
    batch_size: int = 1  # prompts decoded together; 1 (the default) keeps the keys of runs before batches

    def label(self) -> str:
        parts = [self.strategy if self.backend == "native" else f"{self.strategy} ({self.backend})"]
        if self.exit_layer is not None:
            parts.append(f"E={self.exit_layer}")
        if self.draft_model is not None:
            parts.append(f"draft={self.draft_model}")
        if self.num_speculations is not None:
            parts.append(f"K={self.num_speculations}")
        if self.draft_policy != "static":
            parts.append(self.draft_policy)
        if self.batch_size != 1:
            parts.append(f"B={self.batch_size}")
        if self.replica:
            parts.append(f"(replica {self.replica})")
        return " ".join(parts)

    def short_label(self) -> str:
        """The name in a few characters, for narrow terminals: `self E=8 K=4`, `2-model K=4 hf`, `AR control`."""
        parts = [self.method.short]
        parts += [f"E={self.exit_layer}"] if self.exit_layer is not None else []
        parts += [f"K={self.num_speculations}"] if self.num_speculations is not None else []
        parts += [self.backend] if self.backend != "native" else []
        parts += [f"B={self.batch_size}"] if self.batch_size != 1 else []
        if self.replica:
            parts.append("control" if not self.method.speculates else f"#{self.replica + 1}")
        return " ".join(parts)

    @property
    def method(self) -> methods.Method:
        return methods.method_for(self.strategy, self.backend)

    def check(self, num_layers: int | None = None) -> None:
        """Refuse impossible knobs; with the model's layer count also an exit layer outside it."""
        if self.batch_size < 1:
            raise SpecError(f"batch size must be >= 1 (got {self.batch_size})")
        if self.batch_size > 1 and self.draft_policy != "static":
            raise SpecError(f"draft policy {self.draft_policy} plans each prompt's rounds alone: batches (B > 1) "
                            f"take the static policy only")
        self.method.check(self, num_layers)

    def identity(self) -> tuple:
        """What the cell is, whatever run it belongs to: how cells are matched across runs and tables."""
        fixed = (self.strategy, self.exit_layer, self.num_speculations, self.draft_model, self.backend, self.replica)
        fixed = fixed if self.draft_policy == "static" else (*fixed, self.draft_policy)  # static: keys of older runs
        return fixed if self.batch_size == 1 else (*fixed, ("batch", self.batch_size))  # batch 1: likewise

    @classmethod
    def from_record(cls, record) -> Cell:
        """The cell of a stored row or manifest entry (missing values may be None or NaN)."""
        get = record.get if hasattr(record, "get") else lambda name: getattr(record, name)

        def whole(value) -> int | None:
            return None if value is None or value != value else int(value)

        draft = get("draft_model")
        try:
            replica = whole(get("replica")) or 0
        except (KeyError, AttributeError):
            replica = 0
        try:
            policy = get("draft_policy")
        except (KeyError, AttributeError):  # rows and manifests of runs before draft policies
            policy = None
        try:
            batch = whole(get("batch_size")) or 1
        except (KeyError, AttributeError):  # rows and manifests of runs before batches
            batch = 1
        return cls(str(get("strategy")), whole(get("exit_layer")), whole(get("num_speculations")),
                   None if draft is None or draft != draft else str(draft), str(get("backend") or "native"), replica,
                   "static" if policy is None or policy != policy else str(policy), batch)


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
    repeats: int = 3  # timed rounds per cell (not part of a cell's identity: more rounds extend a run)
    threads: int | None = None  # CPU threads for torch; None: half the cores (skipbench.machine)
    execute_code: bool = False
    execute_uncontained: bool = False  # where no sandbox exists, run model-written code with rlimits only
    stop_sequences: tuple[str, ...] | None = None  # None: the task's default
    # A model spread over devices: accelerate's auto, balanced, sequential, or a JSON file of module -> device.
    device_map: str | None = None

    def check(self) -> None:
        if self.dataset is None and not self.prompts:
            raise SpecError("nothing to decode: give --prompt TEXT or --dataset NAME")
        if self.dataset is not None and self.prompts:
            raise SpecError("give either --prompt or --dataset, not both")
        if any(not text.strip() for text in self.prompts):
            raise SpecError("an empty --prompt has nothing to continue from; give some text")
        if self.template is not None and "{prompt}" not in self.template:
            raise SpecError(f"--template {self.template!r} has no {{prompt}} placeholder: every prompt would be "
                            f"replaced by it")
        if self.n_shot < 0:
            raise SpecError(f"--n-shot must be >= 0 (got {self.n_shot})")
        if self.n_shot and self.dataset is None:
            raise SpecError("--n-shot needs a --dataset (cnn_dm) to draw solved examples from")
        if self.num_samples is not None and self.num_samples < 1:
            raise SpecError(f"--num-samples must be >= 1 (got {self.num_samples})")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise SpecError(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise SpecError(f"--max-prompt-tokens must be >= 1 (got {self.max_prompt_tokens})")
        if self.threads is not None and self.threads < 1:
            raise SpecError(f"--threads must be >= 1 (got {self.threads})")
        if self.warmup < 0:
            raise SpecError(f"--warmup must be >= 0 (got {self.warmup})")
        if self.repeats < 1:
            raise SpecError(f"--repeats must be >= 1 (got {self.repeats})")
        if not self.temperature > 0:
            raise SpecError(f"--temperature must be > 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise SpecError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.prompt_policy not in ("left", "refuse"):
            raise SpecError(f"--prompt-policy must be left or refuse (got {self.prompt_policy!r})")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise SpecError(f"--dtype must be auto, float32, bfloat16 or float16 (got {self.dtype!r})")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise SpecError(f"--device must be auto, cpu or cuda (got {self.device!r})")
        if self.device_map is not None and self.device_map not in ("auto", "balanced", "sequential") and not (
                self.device_map.endswith(".json") and Path(self.device_map).is_file()):
            raise SpecError(f"--device-map must be auto, balanced, sequential or an existing .json file (got "
                            f"{self.device_map!r})")


# Setup fields that change how long or how often cells are measured, not what their numbers mean.
MEASUREMENT_ONLY = ("warmup", "repeats")
# Fields added later, left out of a run's identity while unset, so runs made before them keep their keys.
UNSET_IS_ABSENT = ("device_map",)


def identity_fields(setup: Setup) -> dict:
    """The setup's fields that define its numbers (what cell keys and run directory names hash)."""
    return {k: v for k, v in asdict(setup).items()
            if k not in MEASUREMENT_ONLY and not (k in UNSET_IS_ABSENT and v is None)}


def described(cell: Cell, replica: bool = True) -> dict:
    """The cell's fields for hashing; the static draft policy and a batch size of 1 are left out, so keys and run
    directories of runs from before draft policies and batches stay valid (and, where `replica` is False, a
    replica of 0 likewise)."""
    return {k: v for k, v in asdict(cell).items()
            if (k != "draft_policy" or v != "static") and (k != "batch_size" or v != 1)
            and (replica or k != "replica" or v)}


def cell_key(setup: Setup, cell: Cell) -> str:
    """Stable id of a finished cell: a hash of everything that defines its numbers."""
    measured = identity_fields(setup)
    described_cell = described(cell, replica=False)  # keys of runs before replicas stay valid too
    text = json.dumps({"setup": measured, "cell": described_cell}, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_baseline(cells: list[Cell], backends: Sequence[str] | None = None, control: bool = False) -> list[Cell]:
    """Put the autoregressive baseline first (once per backend) so speedups share prompts and rounds.

    `control` adds a second, independently timed copy of each baseline: an A/A control whose speedup
    interval must contain 1.00 on a trustworthy machine."""
    if backends is None:
        backends = sorted({cell.backend for cell in cells}, key=methods.backends().index)
    sizes = sorted({cell.batch_size for cell in cells} or {1})
    baselines = [Cell(methods.baseline_strategy(), backend=name, batch_size=size) for size in sizes
                 for name in backends]
    controls = [replace(cell, replica=1) for cell in baselines] if control else []
    rest = [cell for cell in cells if cell not in baselines and cell not in controls]
    return [*baselines, *controls, *rest]


def baseline_of(cell: Cell, cells: Sequence[Cell]) -> Cell | None:
    """The cell whose time per token `cell`'s speedup divides, among `cells` (measured in the same rounds).

    A speculative cell, or an A/A control, divides by the autoregressive cell of its own backend (what
    speculation buys in that implementation), else by the native engine's. An autoregressive cell of another
    backend divides by the native engine's (how fast that implementation is); the native one is its own.
    """
    baselines = [other for other in cells if not other.method.speculates and not other.replica
                 and other.batch_size == cell.batch_size]  # a baseline decodes batches of the same size
    own = [other for other in baselines if other.backend == cell.backend]
    native = [other for other in baselines if other.backend == "native"]
    if not cell.method.speculates and not cell.replica:
        chosen = native or own
    else:
        chosen = own or native or baselines
    return chosen[0] if chosen else None


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
    control: bool = False  # add an autoregressive A/A control per backend
    draft_policies: tuple[str, ...] = ("static",)  # a policy that chooses the exit crosses K only
    batch_sizes: tuple[int, ...] = (1,)  # every cell at each batch size, each with its own baseline

    def expand(self) -> list[Cell]:
        """Every (strategy, exit, K, draft, backend) asked for, after the autoregressive baseline(s)."""
        cells = []
        for backend in self.backends:
            for strategy in self.strategies:
                method = methods.method_for(strategy, backend)
                for name in self.draft_policies:
                    policies.check(name, strategy, method.drafter, backend, method.policy_support)
                    if method.drafter == "exit" and policies.varies_exit(name):
                        cells += [Cell(strategy, None, k, None, backend, 0, name) for k in self.speculations]
                    elif method.drafter == "exit":
                        if not self.exits:
                            raise SpecError(f"a {strategy} sweep needs --exits (e.g. 2..16)")
                        cells += [Cell(strategy, e, k, None, backend, 0, name) for e in self.exits
                                  for k in self.speculations]
                    elif method.drafter == "draft_model":
                        if not self.draft_models:
                            raise SpecError(f"a {strategy} sweep needs at least one --draft-model")
                        cells += [Cell(strategy, None, k, d, backend, 0, name) for d in self.draft_models
                                  for k in self.speculations]
        cells = list(dict.fromkeys(cells))  # a policy or draft model named twice: each cell once
        if any(size < 1 for size in self.batch_sizes):
            raise SpecError(f"batch sizes must be >= 1 (got {', '.join(map(str, self.batch_sizes))})")
        if self.batch_sizes != (1,):
            if max(self.batch_sizes) > 1 and any(cell.draft_policy != "static" for cell in cells):
                raise SpecError("draft policies other than static plan each prompt alone: a sweep with batch "
                                "sizes > 1 takes the static policy only")
            cells = [replace(cell, batch_size=size) for size in self.batch_sizes for cell in cells]
        return with_baseline(cells, self.backends, self.control)


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
    known = {"strategies", "exits", "speculations", "draft_models", "backends", "control", "draft_policies",
             "batch_sizes"}
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
    if "draft_policies" in values:
        changes["draft_policies"] = tuple(_as_list(values["draft_policies"], "draft_policies"))
        for name in changes["draft_policies"]:
            policies.parse(name)
    if "batch_sizes" in values:
        changes["batch_sizes"] = _as_ints(values["batch_sizes"], "batch_sizes")
    if "control" in values:
        if not isinstance(values["control"], bool):
            raise SpecError(f"control must be true or false (got {values['control']!r})")
        changes["control"] = values["control"]
    return replace(grid, **changes)


@dataclass
class SweepFile:
    setup: dict
    grid: dict
    out: str | None
    train: list[dict]  # [[train]] tables: models to train (or reuse) and sweep one after the other
    launch: dict = field(default_factory=dict)  # [launch]: where the cells run (skipbench.launch_options.options_from)


def _kind(hint: str) -> tuple[str, bool]:
    """(base type name, None allowed) of a Setup field's annotation, e.g. "int | None" -> ("int", True)."""
    parts = [part.strip() for part in hint.split("|")]
    return next(part for part in parts if part != "None"), "None" in parts


def setup_from(values: dict, origin: str | None = None) -> Setup:
    """A Setup from a sweep file's [setup] table (or any dict), every value checked against its field's type,
    so that `prompts = "hello"` or `num_samples = "two"` is one clear error, not a silently odd run."""
    where = f"sweep file {origin}: " if origin else ""
    hints = {name: field.type for name, field in Setup.__dataclass_fields__.items()}
    unknown = set(values) - set(hints)
    if unknown:
        raise SpecError(f"{where}unknown setup key(s) {', '.join(sorted(unknown))}")
    checked = {}
    for name, value in values.items():
        kind, optional = _kind(hints[name])
        if value is None and optional:
            checked[name] = None
        elif kind.startswith("tuple"):
            if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
                raise SpecError(f"{where}{name} must be a list of strings, e.g. {name} = [\"...\"] "
                                f"(got {value!r})")
            checked[name] = tuple(value)
        elif kind == "bool":
            if not isinstance(value, bool):
                raise SpecError(f"{where}{name} must be true or false (got {value!r})")
            checked[name] = value
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise SpecError(f"{where}{name} must be a whole number (got {value!r})")
            checked[name] = value
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SpecError(f"{where}{name} must be a number (got {value!r})")
            checked[name] = float(value)
        else:
            if not isinstance(value, str):
                raise SpecError(f"{where}{name} must be a string (got {value!r})")
            checked[name] = value
    return Setup(**checked)


def load_sweep_file(path: str) -> SweepFile:
    """A sweep file: `[setup]` (any Setup field), `[sweep]` (grid keys), an optional top-level `out`, and
    optional `[[train]]` tables (`label` plus `skipbench train` options) naming models to train and sweep, and an
    optional `[launch]` table (launcher, workers, address, gpus_per_worker, partition, time_min, ...)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    file = Path(path)
    if not file.is_file():
        raise SpecError(f"sweep file {path} does not exist")
    try:
        data = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"sweep file {path}: {error}") from None
    unknown = set(data) - {"setup", "sweep", "out", "description", "train", "launch"}
    if unknown:
        raise SpecError(f"sweep file {path}: unknown section(s) {', '.join(sorted(unknown))}")
    setup = data.get("setup", {})
    if not isinstance(setup, dict) or not isinstance(data.get("sweep", {}), dict):
        raise SpecError(f"sweep file {path}: [setup] and [sweep] must be tables")
    # Checked here so a bad value is reported before anything runs; `dataset` may list several tasks.
    setup_from({key: value for key, value in setup.items() if key != "dataset"}, origin=path)
    datasets = setup.get("dataset")
    if datasets is not None and not isinstance(datasets, str) and not (
            isinstance(datasets, list) and all(isinstance(item, str) for item in datasets)):
        raise SpecError(f"sweep file {path}: dataset must be a task name or a list of them (got {datasets!r})")
    train = data.get("train", [])
    for entry in train:
        if not {"label", "out_dir"} <= set(entry):
            raise SpecError(f"sweep file {path}: every [[train]] table needs a label and an out_dir")
    launch = data.get("launch", {})
    if not isinstance(launch, dict):
        raise SpecError(f"sweep file {path}: [launch] must be a table")
    options_from(launch, origin=path)  # checked now, so a typo costs a second, not a model load
    return SweepFile(setup, data.get("sweep", {}), data.get("out"), train, launch)
