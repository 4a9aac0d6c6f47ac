"""Compare two runs cell by cell: a regression gate whose time tolerance comes from the runs' intervals.

Cells are matched by what they are (`Cell.identity`: strategy, exit layer, K, draft model, backend, replica),
never by their key, so runs made on different machines match. Two runs are only compared when they
decoded the same prompts (prompt-set hash) with the same model and decoding settings; otherwise
:class:`CompareError` is raised. Both runs are read through the same summary the report uses.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from skipbench import intervals
from skipbench.decoding.record import COUNTS
from skipbench.errors import UserError
from skipbench.latency import MEASURES, PERCENTILES
from skipbench.pairing import first_difference, first_rows, rounds_of, units
from skipbench.spec import Cell, baseline_of
from skipbench.store import RunStore
from skipbench.summary import complete_cells, devices_of, summarize
from skipbench.tables import number, with_interval


class CompareError(UserError):
    """Two runs that cannot be compared; the message says why, in one line."""


@dataclass
class Comparison:
    """The outcome of :func:`compare_runs`: one row per cell of either run with base/new figures and a
    ``verdict`` ("ok", "faster", "FAIL", "missing in new", "only in new"); every failure in ``problems``."""

    base_dir: Path
    new_dir: Path
    rows: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    deterministic: bool = False
    settings: dict = field(default_factory=dict)
    environment: list[tuple[str, str, str]] = field(default_factory=list)  # (what, base, new) that differ

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def coverage(self) -> tuple[int, int]:
        """(cells whose new/base speedup ratio interval holds 1.00, cells with a ratio interval): how well the
        runs' intervals explain a rerun. Run twice with unchanged code, about 95% should hold 1.00. (A new
        point inside the base run's 95% interval is the wrong yardstick: with equal noise it happens only
        ~83% of the time, since both points move.)"""
        rows = self.rows
        if rows.empty or "speedup_ratio_low" not in rows:
            return 0, 0
        both = rows[rows["speedup_ratio_low"].notna() & (rows["speedup_ratio_low"] != rows["speedup_ratio_high"])]
        holds = (both["speedup_ratio_low"] <= 1.0) & (1.0 <= both["speedup_ratio_high"])
        return int(holds.sum()), len(both)


def _decoding(manifest: dict) -> dict:
    setup, prompts = manifest.get("setup") or {}, manifest.get("prompts") or {}
    settings = {"sample": bool(setup.get("sample", False)), "max_new_tokens": prompts.get("max_new_tokens")}
    if settings["sample"]:
        settings |= {"temperature": setup.get("temperature"), "top_p": setup.get("top_p")}
    return settings


# What a run's numbers may depend on besides the code path a cell takes: (label, provenance key).
ENVIRONMENT = (("skipbench commit", "git_commit"), ("skipbench", "skipbench_version"), ("torch", "torch_version"),
               ("transformers", "transformers_version"), ("python", "python_version"), ("device", "device"),
               ("threads", "cpu_threads"), ("dtype", "dtype"))


def environment_differences(base: dict, new: dict) -> list[tuple[str, str, str]]:
    """(what, base value, new value) for each part of the two runs' environments that differs: a regression
    check across a library upgrade or another machine is what compare is run for."""
    found = []
    for label, key in ENVIRONMENT:
        values = [str((manifest.get("provenance") or {}).get(key, "?")) for manifest in (base, new)]
        if key == "git_commit":
            values = [value[:10] for value in values]
        if values[0] != values[1]:
            found.append((label, values[0], values[1]))
    return found


def check_comparable(base: dict, new: dict) -> None:
    """Refuse runs on other prompts, another model or other decoding settings."""
    hashes = [(m.get("prompts") or {}).get("prompt_set_hash") for m in (base, new)]
    if hashes[0] != hashes[1]:
        raise CompareError(f"the runs decoded different prompt sets (prompt-set hash {hashes[0]} vs {hashes[1]}): "
                           f"their numbers cannot be compared")
    targets = [(m.get("models") or {}).get("target") or {} for m in (base, new)]
    for name in ("name", "revision", "num_layers"):
        if targets[0].get(name) != targets[1].get(name):
            raise CompareError(f"the runs used different models ({name} {targets[0].get(name)!r} vs "
                               f"{targets[1].get(name)!r})")
    drafts = [(m.get("models") or {}).get("drafts") or {} for m in (base, new)]
    for name in set(drafts[0]) & set(drafts[1]):
        if drafts[0][name].get("revision") != drafts[1][name].get("revision"):
            raise CompareError(f"draft model {name} differs between the runs")
    if _decoding(base) != _decoding(new):
        raise CompareError(f"the runs decoded with different settings: {_decoding(base)} vs {_decoding(new)}")


def is_deterministic(manifest: dict) -> bool:
    """Greedy decoding in float32 on a CPU: counts and tokens are reproducible exactly."""
    provenance = manifest.get("provenance") or {}
    return (str(provenance.get("device", "")).lower().startswith("cpu")
            and str(provenance.get("dtype", "")) == "float32"
            and not bool((manifest.get("setup") or {}).get("sample", False)))


class _Run:
    """One run's rows and summary, indexed by cell identity."""

    def __init__(self, root: Path | str, role: str):
        store = RunStore(root)
        self.root = Path(root)
        self.manifest = store.read_manifest()
        self.frame = complete_cells(store.read_cells(), (self.manifest.get("prompts") or {}).get("prompts"))
        if self.frame.empty:
            raise CompareError(f"the {role} run {root} holds no finished cells: nothing to compare")
        devices = devices_of(self.frame)
        if len(devices) > 1:
            raise CompareError(f"the {role} run {root} was timed on {len(devices)} devices ({', '.join(devices)}); "
                               f"compare runs timed on one device: times are never pooled across devices")
        self.errors = {Cell.from_record(e).identity(): e.get("error") for e in store.errors()}
        self.summary = summarize(self.frame)
        self.cells = {Cell.from_record(r).identity(): Cell.from_record(r) for r in self.summary.to_dict("records")}
        self.rows = {Cell.from_record(r).identity(): r for r in self.summary.to_dict("records")}
        self.groups = {identity: self.frame[self.frame["cell_key"] == row["cell_key"]]
                       for identity, row in self.rows.items()}

    def baseline(self, identity: tuple) -> pd.DataFrame | None:
        base = baseline_of(self.cells[identity], list(self.cells.values()))
        return self.groups.get(base.identity()) if base is not None else None

    def paired(self, identity: tuple, prompts: list[int]) -> intervals.Paired | None:
        baseline = self.baseline(identity)
        if baseline is None:
            return None
        rows = self.groups[identity]
        rounds = rounds_of(rows, baseline)
        return intervals.Paired.of(units(rows, "time_s", "new_tokens", prompts, rounds),
                                   units(baseline, "time_s", "new_tokens", prompts, rounds), np.array(prompts))

    def first_rows(self, identity: tuple) -> pd.DataFrame:
        return first_rows(self.groups[identity]).set_index("prompt_index")


