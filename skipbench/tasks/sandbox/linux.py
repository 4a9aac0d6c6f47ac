"""Linux system calls that the os module lacks, through ctypes: mount, prctl, mount_setattr, ...

Sandbox side: imports only the standard library, so that the keeper can load it under ``python -I -S``.
"""

from __future__ import annotations

import ctypes
import functools
import os

# include/uapi/linux/{sched,mount,prctl,capability}.h; the syscall numbers are the same on every
# architecture for calls added since Linux 5.1.
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 8192, 16384, 1 << 18)
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 24, 36, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 1
LINUX_CAPABILITY_VERSION_3 = 0x20080522
KEYCTL_JOIN_SESSION_KEYRING = 1
# Older calls have per-architecture numbers (and no glibc wrapper).
_MACHINE = os.uname().machine
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219, "riscv64": 219}.get(_MACHINE)
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}.get(_MACHINE)


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class CallFailed(OSError):
    def __str__(self) -> str:
        return self.strerror  # "mount /tmp: Operation not permitted", without "[Errno 1]"


def check(result: int, what: str, hint: str = "") -> None:
    """Raise CallFailed (errno and a one-line message) when a libc call returned non-zero."""
    if result != 0:
        err = ctypes.get_errno()
        raise CallFailed(err, f"{what}: {os.strerror(err)}{hint}")


def prctl(option: int, arg: int = 0) -> None:
    check(libc().prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    check(libc().mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")
