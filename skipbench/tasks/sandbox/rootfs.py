"""Namespaces and the filesystem view of the sandbox (run in the keeper and in init).

Sandbox side: standard library and .linux only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat

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


STAGE = "/tmp"  # where init assembles the new root (a mount in its own namespace only; the host's /tmp stays)


def build_root(paths: list[str], workdir: str, file_bytes: int) -> None:
    """Make a fresh root that holds only ``paths`` (bound read-only at their own place), a minimal /dev,
    a new /proc and a writable tmpfs at ``workdir``, and switch to it: the rest of the host's filesystem
    (project trees, home directories, sockets in /run or /tmp) is not there at all.

    ``paths`` must not lie inside one another: every mount point is created in the new root's own
    tmpfs, never through a bind into the host.
    """
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)  # nothing mounted from here on reaches the host
    # Hold every source before STAGE covers whatever of it lay under the host's /tmp.
    held = []
    for path in paths:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        held.append((path, fd, stat.S_ISDIR(os.fstat(fd).st_mode)))
    linux.mount("tmpfs", STAGE, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=1m,nr_inodes=4096,mode=755")
    scratch = STAGE + workdir
    os.makedirs(scratch, 0o755, exist_ok=True)
    linux.mount("tmpfs", scratch, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                f"size={4 * file_bytes},nr_inodes=4096,mode=1777")
    for path, _, is_dir in held:  # mount points first, so that no directory is ever made through a bind
        target = STAGE + path
        if is_dir:
            os.makedirs(target, 0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
    for path, fd, _ in held:
        # Device files keep working: a bind keeps its source's mount flags (not the new root's nodev).
        linux.mount(f"/proc/self/fd/{fd}", STAGE + path, None, linux.MS_BIND | linux.MS_REC)
        os.close(fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.makedirs(STAGE + "/dev", 0o755, exist_ok=True)
        os.symlink(target, f"{STAGE}/dev/{name}")
    os.makedirs(STAGE + "/proc", 0o555, exist_ok=True)
    flags = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC | linux.MS_RDONLY
    try:  # a proc of the new PID namespace: it shows only the sandbox's processes
        linux.mount("proc", STAGE + "/proc", "proc", flags)
    except OSError:  # refused in some containers (a partly covered /proc): leave it empty
        pass
    set_readonly(STAGE, True, recursive=True)
    set_readonly(scratch, False, recursive=False)  # binds inside it (a venv under /tmp) stay read-only
    _switch_root(STAGE)


def _switch_root(new_root: str) -> None:
    """Make new_root "/" and drop the old root from this mount namespace altogether."""
    os.chdir(new_root)
    libc = linux.libc()
    if linux.SYS_PIVOT_ROOT is not None and libc.syscall(linux.SYS_PIVOT_ROOT, b".", b".") == 0:
        # The old root is now stacked on "/"; detaching it leaves the new root alone.
        linux.check(libc.umount2(b".", linux.MNT_DETACH), "umount the old root")
    else:  # pivot_root refused (a root that is rootfs) or unknown here: move the new root over "/"
        linux.mount(".", "/", None, linux.MS_MOVE)
        linux.check(libc.chroot(b"."), "chroot")
    os.chdir("/")


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