def speedup_ratio(base: intervals.Paired, new: intervals.Paired, seed: int = 0) -> tuple[float, float, float]:
    """new speedup / base speedup, with a bootstrap interval; both runs resample the same prompts (those
    both paired with their baselines)."""
    common = np.intersect1d(base.prompts, new.prompts)
    base, new = base.restricted(common), new.restricted(common)
    if not len(common):
        return float("nan"), float("nan"), float("nan")
    point = new.point() / base.point()
    repeats = max(base.shape[1], new.shape[1])
    chosen = intervals.draws(base.shape[0], repeats, seed=seed)
    samples = new.samples(chosen) / base.samples(chosen)
    return point, *intervals.bounds(samples)


def _count_mismatches(base: pd.DataFrame, new: pd.DataFrame) -> list[str]:
    found = []
    if sorted(base.index) != sorted(new.index):
        found.append("prompts differ")
    for prompt in base.index.intersection(new.index):
        b, n = base.loc[prompt], new.loc[prompt]
        for column in COUNTS:
            if int(b[column]) != int(n[column]):
                found.append(f"prompt {prompt}: {column} {int(b[column])} -> {int(n[column])}")
        index = first_difference([int(t) for t in n["tokens"]], [int(t) for t in b["tokens"]])
        if index != -1:
            found.append(f"prompt {prompt}: tokens differ from index {index}")
    return found


