"""Tables and plots of a run: intervals printed, the best cell marked only when clear, files that parse."""

import re

import numpy as np
import pandas as pd
import pytest

from skipbench.plots import overlay
from skipbench.report import write_report
from skipbench.spec import Cell, Setup, with_baseline
from skipbench.summary import load_summary
from skipbench.sweep import execute
from skipbench.tables import best_cells, grid_table, to_latex, to_markdown, with_interval


def grid(values, lows, highs, marks):
    rows = []
    for (exit_layer, k), value, low, high, mark in zip([(1, 2), (1, 4), (2, 2), (2, 4)], values, lows, highs, marks,
                                                       strict=True):
        rows.append({"exit_layer": exit_layer, "num_speculations": k, "speedup": value, "speedup_low": low,
                     "speedup_high": high, "speedup_units": 12, "acceptance_rate": value / 4, "best": mark,
                     "best_acceptance": "", "baseline_label": "autoregressive"})
    return pd.DataFrame(rows)


def test_the_table_marks_what_the_paired_ranking_found_and_says_whether_any_cell_beats_the_baseline():
    # Marginal intervals overlap here ([1.45, 1.55] vs [1.2, 1.4] clear; [1.3, 1.52] would not): the marks
    # come from the paired ranking (`ranking.rank_grid`), never from comparing marginal intervals.
    clear = grid([1.1, 1.2, 1.5, 1.45], [1.0, 1.1, 1.4, 1.3], [1.2, 1.3, 1.6, 1.52], ["", "", "best", ""])
    assert best_cells(clear, "speedup") == ({2}, True)
    text, numbers, note = grid_table(clear, "speedup")
    assert text.loc[1, "K=2"] == "**1.50x [1.40, 1.60]**" and "shown better than every other" in note
    assert "3 of 4 cells beat autoregressive" in note
    assert numbers.loc[1, "K=2"] == 1.5
    tied = grid([0.5, 0.6, 0.9, 0.85], [0.4, 0.5, 0.8, 0.7], [0.6, 0.7, 0.99, 0.95], ["", "", "tied", "tied"])
    assert best_cells(tied, "speedup") == ({2, 3}, False)
    text, _, note = grid_table(tied, "speedup")
    assert text.loc[1, "K=2"].startswith("**~0.90x") and text.loc[1, "K=4"].startswith("**~0.85x")
    assert text.loc[0, "K=4"] == "0.60x [0.50, 0.70]" and "2 cells tied" in note
    assert note.endswith("no cell beats autoregressive")
    few = grid([1.1, 1.2, 1.5, 1.45], [np.nan] * 4, [np.nan] * 4, ["unranked"] * 4).assign(speedup_units=2)
    text, _, note = grid_table(few, "speedup")
    assert best_cells(few, "speedup") == (set(), False) and note.startswith("not ranked: too few")
    assert text.loc[1, "K=2"] == "1.50x [n=2]"  # no interval below MIN_UNITS: the count instead


def test_intervals_are_printed_with_every_speed():
    assert with_interval(1.444, 1.381, 1.512) == "1.44x [1.38, 1.51]"
    assert with_interval(12.34, np.nan, np.nan, "{:.1f}") == "12.3"
    assert with_interval(np.nan, 1, 2) == "-"


def test_markdown_and_latex_escape_and_keep_every_row():
    text = pd.DataFrame({"a|b": ["x|y", "**bold**"], "c_d": ["50%", "#1"]})
    md = to_markdown(text, ["note with | pipe"])
    assert md.count("\n|") == 3 and "x\\|y" in md and "a\\|b" in md and "_note with / pipe_" in md
    tex = to_latex(text, ["100% sure"], caption="cap_tion")
    assert r"\textbf{bold}" in tex and r"50\%" in tex and r"\#1" in tex and r"c\_d" in tex and r"100\% sure" in tex
    body = [line for line in tex.splitlines() if line.endswith(r"\\") and "&" in line]
    assert len(body) == 3 and all(line.count("&") == 1 for line in body)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    setup = Setup(model="synthetic:tiny?agree=2", prompts=("hello", "world wide", "abc"), max_new_tokens=12,
                  warmup=0, repeats=2, threads=1)
    cells = with_baseline([Cell("self_speculative", e, k) for e in (1, 2) for k in (2, 4)]
                          + [Cell("speculative", None, 4, "synthetic:tiny?agree=2&layers=2")])
    root = execute(setup, cells, tmp_path_factory.mktemp("real") / "run").root
    return root, write_report(root)


