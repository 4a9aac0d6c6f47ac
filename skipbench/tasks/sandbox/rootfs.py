"""Namespaces and the filesystem view of the sandbox (run in the keeper and in init).

Sandbox side: standard library and .linux only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re

from . import linux


def is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def enter_namespaces(userns: bool) -> None:
    """Unshare mount, PID, network and IPC namespaces (and a user namespace that maps only us, when
    not root); the next child forked is PID 1 of the new PID namespace."""
    # IPC too: System V shared memory and message queues are otherwise shared with the host.
    flags = linux.CLONE_NEWNS | linux.CLONE_NEWPID | linux.CLONE_NEWNET | linux.CLONE_NEWIPC
    libc = linux.libc()
    if not userns:
        linux.check(libc.unshare(flags), "unshare(mount, pid, net, ipc)", " (a container without CAP_SYS_ADMIN?)")
        return
    uid, gid = os.getuid(), os.getgid()
    linux.check(
        libc.unshare(flags | linux.CLONE_NEWUSER),
        "unshare(user, mount, pid, net, ipc)",
        " (unprivileged user namespaces off? see the sysctls user.max_user_namespaces, "
        "kernel.unprivileged_userns_clone, kernel.apparmor_restrict_unprivileged_userns)",
    )
    # Map only ourselves (to root in the namespace, which owns the new mounts); nothing else is needed.
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def build_filesystem(hide: list[str], keep: list[str], workdir: str, file_bytes: int) -> None:
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)  # nothing mounted from here on reaches the host
    # Hold what must stay visible under a covered directory before covering it.
    exposed = [(path, os.open(path, os.O_PATH)) for path in keep if any(is_under(path, h) for h in hide)]
    for directory in hide:
        if directory == workdir:
            options = f"size={4 * file_bytes},nr_inodes=4096,mode=1777"
        else:
            options = "size=1m,nr_inodes=256,mode=755"
        linux.mount("tmpfs", directory, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, options)
    for path, fd in exposed:
        os.makedirs(path, 0o755, exist_ok=True)
        linux.mount(f"/proc/self/fd/{fd}", path, None, linux.MS_BIND | linux.MS_REC)
        os.close(fd)
    set_readonly("/", True, recursive=True)
    set_readonly(workdir, False, recursive=False)  # the binds inside it stay read-only
    flags = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC | linux.MS_RDONLY
    try:  # a proc of the new PID namespace: the host's processes disappear
        linux.mount("proc", "/proc", "proc", flags)
    except OSError:  # refused in some containers (a partly covered /proc): hide the host's instead
        linux.mount("tmpfs", "/proc", "tmpfs", flags, "size=4k,mode=555")


# Per-mount flags that must be repeated on a read-only remount (a user namespace may not clear them).
_KEPT_FLAGS = {"nosuid": linux.MS_NOSUID, "nodev": linux.MS_NODEV, "noexec": linux.MS_NOEXEC,
               "noatime": linux.MS_NOATIME, "nodiratime": linux.MS_NODIRATIME, "relatime": linux.MS_RELATIME,
               "strictatime": linux.MS_STRICTATIME}


def set_readonly(path: str, readonly: bool, *, recursive: bool) -> None:
    attr = linux.MountAttr(attr_set=linux.MOUNT_ATTR_RDONLY if readonly else 0,
                           attr_clr=0 if readonly else linux.MOUNT_ATTR_RDONLY)
    flags = linux.AT_RECURSIVE if recursive else 0
    result = linux.libc().syscall(linux.SYS_MOUNT_SETATTR, linux.AT_FDCWD, path.encode(), flags,
                                  ctypes.byref(attr), ctypes.sizeof(attr))
    if result == 0:
        return
    if ctypes.get_errno() != errno.ENOSYS:  # ENOSYS: a kernel before 5.12; anything else is a real failure
        linux.check(result, f"mount_setattr {path}")
    # Old kernels: remount every mount below path, one by one, keeping its locked flags.
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4:6] for line in f]
    for point, options in mounts:
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
        if point == path or (recursive and is_under(point, path)):
            flags = linux.MS_REMOUNT | linux.MS_BIND | (linux.MS_RDONLY if readonly else 0)
            flags |= sum(_KEPT_FLAGS.get(option, 0) for option in options.split(","))
            linux.mount(None, point, None, flags)
