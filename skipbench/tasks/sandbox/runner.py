"""The skipbench side of the sandbox: build the configuration, start the keeper, feed the program in
and read the verdict out. Runs in the skipbench process; the keeper and everything below it run the
sandbox-side modules (keeper, rootfs, limits, linux, verdict) in processes of their own.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time

from . import cgroup, verdict
from .limits import NOBODY, Limits, rlimits
from .verdict import Outcome, SandboxUnavailable, SetupError

OPT_IN = "--execute-code-uncontained"
OPT_IN_MEANING = (
    "runs model-written code with only resource limits: it can read and write your files and use the network"
)

_WORKDIR = "/tmp"  # the only writable place inside the sandbox (a fresh tmpfs there)
_TAIL_BYTES = 2048  # how much of stderr is kept; the rest is read and dropped, so output cannot flood memory
_GRACE_S = 10.0  # extra time for the keeper to start and report before skipbench kills it itself
_SIDE = os.path.dirname(os.path.abspath(__file__))  # the sandbox-side modules, loaded by the keeper

# The keeper's whole command line: no host path and no configuration, since inside the sandbox it is
# /proc/1/cmdline (init is a fork of the keeper). The configuration comes first on stdin, as one JSON
# line read a byte at a time (the rest of stdin is the harness's payload, so nothing may be read ahead).
# -I -S: no site-packages, no environment; this directory is loaded as a bare package "sandbox_side",
# without the skipbench package (whose imports are skipbench's, not the keeper's).
BOOT = """\
import json, os, sys, types
line = bytearray()
while not line.endswith(b"\\n"):
    byte = os.read(0, 1)
    if not byte:
        raise SystemExit("setup-error no configuration on stdin")
    line += byte
