"""Run model-written Python (HumanEval pass@1) so that it cannot harm the machine or fake a pass.

One call of run_check builds this process tree and tears all of it down before returning::

    skipbench                   this process: feeds the program in, reads the verdict out
      keeper                    python -I -S sandbox.py CONFIG; enforces the wall-clock limit
        init                    PID 1 of a new PID namespace; builds the filesystem view
          harness               python -I -B -c _HARNESS: rlimits, no capabilities, uid 65534 if root
            (the program's own processes)

Containment (Linux):
    * new mount, PID, network and IPC namespaces, plus a user namespace when not root (it is what lets
      an unprivileged user create the others). As root no user namespace is made: the harness drops to
      uid/gid 65534 instead, which makes root-only files unreadable and makes RLIMIT_NPROC apply (it
      never applies to root; a user namespace that maps only root would leave the code as real root
      towards every file). A root that has no uid 65534 (a user namespace mapping only root) is
      treated like any other user.
    * every mount is read-only; /tmp is a fresh, size-limited tmpfs and the working directory; /var/tmp,
      /dev/shm, /dev/pts, /run, /root, /home and $HOME are covered by empty tmpfs, except the interpreter's
      own directories (sys.prefix, sys.base_prefix, ...), which are bound back read-only; /proc is a new
      proc that shows only the sandbox's processes.
    * the network namespace has only a loopback interface, and it is down: no traffic at all.
    * the harness runs with no capabilities, no_new_privs (setuid binaries give nothing) and a new
      empty session keyring, under RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE and
      RLIMIT_CORE=0.
    * at the wall-clock limit the keeper kills init; the kernel then kills every process of the PID
      namespace (setsid and double forks included) and init only counts as exited once they are all
      gone, so nothing the program started outlives run_check.

Known gaps: the program can still read whatever is world-readable outside the covered directories
(and, when not root, whatever the user's own uid and supplementary groups can read there), and connect
to Unix sockets in those directories; memory is limited per process, so the program may use up to
processes x memory_bytes in all (a cgroup would bound the total; none is used); RLIMIT_NPROC cannot bind
real root, so root inside a user namespace that maps only root gets no process limit.

Verdict: the harness exec()s the program in a fresh globals dict, runs the call (``check(name)``) and
only then writes ``<nonce> passed`` to a pipe the program is not told about; the nonce is random per
call and reaches the harness on stdin. sys.exit(), os._exit(), SystemExit, killing itself or printing
"PASSED" therefore never pass. Not defended: the program runs in the harness's own process, so code
written to forge a pass can find the nonce and the pipe (frame inspection, /proc/self/fd) or patch
check(). That is cheating on purpose, not an accident of a wrong completion; the sandbox still keeps
it from doing anything outside.

Without namespaces (not Linux, user namespaces disabled, seccomp in a container) run_check raises
SandboxUnavailable unless allow_uncontained=True; then the program runs with the same rlimits and the
same verdict protocol in a temporary working directory, as the invoking user, with access to their files
and the network. On Linux the keeper is a child subreaper that kills every descendant before it exits;
elsewhere only the process group is killed, and a process that calls setsid() survives.

Cost: about 0.1-0.2 s per call on top of the program itself, mostly two interpreter start-ups (the
keeper, the harness); the first call also runs a self-test of the same cost (sandbox_support).
Calls are meant to be made one at a time; concurrent calls work, but as root they share the uid-65534
process budget (RLIMIT_NPROC counts every process of that uid on the machine).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import NoReturn

OPT_IN = "--execute-code-uncontained"
OPT_IN_MEANING = (
    "runs model-written code with only resource limits: it can read and write your files and use the network"
)


class SandboxUnavailable(Exception):
    """The namespace sandbox cannot run here; the message is one line: what is missing and the opt-in."""


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE; the /tmp tmpfs holds 4x this in all
    processes: int = 64  # RLIMIT_NPROC
    open_files: int = 64  # RLIMIT_NOFILE

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:  # 0 would mean "no limit" to setitimer, and no program can run under the others
                raise ValueError(f"Limits.{name} must be positive, got {value}")


@dataclass(frozen=True)
class Outcome:
    passed: bool
    # "passed", "failed: AssertionError" (any exception name), "memory" (MemoryError), "timeout",
    # "cpu time limit", "no result (exited early)", "no result (killed by SIGSEGV)", ...
    reason: str
    contained: bool  # True when it ran inside the namespace sandbox
    detail: str = ""  # the last 2 KiB of the program's stderr (the traceback), for humans


@functools.cache
def sandbox_support() -> str | None:
    """None when the namespace sandbox works on this machine, else a one-line reason (cached)."""
    if not sys.platform.startswith("linux"):
        return f"Linux namespaces are needed and this is {sys.platform}"
    # Build a real sandbox once: it is the only check that covers every step (namespaces, mounts,
    # the interpreter being reachable as uid 65534, ...).
    try:
        outcome = _run("def check():\n    pass\n", "check()", Limits(), contained=True)
    except (_SetupError, OSError) as exc:
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
        except _SetupError as exc:  # the self-test passed but this run could not be set up
            problem = str(exc)
    if not allow_uncontained:
        message = f"cannot sandbox model-written code ({problem}); to run it anyway pass {OPT_IN}, which "
        raise SandboxUnavailable((message + OPT_IN_MEANING).replace("\n", " "))
    return _run(program, call, limits, contained=False)


# --- skipbench side -------------------------------------------------------------------------------

_WORKDIR = "/tmp"  # the only writable place inside the sandbox (a fresh tmpfs there)
_TAIL_BYTES = 2048  # how much of stderr is kept; the rest is read and dropped, so output cannot flood memory
_GRACE_S = 10.0  # extra time for the keeper to start and report before skipbench kills it itself
_NOBODY = 65534  # the uid and gid root drops to
_RESULT_FD = 3  # where the keeper puts the verdict pipe (the harness moves it elsewhere before the program runs)


class _SetupError(SandboxUnavailable):
    """The sandbox itself could not be built (not the program's fault)."""


def _use_userns() -> bool:
    """Root drops to uid 65534 instead, unless 65534 does not exist here (root of a user namespace that
    maps only root, as in some rootless containers)."""
    return os.geteuid() != 0 or not _uid_mapped(_NOBODY)


def _uid_mapped(uid: int) -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            ranges = [tuple(map(int, line.split())) for line in f]
    except OSError:
        return True  # no user namespaces at all: every uid exists
    return any(inside <= uid < inside + count for inside, _, count in ranges)


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _outermost(paths: list[str]) -> list[str]:
    """Existing directories, resolved, without duplicates and without those inside another one."""
    real = []
    for path in paths:
        path = os.path.realpath(path)
        if path != "/" and os.path.isdir(path) and path not in real:
            real.append(path)
    return [p for p in real if not any(q != p and _is_under(p, q) for q in real)]


def _hidden_dirs() -> list[str]:
    # Where a user's own files and other people's sockets and temporary files usually are.
    # /run also holds sockets that connect() reaches whatever the network namespace (the docker socket,
    # databases, the system bus): a read-only mount does not stop connect(). /dev/pts: the user's terminals.
    return _outermost(
        [_WORKDIR, "/var/tmp", "/dev/shm", "/dev/pts", "/run", "/var/run", "/root", "/home", os.path.expanduser("~")]
    )


def _interpreter_dirs() -> list[str]:
    # What `python -I` needs to start: the venv (pyvenv.cfg, site-packages) and the installation it
    # points to (binary, libpython, stdlib), e.g. /root/.pyenv/versions/3.11.7 under a hidden /root.
    exe = sys.executable
    return _outermost(
        [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(exe),
         os.path.dirname(os.path.realpath(exe))]
    )


def _run(program: str, call: str, limits: Limits, *, contained: bool) -> Outcome:
    nonce = secrets.token_hex(16)
    payload = json.dumps({"nonce": nonce, "program": program, "call": call}).encode()
    read_end, write_end = os.pipe()
    config = {
        "contained": contained,
        "userns": _use_userns(),
        "limits": asdict(limits),
        "executable": sys.executable,
        "hide": _hidden_dirs(),
        "keep": _interpreter_dirs(),
        "workdir": os.path.realpath(_WORKDIR),
        "result_fd": write_end,
    }
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,  # the keeper's and init's status lines; the harness gets /dev/null
            stderr=subprocess.PIPE,
            pass_fds=(write_end,),
            start_new_session=True,
            env={"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8"},
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)  # the verdict pipe reaches EOF once the last sandbox process is gone
    try:
        status, tail = _exchange(proc, payload, deadline=time.monotonic() + limits.wall_s + _GRACE_S)
        proc.wait()
        os.set_blocking(read_end, False)
        try:
            verdict = os.read(read_end, 65536)
        except BlockingIOError:
            verdict = b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
        os.close(read_end)
    return _outcome(status.decode(errors="replace"), verdict.decode(errors="replace"), nonce, tail, contained)


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