def compare_runs(base_dir: Path | str, new_dir: Path | str, *, max_slowdown: float = 0.05,
                 max_acceptance_drop: float = 0.02, max_quality_drop: float = 0.01,
                 allow_missing: bool = False, max_latency_increase: float | None = None) -> Comparison:
    """Compare a new run against a base run, cell by cell; ``.ok`` is False on any regression.

    * Speed: each run's speedup over its own baseline (paired by prompt and round), never seconds across
      runs. A cell regresses when the new speedup's 95% interval lies wholly below the base's interval,
      lowered by ``max_slowdown``: noise that the repeats measured cannot trip it, and two runs of the same
      code overlap. The ratio new/base and its interval are reported. The mirror image is "faster".
    * Counts: runs that are both greedy float32 on a CPU must agree exactly on every prompt's counts and
      tokens; otherwise the acceptance rate may drop by at most ``max_acceptance_drop``.
    * Losslessness (greedy) may not drop in a deterministic run; quality (each ``quality_*``) may not drop
      by more than ``max_quality_drop`` on average.
    * Latency (``max_latency_increase``; None: not judged): each percentile both runs have (TTFT, TPOT, ITL,
      E2E at p50/p90/p99, `latency.latency_columns`) fails when the new 95% interval lies wholly above the
      base's, raised by the tolerance, as speed is judged. These are seconds, not ratios to a run's own
      baseline, so they only mean something between runs on the same machine: off unless asked for.
    * A base cell missing from (or failed in) the new run is a problem unless ``allow_missing``.
    """
    base, new = _Run(base_dir, "base"), _Run(new_dir, "new")
    check_comparable(base.manifest, new.manifest)
    deterministic = is_deterministic(base.manifest) and is_deterministic(new.manifest)
    problems, notes, rows = [], [], []
    unjudged: dict[str, list[str]] = {}  # why latency was not judged -> the cells
    if not deterministic:
        notes.append("counts compared with tolerances: the runs are not both greedy float32 on a CPU")
    order = [Cell.from_record(c).identity() for c in base.manifest.get("cells") or []]
    identities = sorted({*base.rows, *new.rows}, key=lambda i: (i not in base.rows,
                                                                order.index(i) if i in order else len(order)))
    for identity in identities:
        b, n = base.rows.get(identity), new.rows.get(identity)
        label = (b or n)["cell_label"]
        row = {"cell": label, "short": Cell(*identity).short_label(), "draft": Cell(*identity).draft_model}
        if n is None:
            error = new.errors.get(identity)
            message = f"{label}: in the base run but " + (f"failed in the new run ({error})" if error
                                                          else "missing from the new run")
            (notes if allow_missing else problems).append(message)
            rows.append(row | {"verdict": "missing in new", "reason": message.split(": ", 1)[1]})
            continue
        if b is None:
            notes.append(f"{label}: only in the new run")
            rows.append(row | {"verdict": "only in new", "reason": "not in the base run", **_figures(None, n)})
            continue
        row |= _figures(b, n)
        failures, remarks = _judge(base, new, identity, b, n, row, deterministic, max_slowdown=max_slowdown,
                                   max_acceptance_drop=max_acceptance_drop, max_quality_drop=max_quality_drop)
        if max_latency_increase is not None:
            slower, why = latency_changes(b, n, row, max_latency_increase)
            failures += slower
            if why:
                unjudged.setdefault(why, []).append(label)
        row["verdict"] = "FAIL" if failures else ("faster" if any("faster" in r for r in remarks) else
                                                  "not judged" if remarks else "ok")
        row["reason"] = "; ".join(failures + remarks)
        problems += [f"{label}: {failure}" for failure in failures]
        rows.append(row)
    notes += [f"latency not compared in {len(cells)} cell(s) ({', '.join(cells[:3])}"
              f"{f', +{len(cells) - 3} more' if len(cells) > 3 else ''}): {why}" for why, cells in unjudged.items()]
    if max_latency_increase is not None and {label for label, _, _ in environment_differences(
            base.manifest, new.manifest)} & {"device", "threads", "torch"}:
        notes.append("latencies are seconds and the runs' device, threads or torch differ: a latency change may be "
                     "the machine's, not the code's")
    settings = dict(max_slowdown=max_slowdown, max_acceptance_drop=max_acceptance_drop,
                    max_quality_drop=max_quality_drop, max_latency_increase=max_latency_increase)
    return Comparison(Path(base_dir), Path(new_dir), pd.DataFrame(rows), problems, notes, deterministic, settings,
                      environment_differences(base.manifest, new.manifest))


