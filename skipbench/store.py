"""The results directory: a manifest with provenance, one parquet file per finished cell, a journal.

Every file is written to a temporary name and renamed into place, so an interrupted run leaves either a
whole cell or none. While cells are measured, every finished generation is appended (and synced) to the
run's journal first, so an interruption loses at most the generation in progress; the next sweep of the
same run replays the journal. A lock keeps two sweeps from writing (and timing) one directory at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
import transformers

import skipbench
from skipbench import placement
from skipbench.errors import UserError
from skipbench.spec import Cell

SCHEMA_VERSION = 2  # 2: one row per (prompt, repeat) with its round, and the passes each generation ran


class RunLocked(UserError):
    """Another process is writing this run directory."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write a whole file or none: a temporary name, synced, then renamed (and the rename synced), so that
    even a power cut leaves the old file or the new one, before the journal that backs it is deleted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def git_commit() -> str | None:
    """The commit of skipbench's own source, when it runs from a checkout."""
    source = Path(skipbench.__file__).resolve().parent.parent
    try:
        result = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def devices_label(names: list[str]) -> str:
    """The device of rows timed on a model spread over `names` (`placement.label`): one device is its name."""
    return placement.label(names, [device_name(torch.device(name)) for name in names])


def provenance(device: torch.device | list[str], dtype: torch.dtype) -> dict:
    """What the run ran with; `device`: its one device, or every device its models span."""
    return {
        "skipbench_version": skipbench.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "device": devices_label(device) if isinstance(device, list) else device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class RunStore:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.cells_dir = self.root / "cells"
        self.problems: list[str] = []  # cell files found unreadable or foreign, and what was done

    # --------------------------------------------------------------- manifest

    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def read_manifest(self) -> dict:
        path = self.manifest_path()
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} is not a skipbench run directory (no manifest.json)")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"{path} cannot be read ({type(error).__name__}); the run directory is damaged") from None
        check_manifest(manifest, path)
        version = manifest.get("schema_version", 1)
        if version != SCHEMA_VERSION:
            raise UserError(f"{self.root} was written by an older skipbench (records schema {version}, this one "
                            f"reads {SCHEMA_VERSION}); rerun its sweep into a new directory (or with --force)")
        return manifest

    def write_manifest(self, manifest: dict) -> None:
        manifest = {"schema_version": SCHEMA_VERSION, **manifest}
        write_atomic(self.manifest_path(), json.dumps(manifest, indent=2, default=str).encode())

    # --------------------------------------------------------------- the lock

    @contextmanager
    def lock(self):
        """Hold the run directory for this process; a second holder is told who has it (kill -9 frees it).

        The lock file is removed on release, and a directory this call created is removed again when
        nothing was written into it, so a command refused early leaves the file system as it found it."""
        created = [path for path in (self.root, *self.root.parents) if not path.exists()]
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        try:
            handle = self._acquire(path)
            try:
                handle.seek(0)
                handle.truncate()
                command = " ".join(Path(sys.argv[0]).name if i == 0 else arg for i, arg in enumerate(sys.argv))
                command = command if len(command) <= 160 else command[:157] + "..."
                handle.write(f"pid {os.getpid()} on {platform.node()} since {time.strftime('%H:%M:%S')} ({command})")
                handle.flush()
                for stale in [*self.root.glob(".*.partial"), *self.cells_dir.glob(".*.partial")]:
                    stale.unlink(missing_ok=True)  # a killed writer's; nobody else writes while we hold the lock
                yield self
            finally:
                path.unlink(missing_ok=True)  # while still held: a waiting process then locks a new file
                handle.close()
        finally:
            for directory in created:  # deepest first; stops at the first that is not empty
                try:
                    directory.rmdir()
                except OSError:
                    break

    @staticmethod
    def _acquire(path: Path):
        while True:
            handle = open(path, "a+")  # noqa: SIM115 - held for the whole block
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise RunLocked(f"{path.parent} is in use by {holder}; wait for it, or stop it first") from None
            try:  # the holder may have just finished and removed the file: then lock the one there now
                if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                    return handle
            except FileNotFoundError:
                pass
            handle.close()

    # --------------------------------------------------------------- cells

    def cell_path(self, key: str, group: int = 0) -> Path:
        """A cell's rows; a baseline measured in several groups (one per worker) has a file per group."""
        return self.cells_dir / (f"{key}.parquet" if group == 0 else f"{key}-g{group}.parquet")

    def error_path(self, key: str) -> Path:
        return self.cells_dir / f"{key}.error.json"

    def has_cell(self, key: str) -> bool:
        return self.cell_path(key).is_file()

    def has_cells(self) -> bool:
        return any(self.cells_dir.glob("*.parquet"))

    def read_cell(self, key: str, cell: Cell | None = None, group: int = 0) -> pd.DataFrame | None:
        """The rows of a stored cell, or None when absent; a file that is unreadable, empty, or holds another
        cell is moved aside to cells/corrupt/ (noted in `problems`) and counts as absent."""
        path = self.cell_path(key, group)
        if not path.is_file():
            return None
        reason = None
        try:
            frame = pd.read_parquet(path)
        except Exception as error:  # pyarrow raises many types for a damaged file
            reason = f"unreadable ({type(error).__name__})"
        else:
            if frame.empty or "cell_key" not in frame or set(frame["cell_key"]) != {key}:
                reason = "holds another cell" if len(frame) and "cell_key" in frame else "holds no rows"
            elif "group" not in frame or set(frame["group"]) != {group}:
                reason = "holds another group's rows"
            elif cell is not None and Cell.from_record(frame.iloc[0]) != cell:
                reason = "holds another cell"
        if reason is None:
            return frame
        aside = self.cells_dir / "corrupt" / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, aside)
        self.problems.append(f"cell file {path.name} {reason}: moved to {aside.relative_to(self.root)}")
        return None

    def write_cell(self, key: str, cell: Cell, rows: list[dict] | pd.DataFrame, group: int = 0) -> None:
        frame = pd.DataFrame(rows).copy()
        for name, value in asdict(cell).items():
            frame[name] = value
        frame["cell_key"] = key
        frame["cell_label"] = cell.label()
        frame["group"] = group
        write_atomic(self.cell_path(key, group), frame.to_parquet(index=False))
        self.error_path(key).unlink(missing_ok=True)

    def write_error(self, key: str, cell: Cell, error: str, unsupported: bool = False) -> None:
        """A cell that failed, or (`unsupported`) that its method cannot run: kept, shown, never measured."""
        fields = {name: value for name, value in asdict(cell).items() if name != "batch_size" or value != 1}
        record = {**fields, "cell_key": key, "cell_label": cell.label(), "error": error}
        if unsupported:
            record["unsupported"] = True
        write_atomic(self.error_path(key), json.dumps(record, indent=2).encode())

    def errors(self) -> list[dict]:
        found = []
        for path in sorted(self.cells_dir.glob("*.error.json")):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                self.problems.append(f"error record {path.name} is unreadable")
        return found

    def read_cells(self) -> pd.DataFrame:
        """All finished cells' rows, one per (prompt, repeat); damaged files are set aside and noted."""
        frames = []
        for path in sorted(self.cells_dir.glob("*.parquet")):
            key, _, group = path.stem.partition("-g")
            frame = self.read_cell(key, group=int(group) if group.isdigit() else 0)
            if frame is not None:
                frames.append(frame)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def clear(self) -> None:
        """Forget every cell, error, journal and the manifest: a clean restart (what --force asks for)."""
        shutil.rmtree(self.cells_dir, ignore_errors=True)
        self.manifest_path().unlink(missing_ok=True)

    # --------------------------------------------------------------- the journal

    def journal_path(self, group: int = 0) -> Path:
        return self.cells_dir / f"journal-g{group}.jsonl"

    def append_journal(self, row: dict, group: int = 0) -> None:
        """One finished generation, on disk before the next one starts."""
        path = self.journal_path(group)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, default=_plain) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_journal(self, group: int = 0) -> list[dict]:
        """The journal's rows; a line torn by a kill mid-write is dropped."""
        path = self.journal_path(group)
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows

    def drop_journal(self, group: int = 0, keys: set[str] | None = None) -> None:
        """Forget the journal's rows of the cells `keys` (all by default): they are in cell files now. Rows of
        other cells (journaled by a session of a wider grid) stay for the session that measures them."""
        path = self.journal_path(group)
        kept = [] if keys is None else [row for row in self.read_journal(group) if row.get("cell_key") not in keys]
        if kept:
            write_atomic(path, "".join(json.dumps(row, default=_plain) + "\n" for row in kept).encode())
        else:
            path.unlink(missing_ok=True)