def _outcome(status: str, verdict: str, nonce: str, tail: bytes, contained: bool) -> Outcome:
    detail = tail.decode(errors="replace")
    events = {}
    for line in status.splitlines():
        word, _, rest = line.partition(" ")
        if word == "setup-error":
            raise _SetupError(rest)
        events[word] = rest
    ours = [line[len(nonce) + 1 :] for line in verdict.splitlines() if line.startswith(nonce + " ")]
    if len(ours) == 1:  # exactly one line from the harness itself; a program's own writes have no nonce
        if ours[0] == "passed":
            return Outcome(True, "passed", contained, detail)
        name = ours[0].removeprefix("failed ")
        return Outcome(False, "memory" if name == "MemoryError" else f"failed: {name}", contained, detail)
    if "timeout" in events:
        reason = "timeout"
    elif "signal" in events:
        number = int(events["signal"])
        if number == signal.SIGXCPU:
            reason = "cpu time limit"
        else:
            try:
                reason = f"no result (killed by {signal.Signals(number).name})"
            except ValueError:
                reason = f"no result (killed by signal {number})"
    else:
        reason = "no result (exited early)"
    return Outcome(False, reason, contained, detail)


# --- inside the sandbox ---------------------------------------------------------------------------
# Everything below runs in the keeper (this file executed as a script), in init (a fork of the
# keeper) or in the harness, never in the skipbench process.