def _figures(b: dict | None, n: dict) -> dict:
    out = {}
    for name in ("speedup", "speedup_low", "speedup_high", "acceptance_rate", "tokens_per_step", "lossless",
                 "tokens_per_s"):
        out[f"new_{name}"] = n[name]
        out[f"base_{name}"] = b[name] if b else np.nan
    return out


def _judge(base: _Run, new: _Run, identity: tuple, b: dict, n: dict, row: dict, deterministic: bool, *,
           max_slowdown: float, max_acceptance_drop: float, max_quality_drop: float) -> tuple[list[str], list[str]]:
    failures, remarks = [], []
    prompts = sorted(set(base.first_rows(identity).index) & set(new.first_rows(identity).index))
    cell = Cell(*identity)
    if baseline_of(cell, list(base.cells.values())) != cell:
        base_pair, new_pair = base.paired(identity, prompts), new.paired(identity, prompts)
        if base_pair is None or new_pair is None:
            remarks.append("no autoregressive baseline in both runs: speedup not compared")
        else:
            ratio, low, high = speedup_ratio(base_pair, new_pair)
            row |= {"speedup_ratio": ratio, "speedup_ratio_low": low, "speedup_ratio_high": high}
            text = (f"speedup {with_interval(b['speedup'], b['speedup_low'], b['speedup_high'])} -> "
                    f"{with_interval(n['speedup'], n['speedup_low'], n['speedup_high'])}")
            if any(value != value for value in (b["speedup_low"], b["speedup_high"], n["speedup_low"],
                                                 n["speedup_high"])):
                remarks.append(f"{text}: not judged (a run has no interval: measure more prompts or repeats)")
            elif n["speedup_high"] < b["speedup_low"] * (1 - max_slowdown):
                failures.append(f"{text}: slower beyond the intervals and the {max_slowdown:.0%} tolerance")
            elif n["speedup_low"] * (1 - max_slowdown) > b["speedup_high"]:
                remarks.append(f"{text}: faster")
    if deterministic:
        mismatches = _count_mismatches(base.first_rows(identity), new.first_rows(identity))
        if mismatches:
            shown = "; ".join(mismatches[:3]) + (f"; +{len(mismatches) - 3} more" if len(mismatches) > 3 else "")
            failures.append(f"deterministic run changed: {shown}")
    elif b["drafted"] and n["drafted"] and b["acceptance_rate"] - n["acceptance_rate"] > max_acceptance_drop:
        failures.append(f"acceptance {b['acceptance_rate']:.3f} -> {n['acceptance_rate']:.3f} "
                        f"(drop beyond {max_acceptance_drop})")
    if deterministic and b["lossless"] == b["lossless"] and n["lossless"] < b["lossless"]:
        failures.append(f"lossless {b['lossless']:.0%} -> {n['lossless']:.0%}")
    base_first, new_first = base.first_rows(identity), new.first_rows(identity)
    for column in sorted(c for c in base_first if c.startswith("quality_") and c in new_first):
        paired = pd.concat([base_first[column], new_first[column]], axis=1, join="inner").dropna()
        change, _, high = intervals.mean((paired.iloc[:, 1] - paired.iloc[:, 0]).to_numpy())
        # A drop fails when it is beyond the tolerance and the prompts' spread cannot explain it.
        if change < -max_quality_drop and high < -max_quality_drop:
            failures.append(f"{column.removeprefix('quality_')} {b[column]:.3f} -> {n[column]:.3f} "
                            f"(drop beyond {max_quality_drop})")
    return failures, remarks


