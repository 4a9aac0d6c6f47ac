"""examples/: the GitHub Actions workflow and the GitLab CI job run the README's install-and-test command and
the smoke gate of .ci/run, adding only the JUnit and Markdown reports."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def readme_test_command() -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("<!-- test-command -->")
    return next(line for line in lines[start + 1:] if re.match(r"[a-z]", line))


def gate_commands() -> list[str]:
    """The smoke gate's skipbench commands, as .ci/run runs them."""
    return [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("skipbench ")]


def github_commands() -> list[str]:
    workflow = yaml.safe_load((ROOT / "examples" / "github-actions.yml").read_text())
    steps = workflow["jobs"]["smoke"]["steps"]
    assert workflow["jobs"]["smoke"]["runs-on"] == "ubuntu-latest"  # a CPU runner
    assert any(step.get("uses", "").startswith("mikepenz/action-junit-report") for step in steps)
    return [line.strip() for step in steps if "run" in step for line in step["run"].splitlines() if line.strip()]


def gitlab_commands() -> list[str]:
    job = yaml.safe_load((ROOT / "examples" / "gitlab-ci.yml").read_text())["skipbench-smoke"]
    assert job["artifacts"]["reports"]["junit"] == "runs/ci-smoke-junit.xml"
    return job["script"]


def test_the_examples_run_the_readme_test_command_and_the_smoke_gate():
    for commands in (github_commands(), gitlab_commands()):
        assert commands[0] == readme_test_command()
        gate = gate_commands()
        ours = [command for command in commands if command.startswith("skipbench ")]
        assert ours[:-1] == gate[:-1]  # the sweep and the report, verbatim
        assert ours[-1].startswith(gate[-1] + " --junit runs/ci-smoke-junit.xml --markdown ")
        assert ". .venv/bin/activate" in commands


def test_the_readme_shows_the_recipe():
    readme = (ROOT / "README.md").read_text()
    assert "examples/github-actions.yml" in readme and "examples/gitlab-ci.yml" in readme