# The harness: reads the payload, runs the program and the call, writes the verdict. It keeps its own
# references to os.write and friends so that a program that rebinds them by accident changes nothing.
_HARNESS = r"""
import json, os, sys, traceback
def _harness():
    write, getpid, exit_now = os.write, os.getpid, os._exit
    payload = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the program sees an empty stdin
    os.close(null)
    out = os.dup(3)  # off the well-known number, and not inherited by anything the program execs
    os.close(3)
    nonce, me = payload["nonce"], getpid()
    scope = {"__name__": "__main__"}
    try:
        exec(compile(payload["program"], "<program>", "exec"), scope)
        exec(compile(payload["call"], "<harness>", "exec"), scope)
        verdict = "passed"
    except BaseException as exc:  # SystemExit and KeyboardInterrupt from the program are failures too
        verdict = "failed " + "".join(c for c in type(exc).__name__ if c.isalnum() or c == "_")[:80]
        try:
            traceback.print_exc(limit=-8)
            sys.stderr.flush()
        except BaseException:
            pass
    if getpid() == me:  # a fork of the harness that ran to here is not the harness
        write(out, (nonce + " " + verdict + "\n").encode())
    exit_now(0)
_harness()
"""

# Linux constants (include/uapi/linux/{sched,mount,prctl,capability}.h); the syscall numbers are the
# same on every architecture for calls added since Linux 5.1.
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 24, 36, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 1
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
KEYCTL_JOIN_SESSION_KEYRING = 1
_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219, "riscv64": 219}.get(os.uname().machine)  # no libc wrapper
# Per-mount flags that must be repeated on a read-only remount (a user namespace may not clear them).
_KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
               "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class _CallFailed(OSError):
    def __str__(self) -> str:
        return self.strerror  # "mount /tmp: Operation not permitted", without "[Errno 1]"


def _check(result: int, what: str, hint: str = "") -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise _CallFailed(err, f"{what}: {os.strerror(err)}{hint}")


