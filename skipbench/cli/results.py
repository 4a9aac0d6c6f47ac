"""`skipbench report` and `skipbench compare`: tables and plots from a run, and the regression check of two runs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from skipbench import spec
from skipbench.cli.core import EXIT_REGRESSION, PlainUsage, app, console, handled, out
from skipbench.errors import UserError


def parse_fraction(text: str) -> float:
    """`5%` or `0.05` -> 0.05."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise spec.SpecError(f"cannot read {text!r} as a fraction; use 5% or 0.05") from None
    if not 0 <= value < 1:
        raise spec.SpecError(f"{text!r} must be a fraction in [0, 1)")
    return value


def parse_increase(text: str) -> float | None:
    """`10%` or `0.10` -> 0.10; `off` -> None (not judged). An increase may exceed 100%."""
    if text.strip().lower() == "off":
        return None
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise spec.SpecError(f"cannot read {text!r} as an increase; use 10%, 0.10 or off") from None
    if not 0 <= value < float("inf"):
        raise spec.SpecError(f"{text!r} must be an increase of 0% or more (or off)")
    return value


def incomplete_cells(frame, prompts: int | None, run_dir: Path) -> list[str]:
    """A line per cell that lacks some prompt's rows: the tables leave it out, so say so and how to finish it."""
    if frame.empty or not prompts:
        return []
    covered = frame.groupby("cell_key", sort=False).agg(label=("cell_label", "first"),
                                                         prompts=("prompt_index", "nunique"))
    return [f"cell {row.label} is incomplete (rows for {row.prompts} of {prompts} prompts) and left out of the "
            f"tables; rerun the command that made {run_dir} (same options, same --out) to finish it"
            for row in covered.itertuples() if row.prompts < prompts]


@app.command(cls=PlainUsage)
def report(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory (runs/<run>)."),
    peak_bandwidth: float = typer.Option(None, "--peak-bandwidth", help="Bytes/s (see skipbench roofline)."),
    peak_flops: float = typer.Option(None, "--peak-flops", help="FLOP/s (see skipbench roofline)."),
    overlay: list[Path] = typer.Option(None, "--overlay", metavar="<path>",
                                       help="Other runs to overlay with this one (repeatable)."),
    labels: str = typer.Option(None, "--labels", help="Comma list of labels for this run and the overlays."),
) -> None:
    """Tables (Markdown, LaTeX, CSV) and plots (PNG, PDF) from a run's raw records."""
    from skipbench.cli.display import print_summary
    from skipbench.plots import overlay_runs
    from skipbench.report import write_report
    from skipbench.spec_bench_export import write_category_table
    from skipbench.store import RunStore

    with handled():
        store = RunStore(run_dir)
        manifest = store.read_manifest()  # one clear line when this is not a run directory
        frame = store.read_cells()  # damaged cell files are set aside here, each with one warning line
        for problem in store.problems:
            console.print(f"[yellow]warning[/]: {escape(problem)}; rerun its sweep to recompute it", soft_wrap=True)
        for warning in incomplete_cells(frame, (manifest.get("prompts") or {}).get("prompts"), run_dir):
            console.print(f"[yellow]warning[/]: {escape(warning)}", soft_wrap=True)
        if not store.has_cells():
            raise UserError(f"{run_dir} holds no finished cells yet: run or resume its sweep first")
        runs = [run_dir, *(overlay or [])]
        names = labels.split(",") if labels else [path.name for path in runs]
        if len(names) != len(runs):
            raise spec.SpecError(f"--labels gives {len(names)} labels for {len(runs)} runs")
        files = write_report(run_dir, peak_bandwidth=peak_bandwidth, peak_flops=peak_flops)
        files += write_category_table(run_dir)  # Spec-Bench runs: the speedup per category
        if overlay:
            files += overlay_runs(runs, names, run_dir / "plots" / "overlay")
        print_summary(store, report=True)  # fits 80 columns; the wide tables are in the files
        out.print(escape(f"wrote {len(files)} files under {run_dir}/tables (efficiency.md: every column) and "
                         f"{run_dir}/plots"))