def _seconds(row: dict, key: str) -> tuple[float, float, float] | None:
    """(estimate, low, high) of a latency column, or None where the row has no such figure."""
    values = [row.get(key + suffix) for suffix in ("", "_low", "_high")]
    if any(value is None or not np.isfinite(float(value)) for value in values):
        return None
    return tuple(float(value) for value in values)


def _ms(point: float, low: float, high: float) -> str:
    """`20.1 ms [19.9, 20.3]`."""
    return f"{point * 1000:.1f} ms [{low * 1000:.1f}, {high * 1000:.1f}]"


def latency_changes(b: dict, n: dict, row: dict, max_increase: float) -> tuple[list[str], str]:
    """Judge every latency percentile both summary rows have: a failure per percentile whose new interval lies
    wholly above the base interval raised by ``max_increase``. Puts the percentile with the largest new/base
    ratio in ``row`` (``latency_worst`` e.g. "TTFT p99", ``latency_ratio``, ``latency_base_s``/``latency_new_s``
    with ``_low``/``_high``) and ``latency_failures``. Returns (failures, why the cell was not judged, or "")."""
    if _seconds(b, "ttft_p50_s") is None or _seconds(n, "ttft_p50_s") is None:
        return [], "a run has no latency columns (recorded before skipbench kept per-token times)"
    if min(b.get("rows") or 0, n.get("rows") or 0) < intervals.MIN_UNITS:
        return [], f"fewer than {intervals.MIN_UNITS} requests, too few to judge by their intervals"
    failures, worst = [], {}
    for measure in MEASURES:
        for q in PERCENTILES:
            base, new = _seconds(b, f"{measure}_p{q}_s"), _seconds(n, f"{measure}_p{q}_s")
            if base is None or new is None or base[0] <= 0:  # a burst's gaps are 0: no ratio
                continue
            name, ratio = f"{measure.upper()} p{q}", new[0] / base[0]
            if not ratio <= worst.get("latency_ratio", -np.inf):
                worst = {"latency_worst": name, "latency_ratio": ratio}
                for run, values in (("base", base), ("new", new)):
                    worst |= dict(zip((f"latency_{run}_s", f"latency_{run}_s_low", f"latency_{run}_s_high"), values,
                                      strict=True))
            if new[1] > base[2] * (1 + max_increase):
                failures.append(f"{name} {_ms(*base)} -> {_ms(*new)} ({ratio:.2f}x): higher beyond the intervals "
                                f"and the {max_increase:.0%} tolerance")
    row |= worst | {"latency_failures": len(failures)}
    return failures, ""


# --------------------------------------------------------------------------- output


def environment_text(comparison: Comparison) -> str:
    """One line per part of the environment that differs between the runs, or one line saying none does."""
    if not comparison.environment:
        return "environment: the same (skipbench commit, torch, transformers, python, device, threads, dtype)"
    return "\n".join(f"environment differs: {label} {base} -> {new}" for label, base, new in comparison.environment)


def changed(base: str, new: str) -> str:
    """`0.80` when both runs agree, `0.80->0.75` when not."""
    return new if base == new else f"{base}->{new}"


def latency_text(row: dict) -> str:
    """`1.50x TTFT p99`: a cell's largest new/base latency ratio and which percentile it is; "-" when not judged."""
    worst = row.get("latency_worst")
    return f"{row['latency_ratio']:.2f}x {worst}" if isinstance(worst, str) else "-"


