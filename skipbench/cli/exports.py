"""`skipbench export` and `skipbench schema`: a run as JSON, JSON lines, CSV or Spec-Bench answer files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.markup import escape

from skipbench.cli.core import PlainUsage, app, console, handled
from skipbench.errors import UserError

FORMATS = ("json", "jsonl", "csv", "spec-bench")


def check_out(out: Path | None, fmt: str) -> None:
    """Refuse an --out that cannot be written before anything is read or written."""
    if fmt == "spec-bench":
        if out is None:
            raise UserError("--format spec-bench writes a folder of answer files: give --out DIR")
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file: spec-bench answer files go into a folder")
        return
    if out is None:
        return
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give a file name")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist")


@app.command(cls=PlainUsage)
def export(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory (runs/<run>)."),
    fmt: str = typer.Option("json", "--format", "-f", help="json (one document), jsonl or csv (a row per line), "
                            "or spec-bench (Spec-Bench's answer files, one per cell and round)."),
    out: Path = typer.Option(None, "--out", "-o", help="The file to write (default: standard output); a folder "
                             "for spec-bench."),
) -> None:
    """The manifest and every summary row with its intervals, or Spec-Bench answer files."""
    with handled():
        if fmt not in FORMATS:
            raise UserError(f"unknown export format {fmt!r}; choose {', '.join(FORMATS)}")
        check_out(out, fmt)
        from skipbench.store import RunStore

        store = RunStore(run_dir)
        store.read_manifest()  # one clear line when this is not a run directory
        if not store.has_cells():  # not an empty document: a CSV of it would hold a lone "run" column
            raise UserError(f"{run_dir} holds no finished cells yet: run or resume its sweep first")
        if fmt == "spec-bench":
            from skipbench.spec_bench_export import write_answer_files

            files = write_answer_files(run_dir, out)
            console.print(escape(f"wrote {len(files)} answer files under {out}"), soft_wrap=True)
            return
        from skipbench.exports import document, render

        text = render(document(run_dir), fmt)
        if out is None:
            sys.stdout.write(text)
        else:
            out.write_text(text, encoding="utf-8")
            console.print(escape(f"wrote {out}"), soft_wrap=True)


@app.command()
def schema() -> None:
    """The JSON Schema of `skipbench export --format json`, versioned with the stored records."""
    from skipbench.exports import schema as export_schema

    sys.stdout.write(json.dumps(export_schema(), indent=2) + "\n")