def _prctl(option: int, arg: int = 0) -> None:
    _check(_libc().prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(_libc().mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _report(line: str) -> None:
    """A status line for skipbench on fd 1 (only the keeper and init have it; the harness has /dev/null)."""
    os.write(1, (line.replace("\n", " ") + "\n").encode())


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def _keeper(config: dict) -> NoReturn:
    """Start the sandbox, kill it at the wall-clock limit, report how it ended."""
    contained, linux = config["contained"], sys.platform.startswith("linux")
    workdir = config["workdir"]
    try:
        if linux:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # skipbench died: so does everything below
        if config["result_fd"] != _RESULT_FD:
            os.dup2(config["result_fd"], _RESULT_FD)
            os.close(config["result_fd"])
        if contained:
            _enter_namespaces(config["userns"])
        else:
            workdir = tempfile.mkdtemp(prefix="skipbench-exec-")
            if linux:  # orphans of the program (setsid, double fork) become our children, to be killed
                _prctl(PR_SET_CHILD_SUBREAPER, 1)
        child = os.fork()
    except OSError as exc:
        _report(f"setup-error {exc}")
        os._exit(1)
    if child == 0:
        if contained:
            _init(config)
        _exec_harness(config, workdir, contained=False)

    timed_out = False

    def on_alarm(signum: int, frame: object) -> None:
        nonlocal timed_out
        timed_out = True
        # Contained: init's death takes the whole PID namespace with it. Uncontained: the process
        # group now, the rest (setsid) once the harness is gone.
        try:
            if contained:
                os.kill(child, signal.SIGKILL)
            else:
                os.killpg(child, signal.SIGKILL)
        except OSError:  # already gone
            pass

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, config["limits"]["wall_s"])
    # Wait without reaping: while the child is a zombie its pid cannot be reused, so the kills above
    # and below never hit a stranger. Init only turns zombie after every process of its namespace died.
    os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)
    signal.setitimer(signal.ITIMER_REAL, 0)
    if not contained:
        try:
            os.killpg(child, signal.SIGKILL)  # whatever it left running in its process group
        except OSError:
            pass
    _, status = os.waitpid(child, 0)
    if not contained and linux:
        _kill_descendants()
    if timed_out:
        _report("timeout")
    if not contained:
        _report(_describe(status))
        shutil.rmtree(workdir, ignore_errors=True)
    os._exit(0)


def _kill_descendants() -> None:
    """Uncontained, on Linux: kill what the program left running. As a child subreaper the keeper
    inherits every orphan, so killing its children until none is left reaches every descendant."""
    me = os.getpid()
    while True:
        for pid in _children(me):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.waitpid(-1, 0)  # one killed child gone; its own children are ours now
        except ChildProcessError:
            return


def _children(parent: int) -> list[int]:
    children = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after "pid (comm)", which may hold spaces
        except (OSError, IndexError):
            continue  # not a process, or gone
        if int(fields[1]) == parent:
            children.append(int(entry))
    return children


def _enter_namespaces(userns: bool) -> None:
    # IPC too: System V shared memory and message queues are otherwise shared with the host.
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC
    if not userns:
        _check(_libc().unshare(flags), "unshare(mount, pid, net, ipc)", " (a container without CAP_SYS_ADMIN?)")
        return
    uid, gid = os.getuid(), os.getgid()
    _check(
        _libc().unshare(flags | CLONE_NEWUSER),
        "unshare(user, mount, pid, net, ipc)",
        " (unprivileged user namespaces off? see the sysctls user.max_user_namespaces, "
        "kernel.unprivileged_userns_clone, kernel.apparmor_restrict_unprivileged_userns)",
    )
    # Map only ourselves (to root in the namespace, which owns the new mounts); nothing else is needed.
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _init(config: dict) -> NoReturn:
    """PID 1 of the new PID namespace: when it exits, the kernel kills every process left in it."""
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the keeper was killed: take the namespace down
        # A PID-namespace init only gets signals it handles from inside the namespace: with no handler
        # the program cannot kill it (Python handles SIGINT by default).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.umask(0o022)
        _build_filesystem(config["hide"], config["keep"], config["workdir"], config["limits"]["file_bytes"])
        harness = os.fork()
    except OSError as exc:
        _report(f"setup-error {exc}")
        os._exit(1)
    if harness == 0:
        _exec_harness(config, config["workdir"], contained=True)
    _, status = os.waitpid(harness, 0)
    _report(_describe(status))
    os._exit(0)


