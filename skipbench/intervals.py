"""Bootstrap intervals for ratios of sums over prompts x repeats (tokens/s, speedup).

A cell's measurements form a table: one row per prompt, one column per repeat (timed round). The
bootstrap resamples prompts with replacement and, inside each drawn prompt, its repeats with
replacement (a two-stage cluster bootstrap): prompt-to-prompt differences and round-to-round timing
noise both widen the interval. A speedup pairs every cell measurement with the baseline's measurement
of the same prompt in the same round, so drift of the machine within a round cancels. `sources` splits a
speedup interval's width into its two sources: prompts resampled with their rounds kept (the workload), and
rounds resampled with every prompt kept (timing noise). Below MIN_UNITS units no interval is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
# Fewer (prompt, round) units than this: no interval. A percentile bootstrap over n units has at most
# C(2n-1, n) distinct resamples (3 for n=2, 35 for n=4, 462 for n=6), so with few units its ends are the
# extreme resamples; and it treats the units' spread as known where a t quantile with n-1 degrees of freedom
# applies. Measured on simulated timings (600 trials, lognormal noise): a "95%" interval covers the truth
# 49% of the time at n=2, 73% at 3, 82% at 4 and 5, 87% at 6, 89% at 8 to 10. Below 6 units it says far
# more than the data do (a 2-unit interval is often zero-wide and reads as certainty), so none is given.
MIN_UNITS = 6


@dataclass(frozen=True)
class Units:
    """Per (prompt, repeat) sums to divide: `numerator[p, r] / denominator[p, r]`, missing as NaN.

    Repeats of a prompt are packed to the left (columns 0..count-1 are present)."""

    numerator: np.ndarray
    denominator: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        return (~np.isnan(self.numerator)).sum(axis=1)

    @property
    def size(self) -> int:
        return int(self.counts.sum())

    def packed(self) -> Units:
        """The same units with each prompt's repeats moved to the left, as the bootstrap expects."""
        present = ~np.isnan(self.numerator)
        return Units(_pack(self.numerator, present), _pack(self.denominator, present))


@dataclass(frozen=True)
class Draws:
    """One set of bootstrap draws, shared by every quantity that must be resampled together."""

    prompts: np.ndarray  # (resamples, P) prompt indices
    repeats: np.ndarray  # (resamples, P, R) uniform numbers in [0, 1): which repeat of the drawn prompt


def draws(prompts: int, repeats: int, resamples: int = RESAMPLES, seed: int = 0) -> Draws:
    rng = np.random.default_rng(seed)
    return Draws(rng.integers(0, prompts, size=(resamples, prompts)), rng.random((resamples, prompts, repeats)))


def draws_over_rounds(prompts: int, repeats: int, resamples: int = RESAMPLES, seed: int = 0) -> Draws:
    """Every prompt kept once, its repeats resampled: what round-to-round timing noise alone spreads."""
    rng = np.random.default_rng(seed)
    return Draws(np.tile(np.arange(prompts), (resamples, 1)), rng.random((resamples, prompts, repeats)))


def draws_over_prompts(counts: np.ndarray, repeats: int, resamples: int = RESAMPLES, seed: int = 0) -> Draws:
    """Prompts resampled, every repeat of a drawn prompt taken once (draw j picks repeat j): what the
    prompt-to-prompt spread of the workload alone spreads."""
    rng = np.random.default_rng(seed)
    counts = np.asarray(counts)
    chosen = rng.integers(0, len(counts), size=(resamples, len(counts)))
    slots = (np.arange(repeats) + 0.5) / np.maximum(counts[chosen], 1)[..., None]
    return Draws(chosen, slots)


def _resampled_sums(values: np.ndarray, counts: np.ndarray, chosen: Draws) -> np.ndarray:
    """Σ over the drawn (prompt, repeat) units of `values`, one sum per resample.

    A drawn prompt with c measured repeats gets c repeat draws among them (as many as it has, not as many as
    the widest prompt: more draws would average noise away and narrow the interval), and their mean, so a
    prompt weighs the same whatever its number of repeats."""
    prompt = chosen.prompts
    width = values.shape[1]
    have = counts[prompt][..., None]
    repeat = np.minimum((chosen.repeats[..., :width] * have).astype(int), width - 1)
    used = np.arange(width) < have  # the first c draws of a prompt with c repeats
    picked = np.where(used, values[prompt[..., None], repeat], 0.0)
    return (picked.sum(axis=2) / counts[prompt]).sum(axis=1)


def _point(values: np.ndarray, counts: np.ndarray) -> float:
    """Σ over prompts of the mean over the prompt's repeats."""
    if not values.size:
        return float("nan")
    return float(sum(np.nansum(values[row]) / counts[row] for row in range(values.shape[0]) if counts[row]))