@app.command(cls=PlainUsage)
def compare(
    base_dir: Path = typer.Argument(..., metavar="BASE_RUN", help="The baseline run (e.g. results/ci-smoke)."),
    new_dir: Path = typer.Argument(..., metavar="NEW_RUN", help="The run to check."),
    max_slowdown: str = typer.Option("5%", "--max-slowdown", help="A speedup may fall this much beyond the runs' "
                                     "intervals (5% or 0.05)."),
    max_acceptance_drop: float = typer.Option(0.02, "--max-acceptance-drop", help="An acceptance rate may fall "
                                              "this much (absolute)."),
    max_quality_drop: float = typer.Option(0.01, "--max-quality-drop", help="A task score may fall this much "
                                           "(absolute)."),
    max_latency_increase: str = typer.Option(
        "off", "--max-latency-increase", help="A TTFT, TPOT, ITL or E2E percentile may rise this much beyond the "
        "runs' intervals (10% or 0.10); off by default: latencies are seconds, so compare runs of one machine."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="A base cell missing in the new run is a note."),
    junit: Path = typer.Option(None, "--junit", help="Also write a JUnit XML report (a test case per cell)."),
    markdown: Path = typer.Option(None, "--markdown", help="Also append a Markdown summary ($GITHUB_STEP_SUMMARY)."),
) -> None:
    """Match the cells of two runs and exit 1 when one regressed beyond the tolerances."""
    from skipbench.compare import compare_runs, format_comparison

    with handled():
        for option, path in (("--junit", junit), ("--markdown", markdown)):
            if path is not None and (path.is_dir() or not path.parent.is_dir()):
                raise UserError(f"{option} {path}: " + ("is a folder, give a file name" if path.is_dir()
                                                         else f"the folder {path.parent} does not exist"))
        latency = parse_increase(max_latency_increase)
        comparison = compare_runs(base_dir, new_dir, max_slowdown=parse_fraction(max_slowdown),
                                  max_acceptance_drop=max_acceptance_drop, max_quality_drop=max_quality_drop,
                                  allow_missing=allow_missing, max_latency_increase=latency)
        if junit is not None or markdown is not None:
            from skipbench import ci_reports

            if junit is not None:
                junit.write_text(ci_reports.junit(comparison), encoding="utf-8")
            if markdown is not None:  # appended: $GITHUB_STEP_SUMMARY collects every step's summary
                with open(markdown, "a", encoding="utf-8") as handle:
                    handle.write(ci_reports.markdown(comparison))
    out.print(format_comparison(comparison))
    for problem in comparison.problems:
        out.print(f"[red]regression[/]: {escape(problem)}")
    if not comparison.ok:
        raise typer.Exit(EXIT_REGRESSION)
    out.print("[green]no regression[/]")


@app.command(cls=PlainUsage)
def policies(run_dir: Path = typer.Argument(..., metavar="RUN_DIR",
                                            help="A run directory holding draft-policy cells.")) -> None:
    """Each dynamic draft policy against the best static cell of the run (paired interval), its mean E and K."""
    from skipbench.policy_report import markdown, write_policy_report
    from skipbench.store import RunStore

    with handled():
        store = RunStore(run_dir)
        manifest = store.read_manifest()  # one clear line when this is not a run directory
        if not store.has_cells():
            raise UserError(f"{run_dir} holds no finished cells yet: run or resume its sweep first")
        cells = [cell for cell in manifest.get("cells") or [] if isinstance(cell, dict)]
        if all((cell.get("draft_policy") or "static") == "static" for cell in cells):
            raise UserError(f"{run_dir} holds no draft-policy cells (only static ones): sweep with "
                            f"--draft-policies static,heuristic,... to compare them")
        table, files = write_policy_report(run_dir)
        out.print(escape(markdown(table)))
        out.print(escape(f"wrote {', '.join(str(path) for path in files)}"), soft_wrap=True)