config = json.loads(line)
side = types.ModuleType("sandbox_side")
side.__path__ = [config["modules"]]
sys.modules["sandbox_side"] = side
from sandbox_side.keeper import main
main(config)
"""


@functools.cache
def sandbox_support() -> str | None:
    """None when the namespace sandbox works on this machine, else a one-line reason (cached)."""
    if not sys.platform.startswith("linux"):
        return f"Linux namespaces are needed and this is {sys.platform}"
    # Build a real sandbox once: it is the only check that covers every step (namespaces, mounts,
    # the interpreter being reachable as uid 65534, ...).
    try:
        outcome = _run("def check():\n    pass\n", "check()", Limits(), contained=True)
    except (SetupError, OSError) as exc:
        return str(exc)
    if not outcome.passed:
        last = outcome.detail.strip().splitlines()[-1:] or [""]
        return f"the sandbox self-test did not pass ({outcome.reason}) {last[0]}".strip()
    return None


def run_check(program: str, call: str, *, limits: Limits = Limits(), allow_uncontained: bool = False) -> Outcome:
    """Run ``program``, then the harness's own ``call``; passed only when the call returned.

    For HumanEval: program = prompt + completion + "\\n\\n" + test (which defines check), and
    call = f"check({entry_point})". Both run in one fresh globals dict named "__main__"; stdin is empty,
    stdout is discarded. Raises SandboxUnavailable where the namespace sandbox cannot run, unless
    allow_uncontained=True (then Outcome.contained is False).
    """
    problem = sandbox_support()
    if problem is None:
        try:
            return _run(program, call, limits, contained=True)
        except SetupError as exc:  # the self-test passed but this run could not be set up
            problem = str(exc)
    if not allow_uncontained:
        message = f"cannot sandbox model-written code ({problem}); to run it anyway pass {OPT_IN}, which "
        raise SandboxUnavailable((message + OPT_IN_MEANING).replace("\n", " "))
    return _run(program, call, limits, contained=False)


def _use_userns() -> bool:
    """Root drops to uid 65534 instead, unless 65534 does not exist here (root of a user namespace that
    maps only root, as in some rootless containers)."""
    return os.geteuid() != 0 or not _uid_mapped(NOBODY)


def _uid_mapped(uid: int) -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            ranges = [tuple(map(int, line.split())) for line in f]
    except OSError:
        return True  # no user namespaces at all: every uid exists
    return any(inside <= uid < inside + count for inside, _, count in ranges)


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


# What the new root holds besides the interpreter: the system's programs and libraries (the interpreter,
# its extension modules and /bin/sh link against them; the /lib* links are bound as the directories they
# lead to), the loader's cache, and the harmless devices.
_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/etc/localtime",
                 "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


def interpreter() -> str:
    """The interpreter the harness runs: the installation's own binary, not a virtual environment's link to it.
    The harness runs with -I -S (no site-packages), so nothing of a venv is needed inside, and a venv inside
    the user's project tree (.venv, .nox/...) stays out of the sandbox's root."""
    return os.path.realpath(sys.executable)


def _root_paths() -> list[str]:
    """The host paths the sandbox's root holds, read-only, at their own place: outermost only, none inside
    another. Of Python only the installation the interpreter belongs to (binary, libpython, stdlib)."""
    named = [sys.base_prefix, sys.base_exec_prefix, os.path.dirname(interpreter())]
    candidates = [*_SYSTEM_PATHS, *map(os.path.abspath, named), *map(os.path.realpath, named)]
    paths = []
    for path in candidates:
        if path not in paths and path != "/" and os.path.exists(path) and not _is_under(path, "/proc"):
            paths.append(path)
    return [p for p in paths if not any(q != p and _is_under(p, q) for q in paths)]


def _run(program: str, call: str, limits: Limits, *, contained: bool) -> Outcome:
    # Contained runs get a cgroup that caps the total where one can be made; otherwise (and uncontained)
    # the per-process limits are lowered until their product is the total.
    group = cgroup.create(limits.memory_total_bytes, limits.processes) if contained else None
    memory_cap = "rlimit" if group is None else "cgroup"
    try:
        return _start(program, call, limits, contained=contained, group=group, memory_cap=memory_cap)
    finally:
        if group is not None:
            cgroup.remove(group)


def _start(program: str, call: str, limits: Limits, *, contained: bool, group: str | None,
           memory_cap: str) -> Outcome:
    nonce = secrets.token_hex(16)
    payload = json.dumps({"nonce": nonce, "program": program, "call": call}).encode()
    read_end, write_end = os.pipe()
    config = {
        "modules": _SIDE,
        "contained": contained,
        "userns": _use_userns(),
        "limits": rlimits(limits, capped=group is not None),
        "cgroup": group,
        "executable": interpreter(),
        "root": _root_paths(),
        "workdir": os.path.realpath(_WORKDIR),
        "result_fd": write_end,
    }
    try:
        proc = subprocess.Popen(
            [interpreter(), "-I", "-S", "-B", "-c", BOOT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,  # the keeper's and init's status lines; the harness gets /dev/null
            stderr=subprocess.PIPE,
            pass_fds=(write_end,),
            start_new_session=True,
            env={"PATH": os.defpath, "LANG": "C.UTF-8"},  # the keeper execs by absolute path
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)  # the verdict pipe reaches EOF once the last sandbox process is gone
    try:
        stdin = json.dumps(config).encode() + b"\n" + payload
        status, tail = _exchange(proc, stdin, deadline=time.monotonic() + limits.wall_s + _GRACE_S)
        proc.wait()
        os.set_blocking(read_end, False)
        try:
            written = os.read(read_end, 65536)
        except BlockingIOError:
            written = b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
        os.close(read_end)
    return verdict.outcome(status.decode(errors="replace"), written.decode(errors="replace"), nonce, tail,
                           contained, memory_cap)


def _exchange(proc: subprocess.Popen, payload: bytes, deadline: float) -> tuple[bytes, bytes]:
    """Write the payload to stdin; read the keeper's status (stdout) and the tail of stderr until EOF."""
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    todo = memoryview(payload)
    os.set_blocking(proc.stdin.fileno(), False)
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdin, selectors.EVENT_WRITE)
        for stream in buffers:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            if proc.poll() is not None:
                # The keeper is gone, and with it the sandbox: drain the pipes briefly, then stop. (Only a
                # process that escaped an uncontained run's process group can still hold them open.)
                deadline = min(deadline, time.monotonic() + 0.25)
            left = deadline - time.monotonic()
            if left <= 0:
                if proc.poll() is None:  # the keeper enforces wall_s itself; this is the backstop for a hang
                    os.killpg(proc.pid, signal.SIGKILL)
                    buffers[proc.stdout] += b"\ntimeout\n"
                break
            for key, _ in selector.select(min(left, 0.1)):
                if key.fileobj is proc.stdin:
                    try:
                        todo = todo[os.write(key.fd, todo[:65536]) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # nothing reads it any more; the status says why
                        todo = todo[:0]
                    if not todo:
                        selector.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                buffer = buffers[key.fileobj]
                buffer += data
                del buffer[:-_TAIL_BYTES]
    return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr])


