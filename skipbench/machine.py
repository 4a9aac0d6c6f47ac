"""The state of the machine a measurement runs on, and whether timings taken on it can be trusted.

As pyperf does, a run records the load average, CPU count, threads and (where readable) the frequency
governor before and after it is measured, and says so when other work competed for the CPU.
"""

from __future__ import annotations

import os
from pathlib import Path


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
