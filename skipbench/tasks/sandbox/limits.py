"""Resource limits and privileges: what the harness process gets before it execs the interpreter.

Sandbox side (the keeper loads it under ``python -I -S``) and host side (Limits, rlimits): standard
library and .linux only.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import asdict, dataclass

from . import linux

NOBODY = 65534  # the uid and gid root drops to
# When no cgroup caps the sandbox's memory, the process limit gives way before the per-process memory,
# but not below this many (the harness is one of them; as root, RLIMIT_NPROC counts every uid-65534
# process on the machine).
MIN_PROCESSES = 8


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30  # RLIMIT_AS of each process
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE; the /tmp tmpfs holds 4x this in all
    processes: int = 64  # RLIMIT_NPROC (and pids.max where a cgroup is made)
    open_files: int = 64  # RLIMIT_NOFILE
    memory_total_bytes: int = 2 << 30  # all the sandbox's processes together: see rlimits()

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:  # 0 would mean "no limit" to setitimer, and no program can run under the others
                raise ValueError(f"Limits.{name} must be positive, got {value}")


def rlimits(limits: Limits, *, capped: bool) -> dict:
    """The per-process limits for the harness, as a dict of Limits' fields.

    capped: a cgroup holds the total to memory_total_bytes, so every limit stays as given. Otherwise
    RLIMIT_NPROC x RLIMIT_AS is the only bound on the total: the process limit is lowered first (to
    memory_total_bytes // memory_bytes, but not below MIN_PROCESSES), then the memory per process.
    """
    values = asdict(limits)
    if capped:
        return values
    processes, memory = limits.processes, limits.memory_bytes
    if processes * memory > limits.memory_total_bytes:
        processes = min(processes, max(limits.memory_total_bytes // memory, MIN_PROCESSES))
        memory = min(memory, limits.memory_total_bytes // processes)
    values.update(processes=processes, memory_bytes=memory)
    return values


def apply_limits(resource, limits: dict, *, strict: bool) -> None:
    """Set the rlimits of this process; strict: fail when the OS refuses one (uncontained runs take
    what the OS allows: macOS refuses some of these)."""
    wanted = [
        (resource.RLIMIT_AS, limits["memory_bytes"], limits["memory_bytes"]),
        # SIGXCPU at cpu_s (it kills Python), SIGKILL one second later if it is caught.
        (resource.RLIMIT_CPU, limits["cpu_s"], limits["cpu_s"] + 1),
        (resource.RLIMIT_FSIZE, limits["file_bytes"], limits["file_bytes"]),
        (resource.RLIMIT_NPROC, limits["processes"], limits["processes"]),
        (resource.RLIMIT_NOFILE, limits["open_files"], limits["open_files"]),
        (resource.RLIMIT_CORE, 0, 0),  # a crash writes no core file (and core helpers are told so)
    ]
    for which, soft, hard in wanted:
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:  # only root may raise a hard limit
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            if strict:
                raise


def drop_privileges(*, root: bool) -> None:
    """No capabilities, no_new_privs, an empty session keyring; root also becomes uid/gid 65534."""
    libc = linux.libc()
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries (su, sudo, ping) grant nothing
    # Empty the bounding set: exec then gives no capability back, even to uid 0 in our user namespace
    # (which could otherwise unmount the covers or remount the filesystem writable).
    cap = 0
    while libc.prctl(linux.PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) == 0:
        cap += 1
    if cap == 0 or ctypes.get_errno() != 22:  # EINVAL: past the last capability this kernel knows
        linux.check(-1, "dropping the capability bounding set")
    linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL)
    # A new, empty session keyring: the inherited one stays "possessed" across setuid, and may hold
    # the user's keys or tickets. Failure is fine: it means keyctl is filtered out (seccomp) altogether.
    if linux.SYS_KEYCTL is not None:
        libc.syscall(linux.SYS_KEYCTL, linux.KEYCTL_JOIN_SESSION_KEYRING, None)
    if root:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)  # also clears every capability
    else:
        header = (ctypes.c_uint32 * 2)(linux.LINUX_CAPABILITY_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (x2): all empty
        linux.check(libc.capset(header, data), "capset")
