"""The state of the machine a measurement runs on, and whether timings taken on it can be trusted.

As pyperf does, a run records the load average, CPU count, threads and (where readable) the frequency
governor before and after it is measured, and says so when other work competed for the CPU. Bursts between
those two samples are seen generation by generation: each row records the process's CPU time next to its
wall time, and a CPU generation that got much less CPU than its threads could use was preempted (`preempted`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def default_threads() -> int:
    """CPU threads for torch when the user gives none: half the cores, at least one.

    Batch-1 decoding of small models gains little from more threads, and on a machine where another job
    runs, threads beyond the free cores make every step wait for a descheduled one (measured here on 2
    cores: two threads were 5-20x slower than one while another job ran). Half leaves room for that job.
    """
    return max(1, (os.cpu_count() or 1) // 2)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def governor() -> str | None:
    path = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    try:
        return path.read_text().strip()
    except OSError:
        return None


def state(threads: int) -> dict:
    return {"load_1min": load_average(), "cpu_count": os.cpu_count(), "threads": threads, "governor": governor()}


def busy_warning(snapshot: dict, *, when: str) -> str | None:
    """A warning when other work held the cores this run needs (load above the cores left over for it)."""
    load, cores, threads = snapshot.get("load_1min"), snapshot.get("cpu_count") or 1, snapshot.get("threads") or 1
    if load is None:
        return None
    # `when` == "after": our own threads count in the load average.
    others = load - (threads if when == "after" else 0)
    if others > max(cores - threads, 0) + 0.5:
        return (f"the machine was busy {when} the measurement (load {load:.1f} on {cores} cores, {threads} "
                f"thread(s) for skipbench): timings are noisier and may be biased; rerun on a quiet machine "
                f"or read the intervals")
    return None


# --------------------------------------------------------------------------- preemption, generation by generation

# A generation on the CPU keeps at least one core busy from start to end (the thread that runs the model, and
# torch's other threads, spin on the work); one that got under this share of the CPU time its threads could
# use was taken off the CPU by other work, and its wall time is inflated by that wait.
PREEMPTED = 0.75


def cpu_shares(rows) -> pd.Series:
    """Per row: CPU seconds of the process during the generation over its wall seconds; NaN where the row has
    no CPU time (runs of older skipbench versions) or was timed on an accelerator (the host waits on it)."""
    import numpy as np
    import pandas as pd

    if "cpu_s" not in rows or "device" not in rows:
        return pd.Series(np.nan, index=rows.index)
    on_cpu = rows["device"].astype(str).str.startswith("cpu")
    share = pd.to_numeric(rows["cpu_s"], errors="coerce") / rows["time_s"]
    return share.where(on_cpu & (rows["time_s"] > 0))


def preempted(rows) -> pd.Series:
    """Rows whose generation got under PREEMPTED of the CPU its threads could use: at least one core, or
    what the cell's generations typically used (its median share, up to its thread count) when that is more."""
    share = cpu_shares(rows)
    typical = share.median()
    if typical != typical:
        return share.notna()  # all False
    threads = rows["cpu_threads"] if "cpu_threads" in rows else 1
    expected = (share * 0 + max(1.0, typical)).clip(upper=threads).clip(lower=1.0)
    return share < PREEMPTED * expected


def median_cpu_share(rows) -> float:
    share = cpu_shares(rows)
    return float(share.median()) if share.notna().any() else float("nan")


def preempted_warning(session: list[tuple[str, dict]]) -> str | None:
    """A warning when generations of this session were preempted ((cell key, row) pairs, as measured)."""
    import pandas as pd

    if not session:
        return None
    frame = pd.DataFrame([row | {"cell_key": key} for key, row in session])
    flagged = sum(int(preempted(part).sum()) for _, part in frame.groupby("cell_key", sort=False))
    if not flagged:
        return None
    return (f"the machine was busy during the measurement: {flagged} of {len(frame)} generations got under "
            f"{PREEMPTED:.0%} of the CPU time their thread(s) could use (other work preempted them); their times "
            f"are inflated: rerun on a quieter machine, or read the intervals (skipbench report lists the cells)")
