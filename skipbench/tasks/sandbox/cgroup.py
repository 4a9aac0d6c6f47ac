"""A cgroup v2 that caps the memory (and the process count) of the whole sandbox, where one can be made.

Host side: skipbench makes it before starting the keeper, the keeper moves itself into it (so init, the
harness and every process of the program start there), and skipbench removes it once the keeper is gone.
"""

from __future__ import annotations

import os
import secrets
import time


def _own_cgroup() -> str | None:
    """The directory of this process's cgroup v2, or None (no cgroup2 mount, a cgroup v1-only machine)."""
    try:
        with open("/proc/self/cgroup") as f:
            unified = [line.strip()[3:] for line in f if line.startswith("0::")]
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    if not unified:
        return None
    for fields in mounts:
        fstype = fields[fields.index("-") + 1]
        root, point = fields[3], fields[4]
        if fstype == "cgroup2" and (unified[0] + "/").startswith(root.rstrip("/") + "/"):
            return os.path.join(point, unified[0][len(root.rstrip("/")):].lstrip("/"))
    return None


def _read_words(path: str) -> list[str]:
    with open(path) as f:
        return f.read().split()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def create(memory_bytes: int, processes: int, *, parent: str | None = None) -> str | None:
    """A new cgroup below ours (or below ``parent``) with memory.max, memory.swap.max=0 and pids.max set;
    None where that cannot be done (no cgroup v2 memory controller, no write access, or our own cgroup
    holds processes, so that the kernel refuses to enable controllers for its children)."""
    parent = parent or _own_cgroup()
    if parent is None:
        return None
    try:
        available = _read_words(os.path.join(parent, "cgroup.controllers"))
        if "memory" not in available:
            return None
        wanted = [name for name in ("memory", "pids") if name in available]
        enabled = _read_words(os.path.join(parent, "cgroup.subtree_control"))
        if any(name not in enabled for name in wanted):
            _write(os.path.join(parent, "cgroup.subtree_control"), " ".join("+" + name for name in wanted))
        path = os.path.join(parent, f"skipbench-sandbox-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(path)
    except OSError:
        return None
    try:
        _write(os.path.join(path, "memory.max"), str(memory_bytes))
        if os.path.exists(os.path.join(path, "memory.swap.max")):  # absent without swap accounting
            _write(os.path.join(path, "memory.swap.max"), "0")  # else the cap would only move pages to swap
        if "pids" in wanted:
            _write(os.path.join(path, "pids.max"), str(processes))
    except OSError:
        remove(path)
        return None
    return path



def remove(path: str, *, wait_s: float = 2.0) -> None:
    """Remove the cgroup once its processes are gone (killing any that are left)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return  # left behind, empty of limits that matter; never fail a run over it
        try:
            _write(os.path.join(path, "cgroup.kill"), "1")  # Linux 5.14+; processes exiting anyway otherwise
        except OSError:
            pass
        time.sleep(0.02)
