"""The verdict protocol: the harness that runs the program and its check, and how its report is read.

The harness exec()s the program in a fresh globals dict, runs the call (``check(name)``) and only then
writes ``<nonce> passed`` to a pipe the program is not told about (fd 3 when it starts); the nonce is
random per call and reaches the harness on stdin. Standard library only: the keeper imports HARNESS.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field


class SandboxUnavailable(Exception):
    """The namespace sandbox cannot run here; the message is one line: what is missing and the opt-in."""


class SetupError(SandboxUnavailable):
    """The sandbox itself could not be built (not the program's fault)."""


@dataclass(frozen=True)
class Outcome:
    passed: bool
    # "passed", "failed: AssertionError" (any exception name), "memory" (MemoryError), "timeout",
    # "cpu time limit", "no result (exited early)", "no result (killed by SIGSEGV)", ...
    reason: str
    contained: bool  # True when it ran inside the namespace sandbox
    detail: str = ""  # the last 2 KiB of the program's stderr (the traceback), for humans
    # What bounded the memory of all its processes together: "cgroup" (memory.max) or "rlimit"
    # (RLIMIT_AS x RLIMIT_NPROC). Not part of equality: it is how, not what.
    memory_cap: str = field(default="", compare=False)


# The harness: reads the payload, runs the program and the call, writes the verdict. It keeps its own
# references to os.write and friends so that a program that rebinds them by accident changes nothing.
HARNESS = r"""
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


def outcome(status: str, verdict: str, nonce: str, tail: bytes, contained: bool, memory_cap: str) -> Outcome:
    """The Outcome from the keeper's status lines, the verdict pipe's contents and the tail of stderr."""
    detail = tail.decode(errors="replace")
    events = {}
    for line in status.splitlines():
        word, _, rest = line.partition(" ")
        if word == "setup-error":
            raise SetupError(rest)
        events[word] = rest
    ours = [line[len(nonce) + 1 :] for line in verdict.splitlines() if line.startswith(nonce + " ")]
    if len(ours) == 1:  # exactly one line from the harness itself; a program's own writes have no nonce
        if ours[0] == "passed":
            return Outcome(True, "passed", contained, detail, memory_cap)
        name = ours[0].removeprefix("failed ")
        return Outcome(False, "memory" if name == "MemoryError" else f"failed: {name}", contained, detail, memory_cap)
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
    return Outcome(False, reason, contained, detail, memory_cap)