def ratio(units: Units, chosen: Draws | None = None) -> tuple[float, float, float]:
    """Σ numerator / Σ denominator (each prompt's repeats averaged, then summed over prompts), with its
    interval; NaN bounds when there are fewer than two measurements."""
    rows = units.counts > 0
    units = Units(units.numerator[rows], units.denominator[rows]).packed()
    counts = units.counts
    point = _point(units.numerator, counts) / _point(units.denominator, counts)
    if units.size < 2:
        return point, float("nan"), float("nan")
    chosen = chosen or draws(*units.numerator.shape)
    samples = _resampled_sums(units.numerator, counts, chosen) / _resampled_sums(units.denominator, counts, chosen)
    return point, *bounds(samples)


@dataclass(frozen=True)
class Paired:
    """A cell's and its baseline's (time, tokens) on the (prompt, repeat) units both measured, packed."""

    cell_time: np.ndarray
    cell_tokens: np.ndarray
    base_time: np.ndarray
    base_tokens: np.ndarray
    counts: np.ndarray
    prompts: np.ndarray  # the ids of the rows: the prompts with at least one paired unit

    @classmethod
    def of(cls, cell: Units, baseline: Units, prompts: np.ndarray | None = None) -> Paired:
        """Column r of both was timed in the same round; a unit one of them lacks is left out of both, and a
        prompt with no unit left is left out (`prompts`, the rows' ids, says which remain)."""
        prompts = np.arange(cell.numerator.shape[0]) if prompts is None else np.asarray(prompts)
        present = ~np.isnan(cell.numerator) & ~np.isnan(baseline.numerator)
        rows = present.any(axis=1)
        present = present[rows]
        arrays = (cell.numerator[rows], cell.denominator[rows], baseline.numerator[rows],
                  baseline.denominator[rows])
        return cls(*(_pack(array, present) for array in arrays), present.sum(axis=1), prompts[rows])

    def restricted(self, prompts: np.ndarray) -> Paired:
        """Only the rows of the given prompt ids (in that order): two runs compared on the same prompts."""
        index = [int(np.flatnonzero(self.prompts == prompt)[0]) for prompt in prompts]
        return Paired(self.cell_time[index], self.cell_tokens[index], self.base_time[index], self.base_tokens[index],
                      self.counts[index], np.asarray(prompts))

    @property
    def shape(self) -> tuple[int, int]:
        return self.cell_time.shape

    def point(self) -> float:
        sums = [_point(array, self.counts) for array in (self.cell_time, self.cell_tokens, self.base_time,
                                                          self.base_tokens)]
        return (sums[2] / sums[3]) / (sums[0] / sums[1]) if sums[0] and sums[3] else float("nan")

    def samples(self, chosen: Draws) -> np.ndarray:
        """Bootstrap samples of (baseline time per token) / (cell time per token)."""
        sums = [_resampled_sums(array, self.counts, chosen) for array in (self.cell_time, self.cell_tokens,
                                                                          self.base_time, self.base_tokens)]
        return (sums[2] / sums[3]) / (sums[0] / sums[1])


@dataclass(frozen=True)
class Sources:
    """The two sources of a speedup interval's width, each as a half-width relative to the point (0.1 = +-10%):
    `prompts` the workload (prompts resampled, their rounds kept), `rounds` the timing noise (each prompt
    kept, its rounds resampled); NaN where a source cannot be seen (one prompt; one round of every prompt)."""

    prompts: float
    rounds: float
    units: int  # the paired (prompt, round) units


def sources(paired: Paired, resamples: int = RESAMPLES, seed: int = 0) -> Sources:
    point = paired.point()
    prompts, repeats = paired.shape
    units = int(paired.counts.sum())

    def half_width(chosen: Draws) -> float:
        low, high = bounds(paired.samples(chosen))
        return (high - low) / 2 / point if point else float("nan")

    over_prompts = half_width(draws_over_prompts(paired.counts, repeats, resamples, seed)) if prompts > 1 else np.nan
    over_rounds = (half_width(draws_over_rounds(prompts, repeats, resamples, seed)) if paired.counts.max(initial=0) > 1
                   else np.nan)
    return Sources(float(over_prompts), float(over_rounds), units)


def speedup(cell: Units, baseline: Units, chosen: Draws | None = None) -> tuple[float, float, float]:
    """The speedup of `cell` over `baseline` (ratio of sums of time per token) and its interval."""
    paired = Paired.of(cell, baseline)
    point = paired.point()
    if int(paired.counts.sum()) < 2:
        return point, float("nan"), float("nan")
    return point, *bounds(paired.samples(chosen or draws(*paired.shape)))


def _pack(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Keep the `present` units of each row, packed to the left (NaN after them)."""
    packed = np.full(values.shape, np.nan)
    for row in range(values.shape[0]):
        kept = values[row, present[row]]
        packed[row, : len(kept)] = kept
    return packed


def bounds(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile interval of bootstrap samples."""
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.nanpercentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def mean(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """The mean of per-prompt values (e.g. a quality score's change) with its bootstrap interval."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()) if len(values) else float("nan"), float("nan"), float("nan")
    chosen = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    return float(values.mean()), *bounds(values[chosen].mean(axis=1))
