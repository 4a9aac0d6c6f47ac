"""Tests for skipbench.report and skipbench.plots: hand-computed tables, cost columns, plots."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from skipbench import flops
from skipbench.plots import overlay, plot_run
from skipbench.report import efficiency_markdown, load_summary, summarize, write_report
from skipbench.spec import Cell, Setup, with_baseline
from skipbench.store import RunStore
from skipbench.sweep import execute

CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=320,
    tie_word_embeddings=False,
    model_type="llama",
)
PROMPT_TOKENS = (5, 7)
NEW = 8  # every prompt generates 8 tokens
REFERENCE = [[10 + i for i in range(NEW)], [40 + i for i in range(NEW)]]

# Per cell: the (drafted, accepted) steps of each prompt (same for both prompts), time_s per prompt.
# AR: 16 tokens in 0.7 + 0.9 s -> 100 ms per token, 0.8 s per input.
HAND = {
    Cell("autoregressive"): ([(0, 0)] * NEW, (0.7, 0.9)),
    # drafted 8, accepted 3 per prompt: acceptance 6/16 = 0.375, 16 tokens in 10 steps; 0.5 s/input -> 1.6x
    Cell("self_speculative", 1, 2): ([(2, 1), (2, 1), (2, 0), (2, 1), (0, 0)], (0.5, 0.5)),
    # drafted 10, accepted 5: 0.5, 16 tokens in 6 steps; 0.4 s/input -> 2.0x
    Cell("self_speculative", 1, 4): ([(4, 2), (4, 1), (2, 2)], (0.4, 0.4)),
    # drafted 5, accepted 5: 1.0, 16 in 6 steps; (0.30 + 0.34) / 2 = 0.32 s/input -> 2.5x
    Cell("self_speculative", 2, 2): ([(2, 2), (2, 2), (1, 1)], (0.30, 0.34)),
    # drafted 6, accepted 6: 1.0, 16 in 4 steps; 0.25 s/input -> 3.2x (the best)
    Cell("self_speculative", 2, 4): ([(4, 4), (2, 2)], (0.25, 0.25)),
}


def hand_rows(steps, times, *, differ: bool = False, quality=(1.0, 0.0), dataset: str | None = None):
    rows = []
    for index, (prompt_tokens, time_s) in enumerate(zip(PROMPT_TOKENS, times, strict=True)):
        contexts, produced = [], 0
        for _, accepted in steps:
            contexts.append(prompt_tokens - 1 + produced)
            produced += accepted + 1
        assert produced == NEW
        tokens = list(REFERENCE[index])
        if differ and index == 1:
            tokens[3] = 99
        row = {
            "prompt_index": index,
            "prompt_id": str(index),
            "prompt_tokens": prompt_tokens,
            "new_tokens": NEW,
            "time_s": time_s,
            "prefill_s": time_s / 8,
            "decode_s": time_s * 7 / 8,
            "drafted": sum(d for d, _ in steps),
            "accepted": sum(a for _, a in steps),
            "verify_steps": len(steps),
            "step_context": contexts,
            "step_drafted": [d for d, _ in steps],
            "step_accepted": [a for _, a in steps],
            "stop_reason": "length",
            "tokens": tokens,
            "text": "",
            "completion": "",
            "quality_exact_match": quality[index],
            "peak_mem_bytes": None,
        }
        if dataset is not None:
            row["dataset"] = dataset
        rows.append(row)
    return rows


def hand_manifest(*, sample: bool = False, cells=HAND) -> dict:
    return {
        "setup": {
            "model": "synthetic:hand",
            "dataset": "topv2",
            "sample": sample,
            "temperature": 1.0,
            "top_p": 1.0,
            "max_new_tokens": NEW,
        },
        "cells": [
            {
                "strategy": c.strategy,
                "exit_layer": c.exit_layer,
                "num_speculations": c.num_speculations,
                "draft_model": c.draft_model,
                "backend": c.backend,
            }
            for c in cells
        ],
        "models": {
            "target": {
                "name": "synthetic:hand",
                "source": "hand",
                "revision": "synthetic",
                "synthetic": True,
                "num_layers": 4,
                "num_params": 188992,
                "config": CONFIG,
            },
            "drafts": {},
        },
        "prompts": {"prompts": 2, "prompt_set_hash": "feedc0ffee123456", "max_new_tokens": NEW, "dataset": "topv2"},
        "provenance": {
            "skipbench_version": "0.1.0",
            "git_commit": "abc1234",
            "torch_version": "2.x",
            "transformers_version": "5.x",
            "device": "cpu (test)",
            "dtype": "float32",
        },
    }


def write_hand_run(root, *, sample: bool = False, cells=HAND, tasks=(None,)):
    store = RunStore(root)
    store.write_manifest(hand_manifest(sample=sample, cells=cells))
    for task in tasks:
        for number, (cell, (steps, times)) in enumerate(cells.items()):
            differ = cell == Cell("self_speculative", 1, 2)
            quality = (1.0, 1.0) if cell.strategy == "autoregressive" else (1.0, 0.0)
            if task == "slow":
                times = tuple(t * (2.0 if cell.strategy == "autoregressive" else 1.0) for t in times)
            store.write_cell(
                f"c{number}{task or ''}", cell, hand_rows(steps, times, differ=differ, quality=quality, dataset=task)
            )
    return root


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory):
    root = write_hand_run(tmp_path_factory.mktemp("hand") / "run")
    files = write_report(root, plots=False)
    return root, files


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real run of the engine on the tiny synthetic model (one thread: the CPU is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        setup = Setup(
            model="synthetic:tiny?agree=2", prompts=("hello", "world wide", "abc"), max_new_tokens=12, warmup=0
        )
        cells = with_baseline(
            [Cell("self_speculative", exit_layer=e, num_speculations=k) for e in (1, 2, 3) for k in (2, 4)]
            + [Cell("speculative", num_speculations=4, draft_model="synthetic:tiny?agree=2&layers=2")]
            + [Cell("self_speculative", exit_layer=2, num_speculations=4, backend="hf")]
        )
        store = execute(setup, cells, tmp_path_factory.mktemp("real") / "run")
    finally:
        torch.set_num_threads(threads)
    return store.root


# --------------------------------------------------------------------------- hand-computed tables


def test_efficiency_table_matches_hand_computed(hand_run) -> None:
    root, files = hand_run
    assert {f.name for f in files} >= {"efficiency.md", "efficiency.tex", "efficiency.csv", "summary.csv"}
    table = pd.read_csv(root / "tables" / "efficiency.csv")
    assert list(table["strategy"]) == ["autoregressive"] + ["self_speculative"] * 4  # manifest order
    assert list(table["draft / exit"]) == ["-", "exit 1", "exit 1", "exit 2", "exit 2"]
    assert table["K"].isna().tolist() == [True, False, False, False, False]
    assert table["K"].dropna().astype(int).tolist() == [2, 4, 2, 4]
    assert table["time per token (ms)"].tolist() == pytest.approx([100.0, 62.5, 50.0, 40.0, 31.25])
    assert table["time per input (s)"].tolist() == pytest.approx([0.8, 0.5, 0.4, 0.32, 0.25])
    assert table["speedup vs autoregressive"].tolist() == pytest.approx([1.0, 1.6, 2.0, 2.5, 3.2])
    assert table["acceptance"].tolist()[1:] == pytest.approx([0.375, 0.5, 1.0, 1.0])
    assert pd.isna(table["acceptance"].iloc[0])
    assert table["tokens per step"].tolist() == pytest.approx([1.0, 1.6, 16 / 6, 16 / 6, 4.0])
    assert table["lossless (greedy)"].tolist() == pytest.approx([1.0, 0.5, 1.0, 1.0, 1.0])
    assert table["exact match"].tolist() == pytest.approx([1.0, 0.5, 0.5, 0.5, 0.5])
    assert (table["params resident"] == flops.ModelShape.from_config(CONFIG).params().total).all()
    assert table["model"].iloc[0] == "synthetic:hand (synthetic)"

    md = (root / "tables" / "efficiency.md").read_text()
    assert "| time per token (ms) |" in md.splitlines()[0]
    assert "| 100.00 |" in md and "| 3.20x |" in md and "| 50% |" in md


def test_grid_marks_best_cell(hand_run) -> None:
    root, _ = hand_run
    md = (root / "tables" / "grid_speedup_native.md").read_text()
    assert md.count("**3.20x**") == 1 and md.count("**") == 2 + 2  # the caption is bold too
    lines = [line for line in md.splitlines() if line.startswith("| 2 |")]
    assert lines == ["| 2 | 2.50x | **3.20x** |"]
    grid = pd.read_csv(root / "tables" / "grid_speedup_native.csv")
    assert list(grid.columns) == ["exit layer", "K=2", "K=4", "best_K"]
    assert grid["K=2"].tolist() == pytest.approx([1.6, 2.5])
    assert grid["K=4"].tolist() == pytest.approx([2.0, 3.2])
    assert grid["best_K"].isna().tolist() == [True, False] and grid["best_K"].iloc[1] == 4
    tex = (root / "tables" / "grid_speedup_native.tex").read_text()
    assert r"\textbf{3.20x}" in tex and tex.count(r"\textbf") == 1
    # Acceptance: exit 2 accepts everything at both K, a tie: both cells are marked.
    accept = (root / "tables" / "grid_acceptance_native.md").read_text()
    assert "| 2 | **1.000** | **1.000** |" in accept
    assert pd.read_csv(root / "tables" / "grid_acceptance_native.csv")["K=2"].tolist() == pytest.approx([0.375, 1])


def test_latex_csv_parse_and_provenance_under_every_table(hand_run) -> None:
    root, files = hand_run
    for path in files:
        if path.suffix == ".csv":
            assert not pd.read_csv(path).empty
        elif path.suffix == ".tex":
            text = path.read_text()
            assert r"\begin{tabular}" in text and r"\end{tabular}" in text
            assert text.count("&") >= 2 and "SYNTHETIC (random weights)" in text
        if path.suffix in (".md", ".tex"):
            text = path.read_text()
            for needed in (
                "device: cpu (test)",
                "dtype: float32",
                "torch 2.x",
                "transformers 5.x",
                "skipbench 0.1.0",
                "abc1234",
                "feedc0ffee123456",
                "SYNTHETIC (random weights)",
            ):
                assert needed in text, (path.name, needed)
    assert "tasks.md" not in {f.name for f in files}  # one task


def test_cost_columns_equal_flops_directly(hand_run) -> None:
    root, _ = hand_run
    summary, manifest = load_summary(root, peak_bandwidth=1e9, peak_flops=1e10)
    shape = flops.ModelShape.from_config(CONFIG, bytes_per_param=4)  # float32 from the provenance
    frame = RunStore(root).read_cells()
    for label in ("self_speculative E=2 K=4", "autoregressive"):
        cell = frame[frame["cell_label"] == label]
        costs = [
            flops.generation_costs(
                shape,
                strategy=row.strategy,
                prompt_tokens=row.prompt_tokens,
                steps=list(zip(row.step_context, row.step_drafted, row.step_accepted, strict=True)),
                exit_layer=None if pd.isna(row.exit_layer) else int(row.exit_layer),
                new_tokens=row.new_tokens,
            )
            for row in cell.itertuples()
        ]
        got = summary[summary["cell_label"] == label].iloc[0]
        new_tokens = cell["new_tokens"].sum()
        assert got["flops_per_token"] == pytest.approx(sum(c.flops.total for c in costs) / new_tokens)
        assert got["bytes_per_token"] == pytest.approx(sum(c.bytes.total for c in costs) / new_tokens)
        assert got["flops_wasted_share"] == pytest.approx(
            sum(c.flops.wasted for c in costs) / sum(c.flops.total for c in costs)
        )
        seconds = cell["time_s"].sum()
        assert got["achieved_flops_per_s"] == pytest.approx(sum(c.flops.total for c in costs) / seconds)
        assert got["bandwidth_fraction"] == pytest.approx(sum(c.bytes.total for c in costs) / seconds / 1e9)
        assert got["params_resident"] == shape.params().total
        # 5 + 8 - 1 and 7 + 8 - 1 positions cached at the end.
        assert got["kv_cache_bytes"] == pytest.approx(
            (flops.kv_cache_bytes(shape, 12) + flops.kv_cache_bytes(shape, 14)) / 2
        )
    best = summary[summary["cell_label"] == "self_speculative E=2 K=4"].iloc[0]
    # All drafts kept: the prediction is 5 tokens per (4 draft passes + verify) against AR steps.
    assert best["accept_by_position"] == [1.0, 1.0, 1.0, 1.0]
    assert best["predicted_speedup"] > 1.0
    assert best["measured_over_predicted"] == pytest.approx(best["speedup"] / best["predicted_speedup"])
    assert summary.loc[summary["strategy"] == "autoregressive", "predicted_speedup"].iloc[0] == 1.0


def test_sampled_run_shows_no_lossless(tmp_path) -> None:
    root = write_hand_run(tmp_path / "sampled", sample=True)
    summary, _ = load_summary(root)
    assert summary["lossless"].isna().all()
    write_report(root, plots=False)
    md = (root / "tables" / "efficiency.md").read_text()
    row = next(line for line in md.splitlines() if "exit 2 | 4 |" in line)
    headers = md.splitlines()[0].split(" | ")
    assert row.split(" | ")[headers.index("lossless (greedy)")] == "-"
    assert "lossless is greedy-only" in md


def test_multi_task_table(tmp_path) -> None:
    root = write_hand_run(tmp_path / "tasks", tasks=("fast", "slow"))
    files = write_report(root, plots=False)
    names = {f.name for f in files}
    assert {
        "tasks.md",
        "tasks.tex",
        "tasks.csv",
        "grid_speedup_native_fast.csv",
        "grid_speedup_native_slow.csv",
    } <= names
    table = pd.read_csv(root / "tables" / "tasks.csv")
    best = table[table["draft / exit"] == "exit 2"].iloc[1]
    assert best["speedup fast"] == pytest.approx(3.2)
    assert best["speedup slow"] == pytest.approx(6.4)  # the slow task's AR takes twice as long
    assert best["speedup mean over tasks"] == pytest.approx(4.8)
    assert best["tokens per step"] == pytest.approx(4.0)
    efficiency = pd.read_csv(root / "tables" / "efficiency.csv")
    assert list(efficiency["task"]) == ["fast"] * 5 + ["slow"] * 5


def test_summarize_unchanged_without_dataset(hand_run) -> None:
    root, _ = hand_run
    summary = summarize(RunStore(root).read_cells())
    assert "dataset" not in summary
    assert set(summary["speedup"].round(6)) == {1.0, 1.6, 2.0, 2.5, 3.2}


# --------------------------------------------------------------------------- plots on a real run


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1024


def test_report_and_plots_for_a_real_run(real_run) -> None:
    files = write_report(real_run)
    pngs = {f.name: f for f in files if f.suffix == ".png"}
    assert set(pngs) == {
        "tokens_per_s_vs_exit.png",
        "heatmap_speedup_native.png",
        "heatmap_acceptance_native.png",
        "heatmap_speedup_hf.png",
        "heatmap_acceptance_hf.png",
        "acceptance_by_position.png",
    }
    assert all(_is_png(f) for f in pngs.values())
    pdfs = [f for f in files if f.suffix == ".pdf"]
    assert len(pdfs) == 6 and all(f.read_bytes()[:4] == b"%PDF" for f in pdfs)
    assert {"grid_speedup_native.csv", "grid_speedup_hf.csv"} <= {f.name for f in files}
    summary, _ = load_summary(real_run)
    assert (summary["flops_per_token"] > 0).all() and (summary["kv_cache_bytes"] > 0).all()
    spec = summary[summary["strategy"] == "speculative"].iloc[0]
    assert spec["params_resident"] > summary["params_resident"].min()  # the draft's weights count
    # hf's assistant_early_exit keeps a cache of its own for the first E layers; native shares one.
    native, hf = (
        summary[
            (summary["strategy"] == "self_speculative")
            & (summary["exit_layer"] == 2)
            & (summary["num_speculations"] == 4)
            & (summary["backend"] == b)
        ].iloc[0]
        for b in ("native", "hf")
    )
    assert hf["params_resident"] == native["params_resident"]
    assert hf["speedup"] > 0 and hf["predicted_speedup"] > 0
    text = efficiency_markdown(real_run)
    assert "SYNTHETIC (random weights)" in text and "self_speculative (hf)" in text
    saved = json.loads(pd.read_csv(real_run / "tables" / "summary.csv")["accept_by_position"].iloc[1])
    assert isinstance(saved, list)


def test_overlay_and_skipped_plots(real_run, hand_run, tmp_path) -> None:
    written = overlay([real_run, hand_run[0]], ["tiny", "hand"], tmp_path / "overlay.png")
    assert [p.name for p in written] == ["overlay.png", "overlay.pdf"]
    assert _is_png(written[0])
    # A run without drafting cells has nothing to plot: no files, not empty figures.
    only_ar = write_hand_run(tmp_path / "ar", cells={Cell("autoregressive"): HAND[Cell("autoregressive")]})
    assert plot_run(only_ar) == []
    assert not (only_ar / "plots").exists()
    assert overlay([only_ar, only_ar], None, tmp_path / "none.png") == []
