"""The keeper, init and the start of the harness: the processes between skipbench and the program.

Sandbox side. skipbench starts ``python -I -S -B -c BOOT`` (runner.BOOT), which reads the configuration
from stdin and loads this directory as a bare package (the package's __init__, which imports the host
side, is not run): so only the standard library and the modules below are imported here.
"""

from __future__ import annotations

import os
import resource  # POSIX only: the keeper runs on POSIX systems only (it forks)
import shutil
import signal
import sys
import tempfile
from typing import NoReturn

from . import limits, linux, rootfs
from .verdict import HARNESS

RESULT_FD = 3  # where the keeper puts the verdict pipe (the harness moves it elsewhere before the program runs)


def report(line: str) -> None:
    """A status line for skipbench on fd 1 (only the keeper and init have it; the harness has /dev/null)."""
    os.write(1, (line.replace("\n", " ") + "\n").encode())


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def main(config: dict) -> NoReturn:
    """The keeper: start the sandbox, kill it at the wall-clock limit, report how it ended."""
    contained, linux_os = config["contained"], sys.platform.startswith("linux")
    workdir = config["workdir"]
    try:
        if linux_os:
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # skipbench died: so does everything below
        if config["result_fd"] != RESULT_FD:
            os.dup2(config["result_fd"], RESULT_FD)
            os.close(config["result_fd"])
        if config["cgroup"]:  # before anything is forked: init, the harness and the program are born there
            _join(config["cgroup"])
        if contained:
            rootfs.enter_namespaces(config["userns"])
        else:
            workdir = tempfile.mkdtemp(prefix="skipbench-exec-")
            if linux_os:  # orphans of the program (setsid, double fork) become our children, to be killed
                linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
        child = os.fork()
    except OSError as exc:
        report(f"setup-error {exc}")
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
    if not contained and linux_os:
        _kill_descendants()
    if timed_out:
        report("timeout")
    if not contained:
        report(_describe(status))
        shutil.rmtree(workdir, ignore_errors=True)
    os._exit(0)


def _join(path: str) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


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


def _init(config: dict) -> NoReturn:
    """PID 1 of the new PID namespace: when it exits, the kernel kills every process left in it."""
    try:
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # the keeper was killed: take the namespace down
        # A PID-namespace init only gets signals it handles from inside the namespace: with no handler
        # the program cannot kill it (Python handles SIGINT by default).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.umask(0o022)
        rootfs.build_root(config["root"], config["workdir"], config["limits"]["file_bytes"])
        harness = os.fork()
    except OSError as exc:
        report(f"setup-error {exc}")
        os._exit(1)
    if harness == 0:
        _exec_harness(config, config["workdir"], contained=True)
    _, status = os.waitpid(harness, 0)
    report(_describe(status))
    os._exit(0)


def _exec_harness(config: dict, workdir: str, *, contained: bool) -> NoReturn:
    """In the harness's process: limits, privileges, stdio, then exec the harness interpreter."""
    report_fd = 1
    try:
        os.closerange(RESULT_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        report_fd = os.dup(1)  # not inherited: reports a failure below and disappears at exec
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)  # the program's stdout is discarded, and it never sees the status pipe
        os.close(null)
        if not contained:
            os.setsid()  # its own process group, for the kill at the limit
            if sys.platform.startswith("linux"):
                linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        os.chdir(workdir)
        limits.apply_limits(resource, config["limits"], strict=contained)
        if contained:
            limits.drop_privileges(root=not config["userns"])
        exe = config["executable"]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        os.execve(exe, [exe, "-I", "-B", "-c", HARNESS], env)
    except BaseException as exc:
        os.write(report_fd, f"setup-error harness: {exc}\n".replace("\n", " ").encode() + b"\n")
        os._exit(1)
