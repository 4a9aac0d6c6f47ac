"""Latency per request, as serving benchmarks report it, and how the rows of one batch share its time.

Per request (one stored row): TTFT, the time to its first token (EOS included: a request answered by EOS alone
has its TTFT); TPOT, (E2E - TTFT) / (tokens - 1), the time per output token after the first; ITL, the gaps
between consecutive emitted tokens (a speculative round emits its tokens at one time: a burst, gaps of 0);
E2E, from the start of its batch to its last token. Every time counts from the start of the batch the
request was decoded in (at batch 1, its own generation), prefill included.

Time of a batch in the stored rows: each row's `time_s` is the batch's wall time divided equally among its
rows (likewise `prefill_s`, `decode_s` and the process's `cpu_s`), so a cell's Σ time_s is the wall time of
its batches and Σ new_tokens / Σ time_s counts every row's tokens over the batches' wall time: throughput.
The batch's own wall time is kept (`batch_time_s`, with `batch_rows` and `batch_index`), and each row's own
times are the latency columns (`ttft_s`, `e2e_s`, `token_times`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from skipbench.decoding.record import Generation

PERCENTILES = (50, 90, 99)
MEASURES = ("ttft", "tpot", "itl", "e2e")


def row_latency(generation: Generation) -> dict:
    """A request's latency columns, from its record (batch 1 or a row of a batch)."""
    times = list(generation.token_times)
    first = times[0] if times else generation.prefill_s
    e2e = generation.time_s if not times else max(times[-1], 0.0)
    return {"ttft_s": first, "e2e_s": e2e, "token_times": times}


def shared(generations: Sequence[Generation], wall: float) -> list[dict]:
    """Each row's share of its batch's time (equal shares; see the module docstring) and the batch columns."""
    rows = len(generations)
    prefill = min((record.prefill_s for record in generations), default=0.0)
    return [{"time_s": wall / rows, "prefill_s": prefill / rows, "decode_s": (wall - prefill) / rows,
             "batch_time_s": wall, "batch_rows": rows} for _ in generations]


def tpot(ttft: float, e2e: float, tokens: int) -> float:
    """Time per output token after the first; NaN for a request of fewer than two tokens."""
    return (e2e - ttft) / (tokens - 1) if tokens > 1 else float("nan")


def gaps(times: Sequence[float]) -> list[float]:
    """Inter-token latencies: the gaps between consecutive emitted tokens' times."""
    return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]


def request_values(rows) -> dict[str, list[float]]:
    """Per measure, the values over a cell's requests (rows with latency columns); ITL pools every gap."""
    values: dict[str, list[float]] = {name: [] for name in MEASURES}
    for row in rows:
        ttft, e2e = float(row["ttft_s"]), float(row["e2e_s"])
        values["ttft"].append(ttft)
        values["e2e"].append(e2e)
        per_token = tpot(ttft, e2e, int(row["new_tokens"]))
        if per_token == per_token:
            values["tpot"].append(per_token)
        values["itl"] += gaps(list(row["token_times"]))
    return values


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def percentile_interval(values: Sequence[float], q: float, resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float, float]:
    """(estimate, low, high): the q-th percentile and its bootstrap interval over the values."""
    data = np.asarray(values, dtype=float)
    if not len(data):
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = np.percentile(data[rng.integers(0, len(data), size=(resamples, len(data)))], q, axis=1)
    tail = (1 - level) / 2 * 100
    return percentile(data, q), float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


def latency_columns(rows) -> dict[str, float]:
    """`ttft_p50_s`, ... `itl_p99_s` with `_low`/`_high` bootstrap bounds, for a cell's rows; {} for rows of runs
    before latency columns."""
    rows = list(rows)
    if not rows or any("ttft_s" not in row or row["ttft_s"] != row["ttft_s"] for row in rows):
        return {}
    columns = {}
    for name, values in request_values(rows).items():
        for q in PERCENTILES:
            estimate, low, high = percentile_interval(values, q)
            columns |= {f"{name}_p{q}_s": estimate, f"{name}_p{q}_s_low": low, f"{name}_p{q}_s_high": high}
    return columns
