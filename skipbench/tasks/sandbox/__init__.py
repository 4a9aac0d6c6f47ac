"""Run model-written Python (HumanEval pass@1) so that it cannot harm the machine or fake a pass.

One call of run_check builds this process tree and tears all of it down before returning::

    skipbench                   this process: feeds the program in, reads the verdict out
      keeper                    python -I -S -B -c BOOT, configuration on stdin; enforces the wall-clock limit
        init                    PID 1 of a new PID namespace; builds the new root and switches to it
          harness               python -I -B -c _HARNESS: rlimits, no capabilities, uid 65534 if root
            (the program's own processes)

Containment (Linux):
    * new mount, PID, network and IPC namespaces, plus a user namespace when not root (it is what lets
      an unprivileged user create the others). As root no user namespace is made: the harness drops to
      uid/gid 65534 instead, which makes root-only files unreadable and makes RLIMIT_NPROC apply (it
      never applies to root; a user namespace that maps only root would leave the code as real root
      towards every file). A root that has no uid 65534 (a user namespace mapping only root) is
      treated like any other user.
    * a new root (tmpfs, then pivot_root) that holds only, read-only and at their host paths: the
      interpreter's directories (sys.prefix, sys.base_prefix, ... as named and resolved), /usr and the
      /bin, /sbin, /lib* links, /etc/ld.so.cache, /etc/localtime, /dev/{null,zero,full,random,urandom};
      plus a new proc that shows only the sandbox's processes and a fresh, size-limited tmpfs at /tmp
      (the working directory, the only writable place). Project trees, home directories, the host's
      /tmp and /run and every Unix socket outside /usr are not there at all.
    * the memory of all the sandbox's processes together is capped at Limits.memory_total_bytes: by a
      cgroup v2 (memory.max, memory.swap.max=0, pids.max=processes) where one can be made below ours
      (a memory controller, write access, and our cgroup may enable it for children); otherwise by
      lowering RLIMIT_NPROC, then RLIMIT_AS, until their product is the total (limits.rlimits).
      Outcome.memory_cap says which ("cgroup" or "rlimit").
    * the keeper's command line is a fixed bootstrap (runner.BOOT): /proc/1/cmdline inside shows the
      interpreter's path and that code, no other host path and no configuration.
    * the network namespace has only a loopback interface, and it is down: no traffic at all.
    * the harness runs with no capabilities, no_new_privs (setuid binaries give nothing) and a new
      empty session keyring, under RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE and
      RLIMIT_CORE=0.
    * at the wall-clock limit the keeper kills init; the kernel then kills every process of the PID
      namespace (setsid and double forks included) and init only counts as exited once they are all
      gone, so nothing the program started outlives run_check.

Known gaps: it can read what is world-readable in /usr and the interpreter's directories; without a
cgroup the total is a bound on address space (RLIMIT_AS x RLIMIT_NPROC), which is coarse (a process
with little resident memory still uses its share), the /tmp tmpfs (4 x file_bytes) is outside it, and
as root RLIMIT_NPROC counts every uid-65534 process on the machine; RLIMIT_NPROC cannot bind real root,
so root inside a user namespace that maps only root gets a process limit only from a cgroup's pids.max.
There is no /dev/shm or /dev/pts (multiprocessing's semaphores need /dev/shm).

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

Modules, in layer order (each imports only those before it): linux (ctypes system calls), limits
(Limits, rlimits, privileges), rootfs (namespaces, the new root), verdict (Outcome, the harness, reading
its report), keeper (keeper, init, the harness's start; sandbox side), cgroup, runner (skipbench side).
The sandbox-side modules (linux, limits, rootfs, verdict, keeper) import only the standard library and
each other: the keeper loads them under python -I -S, without skipbench.
"""

from skipbench.tasks.sandbox.limits import Limits
from skipbench.tasks.sandbox.runner import OPT_IN, OPT_IN_MEANING, run_check, sandbox_support
from skipbench.tasks.sandbox.verdict import Outcome, SandboxUnavailable

__all__ = ["OPT_IN", "OPT_IN_MEANING", "Limits", "Outcome", "SandboxUnavailable", "run_check", "sandbox_support"]
