"""The regression gate in the formats CI systems read: JUnit XML (one test case per cell) and a Markdown
summary for a job page (GitHub's ``$GITHUB_STEP_SUMMARY``, a GitLab job artifact). Both render a
`compare.Comparison`; neither changes its verdicts.

A cell that regressed is a ``<failure>``: its message names each figure that failed with both runs' values and
intervals and the tolerance (the reasons `compare` gives), e.g. ``speedup 1.52x [1.47, 1.58] -> 1.17x [1.13,
1.21]: slower beyond the intervals and the 5% tolerance`` or ``TTFT p99 20.1 ms [19.9, 20.2] -> 30.2 ms [29.9,
30.3] (1.50x): higher beyond the intervals and the 10% tolerance``. A base cell missing from the new run is a failure
too (unless ``--allow-missing``, then skipped); a cell only in the new run is skipped.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from skipbench.compare import Comparison, latency_text
from skipbench.tables import number, with_interval


def _tolerances(comparison: Comparison) -> str:
    settings = comparison.settings
    return (f"max slowdown {settings.get('max_slowdown', 0):.0%} beyond the intervals; max acceptance drop "
            f"{settings.get('max_acceptance_drop', 0)}; max quality drop {settings.get('max_quality_drop', 0)}"
            + (f"; max latency increase {settings['max_latency_increase']:.0%} beyond the intervals (TTFT, TPOT, "
               f"ITL, E2E at p50/p90/p99)" if settings.get("max_latency_increase") is not None else "")
            + ("; counts and tokens exact (CPU float32 greedy)" if comparison.deterministic else ""))


def _speedups(row: dict) -> str:
    get = row.get
    return (f"speedup {with_interval(get('base_speedup'), get('base_speedup_low'), get('base_speedup_high'))} -> "
            f"{with_interval(get('new_speedup'), get('new_speedup_low'), get('new_speedup_high'))}")


def junit(comparison: Comparison, name: str = "skipbench compare") -> str:
    """JUnit XML: a testsuite of the comparison, a testcase per cell."""
    rows = comparison.rows.to_dict("records")
    failed = [row for row in rows if row["verdict"] == "FAIL"
              or (row["verdict"] == "missing in new" and any(p.startswith(f"{row['cell']}:") for p in
                                                             comparison.problems))]
    skipped = [row for row in rows if row not in failed and row["verdict"] in ("only in new", "missing in new")]
    suite = ET.Element("testsuite", name=name, tests=str(len(rows)), failures=str(len(failed)), errors="0",
                       skipped=str(len(skipped)))
    properties = ET.SubElement(suite, "properties")
    for key, value in (("base", comparison.base_dir), ("new", comparison.new_dir),
                       ("tolerance", _tolerances(comparison))):
        ET.SubElement(properties, "property", name=key, value=str(value))
    for label, base, new in comparison.environment:
        ET.SubElement(properties, "property", name=f"environment {label}", value=f"{base} -> {new}")
    classname = f"skipbench.compare.{comparison.new_dir.name or 'run'}"
    for row in rows:
        case = ET.SubElement(suite, "testcase", classname=classname, name=str(row["cell"]), time="0")
        reason = str(row.get("reason") or "")
        if row in failed:
            message = f"{row['cell']}: {reason} (tolerance: {_tolerances(comparison)})"
            failure = ET.SubElement(case, "failure", message=message, type="regression")
            failure.text = message + "\n" + _speedups(row) + (f"\nlatency: largest new/base {latency_text(row)}"
                                                             if row.get("latency_worst") else "")
        elif row in skipped:
            ET.SubElement(case, "skipped", message=f"{row['cell']}: {row['verdict']} ({reason})")
        else:
            out = ET.SubElement(case, "system-out")
            out.text = f"{row['verdict']}: {_speedups(row)}" + (f"; {reason}" if reason else "")
    ET.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(comparison: Comparison) -> str:
    """A job summary: the verdict, the environment differences, a table of every cell, the problems."""
    status = "no regression" if comparison.ok else f"{len(comparison.problems)} regression(s)"
    icon = "✅" if comparison.ok else "❌"
    lines = [f"## {icon} skipbench compare: {status}", "",
             f"`{comparison.base_dir}` → `{comparison.new_dir}`; tolerance: {_tolerances(comparison)}.", ""]
    lines += [f"- environment differs: {label} `{base}` → `{new}`" for label, base, new in comparison.environment]
    if comparison.environment:
        lines.append("")
    gated = comparison.settings.get("max_latency_increase") is not None
    lines += ["| cell | speedup base → new | new/base ratio | acceptance | lossless | "
              + ("latency new/base (largest) | " if gated else "") + "verdict |",
              "|---|---:|---:|---:|---:|" + ("---:|" if gated else "") + "---|"]
    for row in comparison.rows.to_dict("records"):
        get = row.get
        verdict = f"**{row['verdict']}**" if row["verdict"] in ("FAIL", "missing in new") else row["verdict"]
        lines.append("| " + " | ".join(_cell(part) for part in (
            row["cell"], _speedups(row).removeprefix("speedup "),
            with_interval(get("speedup_ratio"), get("speedup_ratio_low"), get("speedup_ratio_high"), "{:.3f}"),
            f"{number(get('base_acceptance_rate'))} → {number(get('new_acceptance_rate'))}",
            f"{number(get('base_lossless'), '{:.0%}')} → {number(get('new_lossless'), '{:.0%}')}",
            *((latency_text(row),) if gated else ()), verdict)) + " |")
    covered, total = comparison.coverage
    lines += ["", f"Rerun check: {covered}/{total} new/base ratio intervals hold 1.00 (about 95% when nothing "
                  "changed)."]
    if comparison.problems:
        lines += ["", "### Regressions", ""] + [f"- {_cell(problem)}" for problem in comparison.problems]
    if comparison.notes:
        lines += ["", "### Notes", ""] + [f"- {_cell(note)}" for note in comparison.notes]
    return "\n".join(lines) + "\n"
