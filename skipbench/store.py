"""The results directory: a manifest with provenance, and one parquet file per finished cell.

Every file is written to a temporary name and renamed into place, so an interrupted run leaves
either a whole cell or none; a rerun finds finished cells by their key and skips them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
import transformers

import skipbench
from skipbench.spec import Cell, Setup

SCHEMA_VERSION = 1


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


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


def provenance(device: torch.device, dtype: torch.dtype) -> dict:
    return {
        "skipbench_version": skipbench.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "device": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class RunStore:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.cells_dir = self.root / "cells"

    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def read_manifest(self) -> dict:
        path = self.manifest_path()
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} is not a skipbench run directory (no manifest.json)")
        return json.loads(path.read_text())

    def write_manifest(self, manifest: dict) -> None:
        manifest = {"schema_version": SCHEMA_VERSION, **manifest}
        write_atomic(self.manifest_path(), json.dumps(manifest, indent=2, default=str).encode())

    def cell_path(self, key: str) -> Path:
        return self.cells_dir / f"{key}.parquet"

    def error_path(self, key: str) -> Path:
        return self.cells_dir / f"{key}.error.json"

    def has_cell(self, key: str) -> bool:
        return self.cell_path(key).is_file()

    def has_cells(self) -> bool:
        return any(self.cells_dir.glob("*.parquet"))

    def write_cell(self, key: str, cell: Cell, rows: list[dict]) -> None:
        frame = pd.DataFrame(rows)
        for name, value in asdict(cell).items():
            frame[name] = value
        frame["cell_key"] = key
        frame["cell_label"] = cell.label()
        write_atomic(self.cell_path(key), frame.to_parquet(index=False))
        self.error_path(key).unlink(missing_ok=True)

    def write_error(self, key: str, cell: Cell, error: str) -> None:
        record = {**asdict(cell), "cell_key": key, "cell_label": cell.label(), "error": error}
        write_atomic(self.error_path(key), json.dumps(record, indent=2).encode())

    def errors(self) -> list[dict]:
        return [json.loads(path.read_text()) for path in sorted(self.cells_dir.glob("*.error.json"))]

    def read_cells(self) -> pd.DataFrame:
        """All finished cells' rows, one per prompt."""
        files = sorted(self.cells_dir.glob("*.parquet"))
        if not files:
            return pd.DataFrame()
        return pd.concat([pd.read_parquet(file) for file in files], ignore_index=True)


def manifest_for(setup: Setup, cells: list[Cell], models: dict, prompts: dict, device: torch.device,
                 dtype: torch.dtype) -> dict:
    return {
        "setup": asdict(setup),
        "cells": [asdict(cell) for cell in cells],
        "models": models,
        "prompts": prompts,
        "provenance": provenance(device, dtype),
    }