# The manifest's fields skipbench reads, with the JSON type each must have where present (null is absent).
MANIFEST_SHAPE = {"schema_version": int, "setup": dict, "cells": list, "models": dict, "prompts": dict,
                  "provenance": dict, "groups": dict, "launch": dict}
MANIFEST_PARTS = {("models", "target"): dict, ("models", "drafts"): dict, ("prompts", "prompts"): int,
                  ("prompts", "prompt_set_hash"): str, ("provenance", "dtype"): str, ("setup", "model"): str}
JSON_NAMES = {dict: "an object", list: "a list", int: "a whole number", str: "a string"}


def check_manifest(manifest, path: Path) -> None:
    """Refuse, in one line, a manifest that is valid JSON of another shape than skipbench writes."""
    damaged = "; the run directory is damaged"
    if not isinstance(manifest, dict):
        raise UserError(f"{path} must be an object, not {type(manifest).__name__}{damaged}")
    fields = [((name,), manifest.get(name), kind) for name, kind in MANIFEST_SHAPE.items()]
    fields += [(where, (manifest.get(where[0]) or {}).get(where[1]) if isinstance(manifest.get(where[0]), dict)
                else None, kind) for where, kind in MANIFEST_PARTS.items()]
    fields += [(("cells", str(index)), cell, dict) for index, cell in enumerate(manifest.get("cells") or [])
               if isinstance(manifest.get("cells"), list)]
    for where, value, kind in fields:
        if value is not None and (not isinstance(value, kind) or kind is int and isinstance(value, bool)):
            raise UserError(f"{path}: {'.'.join(where)} must be {JSON_NAMES[kind]}, not "
                            f"{type(value).__name__}{damaged}")


def _plain(value):
    """JSON for numpy scalars and arrays."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def manifest_for(setup, cells: list[Cell], models: dict, prompts: dict, device: torch.device | list[str],
                 dtype: torch.dtype, machine: dict | None = None, placements: dict | None = None) -> dict:
    """`placements`: model name -> `Placement.describe()` of each model spread over devices (--device-map)."""
    return {
        **({"placement": placements} if placements else {}),
        "setup": asdict(setup),
        "cells": [asdict(cell) for cell in cells],
        "models": models,
        "prompts": prompts,
        "provenance": provenance(device, dtype) | ({"machine": machine} if machine else {}),
    }