def _build_filesystem(hide: list[str], keep: list[str], workdir: str, file_bytes: int) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted from here on reaches the host
    # Hold what must stay visible under a covered directory before covering it.
    exposed = [(path, os.open(path, os.O_PATH)) for path in keep if any(_is_under(path, h) for h in hide)]
    for directory in hide:
        if directory == workdir:
            options = f"size={4 * file_bytes},nr_inodes=4096,mode=1777"
        else:
            options = "size=1m,nr_inodes=256,mode=755"
        _mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, options)
    for path, fd in exposed:
        os.makedirs(path, 0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)
    _set_readonly("/", True, recursive=True)
    _set_readonly(workdir, False, recursive=False)  # the binds inside it stay read-only
    try:  # a proc of the new PID namespace: the host's processes disappear
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    except OSError:  # refused in some containers (a partly covered /proc): hide the host's instead
        _mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=555")


def _set_readonly(path: str, readonly: bool, *, recursive: bool) -> None:
    attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY if readonly else 0, attr_clr=0 if readonly else MOUNT_ATTR_RDONLY)
    flags = AT_RECURSIVE if recursive else 0
    result = _libc().syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, ctypes.byref(attr),
                             ctypes.sizeof(attr))
    if result == 0:
        return
    if ctypes.get_errno() != errno.ENOSYS:  # ENOSYS: a kernel before 5.12; anything else is a real failure
        _check(result, f"mount_setattr {path}")
    # Old kernels: remount every mount below path, one by one, keeping its locked flags.
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4:6] for line in f]
    for point, options in mounts:
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
        if point == path or (recursive and _is_under(point, path)):
            flags = MS_REMOUNT | MS_BIND | (MS_RDONLY if readonly else 0)
            flags |= sum(_KEPT_FLAGS.get(option, 0) for option in options.split(","))
            _mount(None, point, None, flags)


def _exec_harness(config: dict, workdir: str, *, contained: bool) -> NoReturn:
    """In the harness's process: limits, privileges, stdio, then exec the harness interpreter."""
    import resource  # POSIX only; imported here so that skipbench can import this module anywhere

    report_fd = 1
    try:
        os.closerange(_RESULT_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        report_fd = os.dup(1)  # not inherited: reports a failure below and disappears at exec
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)  # the program's stdout is discarded, and it never sees the status pipe
        os.close(null)
        if not contained:
            os.setsid()  # its own process group, for the kill at the limit
            if sys.platform.startswith("linux"):
                _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.chdir(workdir)
        _apply_limits(resource, config["limits"], strict=contained)
        if contained:
            _drop_privileges(root=not config["userns"])
        exe = config["executable"]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        os.execve(exe, [exe, "-I", "-B", "-c", _HARNESS], env)
    except BaseException as exc:
        os.write(report_fd, f"setup-error harness: {exc}\n".replace("\n", " ").encode() + b"\n")
        os._exit(1)


def _apply_limits(resource, limits: dict, *, strict: bool) -> None:
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
            if strict:  # uncontained runs take what the OS allows (macOS refuses some of these)
                raise


def _drop_privileges(*, root: bool) -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries (su, sudo, ping) grant nothing
    # Empty the bounding set: exec then gives no capability back, even to uid 0 in our user namespace
    # (which could otherwise unmount the covers or remount the filesystem writable).
    cap = 0
    while _libc().prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) == 0:
        cap += 1
    if cap == 0 or ctypes.get_errno() != 22:  # EINVAL: past the last capability this kernel knows
        _check(-1, "dropping the capability bounding set")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    # A new, empty session keyring: the inherited one stays "possessed" across setuid, and may hold
    # the user's keys or tickets. Failure is fine: it means keyctl is filtered out (seccomp) altogether.
    if _SYS_KEYCTL is not None:
        _libc().syscall(_SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None)
    if root:
        os.setgroups([])
        os.setgid(_NOBODY)
        os.setuid(_NOBODY)  # also clears every capability
    else:
        header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (x2): all empty
        _check(_libc().capset(header, data), "capset")


if __name__ == "__main__":
    _keeper(json.loads(sys.argv[1]))
