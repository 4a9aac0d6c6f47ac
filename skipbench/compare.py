"""Compare two runs cell by cell: a regression gate with tolerances that noise does not trip.

Cells are matched by what they are (strategy, exit layer, K, draft model, backend, and the
task in multi-task runs), never by their key, so runs made on different machines match. Two
runs are only compared when they decoded the same prompts (prompt-set hash), with the same
model and decoding settings; otherwise :class:`CompareError` is raised.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from skipbench.report import first_difference, summarize
from skipbench.store import RunStore

KEY_COLUMNS = ["strategy", "exit_layer", "num_speculations", "draft_model", "backend"]
COUNT_COLUMNS = ["new_tokens", "drafted", "accepted", "verify_steps"]


class CompareError(ValueError):
    """Two runs that cannot be compared; the message says why, in one line."""


@dataclass
class Comparison:
    """The outcome of :func:`compare_runs`.

    ``rows``: one row per cell of either run with base/new figures, the speedup ratio and its
    confidence interval, a ``verdict`` ("ok", "faster", "FAIL", "missing in new", "only in
    new") and a ``reason``. ``problems``: every failure, one line each (empty when ``ok``).
    ``notes``: what is worth knowing but is no failure.
    """

    base_dir: Path
    new_dir: Path
    rows: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    deterministic: bool = False
    settings: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------- loading and checks


def _norm(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (np.integer, float)) and float(value).is_integer():
        return int(value)
    return value


def cell_identity(row) -> tuple:
    """What a cell is, independent of the run: the match key across runs."""
    get = row.get if isinstance(row, dict) else row.__getitem__
    key = tuple(_norm(get(column)) for column in KEY_COLUMNS)
    try:
        dataset = get("dataset")
    except (KeyError, AttributeError):
        dataset = None
    return key + (dataset,) if dataset is not None else key


def _prompt_hashes(manifest: dict):
    prompts = manifest.get("prompts") or {}
    if "prompt_set_hash" in prompts:
        return prompts["prompt_set_hash"]
    nested = {name: value.get("prompt_set_hash") for name, value in prompts.items() if isinstance(value, dict)}
    return nested or None


def _decoding(manifest: dict) -> dict:
    setup, prompts = manifest.get("setup") or {}, manifest.get("prompts") or {}
    sample = bool(setup.get("sample", False))
    settings = {"sample": sample, "max_new_tokens": prompts.get("max_new_tokens", setup.get("max_new_tokens"))}
    if sample:
        settings |= {"temperature": setup.get("temperature"), "top_p": setup.get("top_p")}
    return settings


def check_comparable(base: dict, new: dict) -> None:
    """Refuse runs on other prompts, another model or other decoding settings."""
    if _prompt_hashes(base) != _prompt_hashes(new):
        raise CompareError(
            f"the runs decoded different prompt sets (prompt-set hash {_prompt_hashes(base)} "
            f"vs {_prompt_hashes(new)}): their numbers cannot be compared"
        )
    targets = [(m.get("models") or {}).get("target") or {} for m in (base, new)]
    for name in ("name", "revision", "num_layers"):
        if targets[0].get(name) != targets[1].get(name):
            raise CompareError(
                f"the runs used different models ({name} {targets[0].get(name)!r} vs {targets[1].get(name)!r})"
            )
    drafts = [(m.get("models") or {}).get("drafts") or {} for m in (base, new)]
    for name in set(drafts[0]) & set(drafts[1]):
        if drafts[0][name].get("revision") != drafts[1][name].get("revision"):
            raise CompareError(
                f"draft model {name} differs between the runs (revision "
                f"{drafts[0][name].get('revision')!r} vs {drafts[1][name].get('revision')!r})"
            )
    if _decoding(base) != _decoding(new):
        raise CompareError(f"the runs decoded with different settings: {_decoding(base)} vs {_decoding(new)}")


def is_deterministic(manifest: dict) -> bool:
    """Greedy decoding in float32 on a CPU: counts and tokens are reproducible exactly."""
    provenance = manifest.get("provenance") or {}
    device = str(provenance.get("device", "")).lower()
    return (
        device.startswith("cpu")
        and str(provenance.get("dtype", "")).removeprefix("torch.") == "float32"
        and not bool((manifest.get("setup") or {}).get("sample", False))
    )


def _prompt_key(frame: pd.DataFrame) -> pd.Series:
    if "dataset" in frame:
        return frame["dataset"].astype(str) + "/" + frame["prompt_index"].astype(str)
    return frame["prompt_index"].astype(int).astype(str)


class _Run:
    """One run's records, indexed by cell identity and prompt."""

    def __init__(self, root: Path | str):
        store = RunStore(root)
        self.root = Path(root)
        self.manifest = store.read_manifest()
        self.frame = store.read_cells()
        self.errors = store.errors()
        self.summary = summarize(self.frame) if not self.frame.empty else pd.DataFrame()
        self.sampled = bool((self.manifest.get("setup") or {}).get("sample", False))
        self.cells: dict[tuple, pd.DataFrame] = {}
        self.labels: dict[tuple, str] = {}
        self.summaries: dict[tuple, dict] = {}
        if self.frame.empty:
            return
        frame = self.frame.assign(_prompt=_prompt_key(self.frame))
        keys = ["dataset", "cell_key"] if "dataset" in frame else ["cell_key"]
        for _, group in frame.groupby(keys, sort=False):
            identity = cell_identity(group.iloc[0].to_dict())
            self.cells[identity] = group.set_index("_prompt").sort_index()
            self.labels[identity] = str(group["cell_label"].iloc[0])
        for row in self.summary.to_dict("records"):
            self.summaries[cell_identity(row)] = row

    def baseline(self, identity: tuple) -> pd.DataFrame | None:
        """The autoregressive cell the summary measures ``identity`` against (same backend, task)."""
        ar = [key for key in self.cells if key[0] == "autoregressive" and key[5:] == identity[5:]]
        same = [key for key in ar if key[4] == identity[4]]
        chosen = same or ar
        return self.cells[chosen[0]] if chosen else None

    def lossless(self, identity: tuple) -> pd.Series | None:
        """Per prompt: 1.0 when the tokens equal the baseline's (greedy runs only)."""
        if self.sampled:
            return None
        ar = self.baseline(identity)
        if ar is None:
            return None
        cell = self.cells[identity]
        common = cell.index.intersection(ar.index)
        values = [float(first_difference(list(cell.at[p, "tokens"]), list(ar.at[p, "tokens"])) == -1) for p in common]
        return pd.Series(values, index=common, dtype=float)


# --------------------------------------------------------------------------- statistics


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.nanpercentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _resamples(n: int, bootstraps: int, seed: int) -> np.ndarray:
    """Bootstrap index sets over n prompts (the same sets for every cell: paired resampling)."""
    return np.random.default_rng(seed).integers(0, n, size=(bootstraps, n))


def speedup_ratio(
    base_cell: np.ndarray,
    base_ar: np.ndarray,
    new_cell: np.ndarray,
    new_ar: np.ndarray,
    *,
    bootstraps: int,
    confidence: float,
    seed: int,
) -> tuple[float, float, float]:
    """new speedup / base speedup over paired prompts, with a bootstrap CI (prompts resampled).

    Speedup over a prompt set is Σ AR time / Σ cell time (ratio of sums, as in the summary),
    each run against its own baseline; every resample uses the same prompts in all four arrays.
    """
    point = (new_ar.sum() / new_cell.sum()) / (base_ar.sum() / base_cell.sum())
    idx = _resamples(len(base_cell), bootstraps, seed)
    samples = (new_ar[idx].sum(1) / new_cell[idx].sum(1)) / (base_ar[idx].sum(1) / base_cell[idx].sum(1))
    low, high = _interval(samples, confidence)
    return float(point), low, high


def mean_difference(
    base: np.ndarray, new: np.ndarray, *, bootstraps: int, confidence: float, seed: int
) -> tuple[float, float, float]:
    """Mean of new - base over paired prompts, with a bootstrap CI."""
    diff = new - base
    idx = _resamples(len(diff), bootstraps, seed)
    low, high = _interval(diff[idx].mean(1), confidence)
    return float(diff.mean()), low, high


# --------------------------------------------------------------------------- the comparison


def _fmt(value, pattern: str = "{:.3f}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def _count_mismatches(base: pd.DataFrame, new: pd.DataFrame) -> list[str]:
    found = []
    if sorted(base.index) != sorted(new.index):
        found.append("prompts differ")
    for prompt in base.index.intersection(new.index):
        b, n = base.loc[prompt], new.loc[prompt]
        for column in COUNT_COLUMNS:
            if int(b[column]) != int(n[column]):
                found.append(f"prompt {prompt}: {column} {int(b[column])} -> {int(n[column])}")
        index = first_difference([int(t) for t in n["tokens"]], [int(t) for t in b["tokens"]])
        if index != -1:
            found.append(f"prompt {prompt}: tokens differ from index {index}")
    return found


def compare_runs(
    base_dir: Path | str,
    new_dir: Path | str,
    *,
    max_slowdown: float = 0.05,
    max_acceptance_drop: float = 0.02,
    max_quality_drop: float = 0.01,
    confidence: float = 0.95,
    bootstraps: int = 2000,
    seed: int = 0,
    allow_missing: bool = False,
) -> Comparison:
    """Compare a new run against a base run, cell by cell; ``.ok`` is False on any regression.

    Rules (each run is only ever measured against itself, so runs on different machines compare):

    * Speed. Times are compared as each run's speedup over its own autoregressive baseline
      (same backend), never as seconds across runs. Let r = new speedup / base speedup over
      the prompts both runs hold, and [lo, hi] its bootstrap CI at ``confidence``
      (``bootstraps`` resamples of prompts, paired by prompt index across the two runs and
      the cell and baseline of each). A cell regresses when r < 1 - max_slowdown AND
      hi < 1 - max_slowdown: the slowdown must exceed the tolerance and noise between
      prompts must not explain it. (A run-wide shift of one run's baseline cancels only
      through the ratio; ``max_slowdown`` absorbs what the bootstrap over prompts cannot see.)
      The mirror image is reported as "faster", never as a failure.
    * Counts. When both runs are greedy float32 on a CPU they are deterministic: every
      prompt's new_tokens, drafted, accepted, verify_steps and output tokens must be equal,
      and any difference fails. Otherwise the acceptance rate (Σ accepted / Σ drafted) may
      drop by at most ``max_acceptance_drop`` (absolute).
    * Losslessness (greedy runs): per prompt, tokens equal to the run's own autoregressive
      tokens. Deterministic runs fail on any drop; otherwise a drop fails when the bootstrap
      CI of the mean per-prompt change lies entirely below 0.
    * Quality (each ``quality_*`` both runs hold): a drop fails when the mean per-prompt
      change is below -max_quality_drop and its bootstrap CI lies entirely below it too.
    * Cells only in the new run are notes. A base cell missing from the new run (or failed
      there) is a problem, unless ``allow_missing``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    base, new = _Run(base_dir), _Run(new_dir)
    check_comparable(base.manifest, new.manifest)
    deterministic = is_deterministic(base.manifest) and is_deterministic(new.manifest)
    problems: list[str] = []
    notes: list[str] = []
    if not deterministic:
        notes.append("counts compared with tolerances: the runs are not both greedy float32 on a CPU")
    limit = 1.0 - max_slowdown
    stats = dict(bootstraps=bootstraps, confidence=confidence, seed=seed)
    failed_in_new = {cell_identity(e): e.get("error") for e in new.errors}
    rows = []
    listed = [cell_identity({"backend": "native", **cell}) for cell in base.manifest.get("cells") or []]

    def rank(identity: tuple) -> tuple:
        """Cells in the base run's order (the baseline first), per task; the others after."""
        position = listed.index(identity[:5]) if identity[:5] in listed else len(listed)
        return (str(identity[5:]), identity not in base.cells, position)

    for identity in sorted({*base.cells, *new.cells}, key=rank):
        label = base.labels.get(identity) or new.labels.get(identity)
        b, n = base.summaries.get(identity), new.summaries.get(identity)
        row = (
            dict(zip([*KEY_COLUMNS, "dataset"], identity, strict=True))
            if len(identity) > 5
            else dict(zip(KEY_COLUMNS, identity, strict=True))
        )
        row["cell"] = label
        if n is None:
            error = failed_in_new.get(identity)
            message = f"{label}: in the base run but " + (
                f"failed in the new run ({error})" if error else "missing from the new run"
            )
            (notes if allow_missing else problems).append(message)
            rows.append(row | {"verdict": "missing in new", "reason": message.split(": ", 1)[1]})
            continue
        if b is None:
            notes.append(f"{label}: only in the new run")
            rows.append(
                row
                | {
                    "verdict": "only in new",
                    "reason": "not in the base run",
                    "new_tokens_per_s": n["tokens_per_s"],
                    "new_speedup": n["speedup"],
                }
            )
            continue
        failures, remarks = [], []
        row |= {
            "base_tokens_per_s": b["tokens_per_s"],
            "new_tokens_per_s": n["tokens_per_s"],
            "base_speedup": b["speedup"],
            "new_speedup": n["speedup"],
            "speedup_ratio": float("nan"),
            "speedup_ci_low": float("nan"),
            "speedup_ci_high": float("nan"),
            "base_acceptance": b["acceptance_rate"],
            "new_acceptance": n["acceptance_rate"],
            "acceptance_delta": n["acceptance_rate"] - b["acceptance_rate"],
            "base_tokens_per_step": b["tokens_per_step"],
            "new_tokens_per_step": n["tokens_per_step"],
        }
        base_cell, new_cell = base.cells[identity], new.cells[identity]

        # Speed, relative to each run's own baseline.
        base_ar, new_ar = base.baseline(identity), new.baseline(identity)
        if identity[0] != "autoregressive" and base_ar is not None and new_ar is not None:
            common = base_cell.index.intersection(new_cell.index).intersection(base_ar.index).intersection(new_ar.index)
            if len(common):
                arrays = [
                    frame.loc[common, "time_s"].to_numpy(dtype=float)
                    for frame in (base_cell, base_ar, new_cell, new_ar)
                ]
                ratio, low, high = speedup_ratio(*arrays, **stats)
                row |= {"speedup_ratio": ratio, "speedup_ci_low": low, "speedup_ci_high": high}
                text = (
                    f"speedup {b['speedup']:.2f}x -> {n['speedup']:.2f}x (ratio {ratio:.3f}, "
                    f"{confidence:.0%} CI {low:.3f}-{high:.3f})"
                )
                if ratio < limit and high < limit:
                    failures.append(f"{text}: slower by more than {max_slowdown:.0%}")
                elif ratio > 1 / limit and low > 1 / limit:
                    remarks.append(f"{text}: faster")
        elif identity[0] != "autoregressive":
            remarks.append("no autoregressive baseline in both runs: speedup not compared")

        # Counts: exact when deterministic, else acceptance within a tolerance.
        if deterministic:
            mismatches = _count_mismatches(base_cell, new_cell)
            if mismatches:
                shown = "; ".join(mismatches[:3]) + (f"; +{len(mismatches) - 3} more" if len(mismatches) > 3 else "")
                failures.append(f"deterministic run changed: {shown}")
        elif b["drafted"] and n["drafted"]:
            drop = b["acceptance_rate"] - n["acceptance_rate"]
            if drop > max_acceptance_drop:
                failures.append(
                    f"acceptance {b['acceptance_rate']:.3f} -> {n['acceptance_rate']:.3f} "
                    f"(drop {drop:.3f} > {max_acceptance_drop})"
                )

        # Losslessness (greedy only).
        base_lossless, new_lossless = base.lossless(identity), new.lossless(identity)
        row |= {
            "base_lossless": b["lossless"] if base_lossless is not None else float("nan"),
            "new_lossless": n["lossless"] if new_lossless is not None else float("nan"),
        }
        if base_lossless is not None and new_lossless is not None:
            common = base_lossless.index.intersection(new_lossless.index)
            if len(common):
                old, now = base_lossless[common].to_numpy(), new_lossless[common].to_numpy()
                mean, _, high = mean_difference(old, now, **stats)
                fell = (now < old).any() if deterministic else (mean < 0 and high < 0)
                if fell:
                    failures.append(f"lossless {old.mean():.0%} -> {now.mean():.0%}")

        # Quality.
        for column in sorted(c for c in base_cell.columns if c.startswith("quality_") and c in new_cell):
            name = column.removeprefix("quality_")
            row[f"base_{column}"], row[f"new_{column}"] = b.get(column), n.get(column)
            paired = pd.concat([base_cell[column], new_cell[column]], axis=1, join="inner").dropna()
            if paired.empty:
                continue
            old, now = paired.iloc[:, 0].to_numpy(dtype=float), paired.iloc[:, 1].to_numpy(dtype=float)
            mean, _, high = mean_difference(old, now, **stats)
            if mean < -max_quality_drop and high < -max_quality_drop:
                failures.append(f"{name} {old.mean():.3f} -> {now.mean():.3f} (drop beyond {max_quality_drop})")

        row["verdict"] = "FAIL" if failures else ("faster" if remarks and "faster" in remarks[0] else "ok")
        row["reason"] = "; ".join(failures + remarks)
        problems += [f"{label}: {failure}" for failure in failures]
        rows.append(row)

    settings = dict(
        max_slowdown=max_slowdown,
        max_acceptance_drop=max_acceptance_drop,
        max_quality_drop=max_quality_drop,
        confidence=confidence,
        bootstraps=bootstraps,
        seed=seed,
    )
    return Comparison(Path(base_dir), Path(new_dir), pd.DataFrame(rows), problems, notes, deterministic, settings)


# --------------------------------------------------------------------------- output


def format_comparison(comparison: Comparison):
    """A rich Table of the per-cell comparison; problems and notes in its caption."""
    from rich.table import Table

    status = "[green]OK[/]" if comparison.ok else f"[red]FAIL[/] ({len(comparison.problems)} problems)"
    table = Table(title=f"compare {comparison.base_dir} -> {comparison.new_dir}: {status}", title_justify="left")
    for name in ("cell", "speedup", "ratio (CI)", "acceptance", "tokens/step", "lossless", "verdict", "reason"):
        table.add_column(name, justify="left" if name in ("cell", "verdict", "reason") else "right", overflow="fold")
    colors = {"ok": "green", "faster": "cyan", "FAIL": "red", "missing in new": "red", "only in new": "yellow"}
    for row in comparison.rows.to_dict("records"):
        get = row.get
        ratio = (
            f"{get('speedup_ratio'):.3f} ({get('speedup_ci_low'):.3f}-{get('speedup_ci_high'):.3f})"
            if _fmt(get("speedup_ratio")) != "-"
            else "-"
        )
        verdict = row["verdict"]
        table.add_row(
            str(row["cell"]),
            f"{_fmt(get('base_speedup'), '{:.2f}x')} -> {_fmt(get('new_speedup'), '{:.2f}x')}",
            ratio,
            f"{_fmt(get('base_acceptance'))} -> {_fmt(get('new_acceptance'))}",
            f"{_fmt(get('base_tokens_per_step'), '{:.2f}')} -> {_fmt(get('new_tokens_per_step'), '{:.2f}')}",
            f"{_fmt(get('base_lossless'), '{:.0%}')} -> {_fmt(get('new_lossless'), '{:.0%}')}",
            f"[{colors.get(verdict, 'white')}]{verdict}[/]",
            str(get("reason") or ""),
        )
    mode = "exact counts (CPU float32 greedy)" if comparison.deterministic else "counts with tolerance"
    settings = comparison.settings
    caption = [
        f"{mode}; slowdown tolerance {settings.get('max_slowdown', 0):.0%} at "
        f"{settings.get('confidence', 0):.0%} confidence"
    ]
    caption += [f"note: {note}" for note in comparison.notes]
    table.caption = "\n".join(caption)
    table.caption_justify = "left"
    return table


def comparison_text(comparison: Comparison, width: int = 160) -> str:
    """The comparison table and its problems as plain text (logs, CI output)."""
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    console.print(format_comparison(comparison))
    for problem in comparison.problems:
        console.print(f"problem: {problem}", highlight=False, markup=False)
    return buffer.getvalue()