def latency_table(comparison: Comparison, escape):
    """Per judged cell, the latency percentile that rose most (new/base; red when some percentile failed) and both
    runs' values with intervals; None when no cell was judged (gate off, or runs without latency columns)."""
    from rich.table import Table

    rows = [row for row in comparison.rows.to_dict("records") if isinstance(row.get("latency_worst"), str)]
    if not rows:
        return None
    table = Table(title=f"latency: the percentile that rose most (a percentile fails when its new interval lies "
                        f"above the base interval raised by {comparison.settings['max_latency_increase']:.0%})",
                  title_justify="left", pad_edge=False)
    for name in ("cell", "rose most", "base ms", "new ms", "new/base"):
        table.add_column(name, justify="left" if name in ("cell", "rose most") else "right",
                         no_wrap=name != "cell", overflow="fold")
    colors = {True: "red", False: "green"}
    for row in rows:
        base, new = ([1000 * row[f"latency_{run}_s{end}"] for end in ("", "_low", "_high")] for run in ("base", "new"))
        pattern = "{:.1f}" if max(base + new) < 100 else "{:.0f}"
        table.add_row(escape(str(row.get("short") or row["cell"])), row["latency_worst"],
                      with_interval(*base, pattern), with_interval(*new, pattern),
                      f"[{colors[bool(row['latency_failures'])]}]{row['latency_ratio']:.2f}x[/]")
    return table


def format_comparison(comparison: Comparison):
    """The runs' environment differences, then a rich Table of the per-cell comparison; problems and notes in
    its caption. User text (cell labels name draft models; run paths) is escaped: rich would read `[...]` in it
    as markup."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    status = "[green]OK[/]" if comparison.ok else f"[red]FAIL[/] ({len(comparison.problems)} problems)"
    table = Table(title=f"compare {escape(str(comparison.base_dir))} -> {escape(str(comparison.new_dir))}: {status}",
                  title_justify="left", pad_edge=False)
    # One line per cell in 80 columns: each failure's reason is printed in full below the table.
    # base, new: the speedups; acc.: acceptance; exact: lossless (greedy output equal to the baseline's)
    for name in ("cell", "base", "new", "new/base [95% CI]", "acc.", "exact", "verdict"):
        table.add_column(name, justify="left" if name in ("cell", "verdict") else "right",
                         no_wrap=name != "verdict", overflow="fold")
    drafts = sorted({row["draft"] for row in comparison.rows.to_dict("records") if isinstance(row.get("draft"), str)})
    colors = {"ok": "green", "faster": "cyan", "FAIL": "red", "missing in new": "red", "only in new": "yellow"}
    for row in comparison.rows.to_dict("records"):
        get = row.get
        table.add_row(
            escape(str(get("short") or row["cell"])
                   + (f" d{drafts.index(get('draft')) + 1}" if get("draft") in drafts else "")),
            number(get("base_speedup"), "{:.2f}x"), number(get("new_speedup"), "{:.2f}x"),
            with_interval(get("speedup_ratio"), get("speedup_ratio_low"), get("speedup_ratio_high"), "{:.2f}"),
            changed(number(get("base_acceptance_rate"), "{:.2f}"), number(get("new_acceptance_rate"), "{:.2f}")),
            changed(number(get("base_lossless"), "{:.0%}"), number(get("new_lossless"), "{:.0%}")),
            f"[{colors.get(row['verdict'], 'white')}]{row['verdict']}[/]",
        )
    mode = "exact counts (CPU float32 greedy)" if comparison.deterministic else "counts with tolerance"
    covered, total = comparison.coverage
    caption = ["base, new: speedups; acc.: acceptance; exact: greedy output equal to the baseline's",
               f"{mode}; a slowdown fails when the new speedup interval lies below the base interval lowered by "
               f"{comparison.settings.get('max_slowdown', 0):.0%}",
               f"rerun check: {covered}/{total} new/base ratio intervals hold 1.00 (about 95% when nothing changed)"
               if total else "rerun check: nothing to check (no cell has a ratio interval: the same rows, or too "
                             "few to resample)"]
    caption += [f"d{index + 1}: draft model {escape(name)}" for index, name in enumerate(drafts)]
    table.caption = "\n".join(caption + [f"note: {escape(note)}" for note in comparison.notes])
    table.caption_justify = "left"
    latency = latency_table(comparison, escape)
    return Group(Text(environment_text(comparison)), table, *([latency] if latency is not None else []))


def comparison_text(comparison: Comparison, width: int = 160) -> str:
    """The comparison table and its problems as plain text (logs, CI output)."""
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    console.print(format_comparison(comparison))
    for problem in comparison.problems:
        console.print(f"problem: {problem}", highlight=False, markup=False)
    return buffer.getvalue()
