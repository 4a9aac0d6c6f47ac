"""A run as data other tools read: the manifest and every summary row, with every figure and its interval.

`document(run_dir)` is one JSON document (`skipbench export RUN --format json`); `jsonl_lines` gives a row
per line and `csv_text` a row per CSV line (lists JSON-encoded). `schema()` is the JSON Schema of the
document (`skipbench schema`); its version is the records schema version of the run store
(`store.SCHEMA_VERSION`): when the stored records change, the export says so.

Figures with an interval (speedup, tokens/s) are in each row flat (``speedup``, ``speedup_low``,
``speedup_high``, as the summary names them) and again under ``intervals`` as
``{"point", "low", "high", "level"}``. NaN becomes null.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from skipbench.store import SCHEMA_VERSION
from skipbench.summary import load_summary, run_devices

FORMAT = "skipbench.export"
LEVEL = 0.95  # the bootstrap intervals' coverage (`intervals`)
INTERVAL_FIGURES = ("speedup", "tokens_per_s")
IDENTITY = ("cell_key", "cell_label", "strategy", "exit_layer", "num_speculations", "draft_model", "backend",
            "replica")


def plain(value):
    """JSON-ready: numpy scalars and arrays as Python values, NaN and infinities as None."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if value is pd.NA or value is pd.NaT:
        return None
    return str(value)


def rows_of(summary: pd.DataFrame, device: str | None) -> list[dict]:
    rows = []
    for record in summary.to_dict("records"):
        row = {name: plain(value) for name, value in record.items()}
        for name in ("exit_layer", "num_speculations", "replica"):  # integers (a column with nulls is float)
            if isinstance(row.get(name), float):
                row[name] = int(row[name])
        row["device"] = device
        row["intervals"] = {name: {"point": row.get(name), "low": row.get(f"{name}_low"),
                                   "high": row.get(f"{name}_high"), "level": LEVEL}
                            for name in INTERVAL_FIGURES if name in row}
        rows.append(row)
    return rows


def document(run_dir: Path | str) -> dict:
    """The manifest and one row per (cell, device): every summary figure, with its interval."""
    run_dir = Path(run_dir)
    devices = run_devices(run_dir)
    rows, manifest = [], None
    for device in devices if len(devices) > 1 else [None]:
        summary, manifest = load_summary(run_dir, device=device)
        rows += rows_of(summary, device or (devices[0] if devices else None))
    return {"format": FORMAT, "records_schema_version": SCHEMA_VERSION, "run": str(run_dir),
            "manifest": plain(manifest), "rows": rows}


def jsonl_lines(doc: dict) -> list[str]:
    """A row per line; each names its run and the records schema, so lines of several runs can be pooled."""
    head = {"format": FORMAT, "records_schema_version": doc["records_schema_version"], "run": doc["run"]}
    return [json.dumps(head | row, allow_nan=False) for row in doc["rows"]]


def csv_text(doc: dict) -> str:
    """A row per line; list and object values JSON-encoded in their cell."""
    names: list[str] = ["run"]
    for row in doc["rows"]:
        names += [name for name in row if name not in names]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in doc["rows"]:
        writer.writerow({name: json.dumps(value) if isinstance(value, (list, dict)) else value
                         for name, value in ({"run": doc["run"]} | row).items()})
    return buffer.getvalue()


def render(doc: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(doc, indent=2, allow_nan=False) + "\n"
    if fmt == "jsonl":
        return "".join(line + "\n" for line in jsonl_lines(doc))
    return csv_text(doc)


# --------------------------------------------------------------------------- the schema

_NUMBER = {"type": ["number", "null"]}
_INTERVAL = {"type": "object", "required": ["point", "low", "high", "level"], "additionalProperties": False,
             "properties": {"point": _NUMBER, "low": _NUMBER, "high": _NUMBER,
                            "level": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}}
_FIGURES = ("prompts", "repeats", "new_tokens", "tokens_per_s", "tokens_per_s_low", "tokens_per_s_high",
            "time_per_token_s", "time_per_input_s", "prefill_share", "drafted", "accepted", "acceptance_rate",
            "acceptance_rate_per_sample", "verify_steps", "tokens_per_step", "speedup", "speedup_low",
            "speedup_high", "lossless")


def schema() -> dict:
    """The JSON Schema (draft 2020-12) of `document`'s output, versioned with the records."""
    row = {
        "type": "object",
        "required": [*IDENTITY, *_FIGURES, "warnings", "intervals", "device"],
        "properties": {
            "cell_key": {"type": "string"}, "cell_label": {"type": "string"},
            "strategy": {"type": "string"}, "backend": {"type": "string"},
            "exit_layer": {"type": ["integer", "null"]}, "num_speculations": {"type": ["integer", "null"]},
            "draft_model": {"type": ["string", "null"]}, "replica": {"type": "integer"},
            "device": {"type": ["string", "null"]},
            **{name: _NUMBER for name in _FIGURES},
            "accept_by_position": {"type": "array", "items": {"type": "number"}},
            "warnings": {"type": "array", "items": {"type": "string"}},
            "intervals": {"type": "object", "required": list(INTERVAL_FIGURES),
                          "additionalProperties": _INTERVAL, "properties": {}},
        },
        # Cost and quality columns (flops_per_token, quality_rouge1, ...) depend on the run: numbers or null.
        "additionalProperties": {"type": ["number", "string", "boolean", "array", "null"]},
    }
    manifest = {"type": "object", "required": ["schema_version", "setup", "cells", "prompts", "provenance"],
                "properties": {"schema_version": {"const": SCHEMA_VERSION}, "setup": {"type": "object"},
                               "cells": {"type": "array", "items": {"type": "object"}},
                               "prompts": {"type": "object"}, "provenance": {"type": "object"},
                               "models": {"type": "object"}}}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://skipbench.invalid/schema/export-v{SCHEMA_VERSION}.json",
        "title": f"skipbench export (records schema {SCHEMA_VERSION})",
        "type": "object",
        "required": ["format", "records_schema_version", "run", "manifest", "rows"],
        "properties": {"format": {"const": FORMAT}, "records_schema_version": {"const": SCHEMA_VERSION},
                       "run": {"type": "string"}, "manifest": manifest, "rows": {"type": "array", "items": row}},
        "additionalProperties": False,
    }