def test_report_files_parse_and_hold_the_summary(real_run):
    root, files = real_run
    summary, manifest = load_summary(root)
    names = {path.name for path in files}
    for stem in ("efficiency", "grid_speedup_native", "grid_acceptance_native"):
        assert {f"{stem}.md", f"{stem}.tex", f"{stem}.csv"} <= names
    efficiency = pd.read_csv(root / "tables" / "efficiency.csv")
    assert efficiency["speedup vs autoregressive"].tolist() == pytest.approx(summary["speedup"].tolist())
    assert efficiency["speedup low"].tolist() == pytest.approx(summary["speedup_low"].tolist(), nan_ok=True)
    md = (root / "tables" / "efficiency.md").read_text()
    assert md.count("\n|") == len(summary) + 1  # header rule + one line per cell (the header starts the file)
    speedups = re.findall(r"(\d+\.\d\d)x \[(\d+\.\d\d), (\d+\.\d\d)\]", md)
    assert len(speedups) >= len(summary) - 1  # the baseline's own interval collapses to 1.00x [1.00, 1.00]
    prompt_hash = manifest["prompts"]["prompt_set_hash"]
    for path in files:
        if path.suffix in (".md", ".tex"):
            assert prompt_hash in path.read_text(), path  # provenance under every table
    grid_csv = pd.read_csv(root / "tables" / "grid_speedup_native.csv")
    assert grid_csv["exit layer"].tolist() == [1, 2] and list(grid_csv.columns) == ["exit layer", "K=2", "K=4"]
    summary_csv = pd.read_csv(root / "tables" / "summary.csv")
    assert summary_csv["tokens_per_s"].tolist() == pytest.approx(summary["tokens_per_s"].tolist())


def test_plots_are_written_as_images(real_run, tmp_path):
    root, files = real_run
    pngs = [path for path in files if path.suffix == ".png"]
    assert {path.stem for path in pngs} >= {"tokens_per_s_vs_exit", "speedup_by_cell", "heatmap_speedup_native",
                                            "heatmap_acceptance_native", "acceptance_by_position"}
    for path in pngs:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    summary, _ = load_summary(root)
    written = overlay([summary, summary], ["a", "b"], tmp_path / "overlay.png")
    assert [path.suffix for path in written] == [".png", ".pdf"]
    with pytest.raises(ValueError, match="labels"):
        overlay([summary, summary], ["one"], tmp_path / "x")


def test_each_speedup_says_what_it_divides_by_and_the_control_is_labelled_a_control():
    """ci-smoke: `AR hf` divides by native autoregressive, its A/A control by `AR hf`; say so per row."""
    from pathlib import Path

    from skipbench.tables import efficiency_table

    summary, manifest = load_summary(Path(__file__).parent.parent / "results" / "ci-smoke")
    text, numbers = efficiency_table(summary, manifest)
    rows = {(row["strategy"], row["draft / exit"], row["K"]): row["vs"] for row in text.to_dict("records")}
    assert rows[("autoregressive", "-", "-")] == "-"  # the baseline itself
    assert rows[("autoregressive (hf)", "-", "-")] == "autoregressive"
    assert rows[("autoregressive (hf) A/A control", "-", "-")] == "autoregressive (hf)"
    assert list(numbers["vs"]) == list(text["vs"])
