"""How a sweep is launched: `--launcher` and its options, or a sweep file's [launch] table, checked.

Plain data at the level of the sweep specification (sweep files are read in `spec`, which checks their
[launch] table here); the launchers themselves live in the `launch` package.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from types import ModuleType

from skipbench.errors import SpecError, UserError

LAUNCHERS = ("local", "ray", "slurm")
EXTRAS = {"ray": ("ray", "Ray"), "slurm": ("submitit", "submitit")}  # launcher: (module, what to install)


class LaunchError(UserError):
    """A launch that cannot start or go on; one line for the user."""


@dataclass(frozen=True)
class LaunchOptions:
    """How a sweep is launched (`--launcher` and its options, or a sweep file's [launch] table)."""

    launcher: str = "local"
    workers: int | None = None  # ray: actors (default: the cluster's GPUs, else 2); slurm: array tasks
    address: str | None = None  # ray: "auto" or HOST:PORT; None: a running cluster, else a new local one
    gpus_per_worker: int = 1  # ray and slurm, where the setup runs on GPUs
    partition: str | None = None  # slurm
    time_min: int | None = None  # slurm: each task's time limit
    max_parallel: int | None = None  # slurm: array tasks running at once
    detach: bool = False  # slurm: submit and return; a later sweep of the same run (or report) collects
    cluster: str | None = None  # slurm: submitit's cluster ("slurm"; "local" or "debug" to test without Slurm)


ONLY_FOR = {"address": "ray", "partition": "slurm", "time_min": "slurm", "max_parallel": "slurm", "detach": "slurm",
            "cluster": "slurm"}
_TYPES = {"launcher": str, "workers": int, "address": str, "gpus_per_worker": int, "partition": str,
          "time_min": int, "max_parallel": int, "detach": bool, "cluster": str}


def options_from(values: dict, origin: str | None = None) -> LaunchOptions:
    """LaunchOptions from a sweep file's [launch] table and/or the command line (None: not given), checked."""
    where = f"sweep file {origin}: [launch] " if origin else ""
    known = {field.name for field in fields(LaunchOptions)}
    unknown = set(values) - known
    if unknown:
        raise SpecError(f"{where}unknown launch key(s) {', '.join(sorted(unknown))}; known: "
                        f"{', '.join(sorted(known - {'cluster'}))}")
    given = {name: value for name, value in values.items() if value is not None}
    for name, value in given.items():
        kind = _TYPES[name]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)) or not isinstance(value, kind):
            raise SpecError(f"{where}{name} must be {'a whole number' if kind is int else kind.__name__} "
                            f"(got {value!r})")
    options = LaunchOptions(**given)
    if options.launcher not in LAUNCHERS:
        raise SpecError(f"{where}launcher must be one of {', '.join(LAUNCHERS)} (got {options.launcher!r})")
    for name in ("workers", "time_min", "max_parallel"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            raise SpecError(f"{where}{_flag(name)} must be >= 1 (got {getattr(options, name)})")
    if options.gpus_per_worker < 0:
        raise SpecError(f"{where}{_flag('gpus_per_worker')} must be >= 0 (got {options.gpus_per_worker})")
    for name, launcher in ONLY_FOR.items():
        if name in given and given[name] is not False and options.launcher != launcher:
            raise SpecError(f"{where}{_flag(name)} is an option of the {launcher} launcher, not of "
                            f"{options.launcher}; add --launcher {launcher}")
    if options.launcher == "local" and "workers" in given:
        raise SpecError(f"{where}{_flag('workers')} needs --launcher ray or slurm (local runs in this process)")
    return options


def merged(file_values: dict, **given) -> LaunchOptions:
    """The sweep file's [launch] table with the command line's options laid over it (None or False: not given).
    A launcher chosen on the command line drops the file's options of other launchers."""
    given = {name: value for name, value in given.items() if value is not None and value is not False}
    values = dict(file_values)
    if "launcher" in given:
        values = {name: value for name, value in values.items() if ONLY_FOR.get(name, given["launcher"]) ==
                  given["launcher"] and not (name == "workers" and given["launcher"] == "local")}
    return options_from(values | given)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def require(launcher: str) -> ModuleType:
    """The package a launcher needs, or one line naming the extra to install."""
    module, what = EXTRAS[launcher]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LaunchError(f"the {launcher} launcher needs {what}: pip install 'skipbench[{launcher}]'") from None
