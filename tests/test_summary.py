"""The summary of a run: hand-computed figures, bootstrap intervals that cover, costs from what ran."""

import numpy as np
import pandas as pd
import pytest

from skipbench import costs, intervals
from skipbench.spec import Cell, Setup, with_baseline
from skipbench.summary import load_summary, summarize
from skipbench.sweep import execute

AR, SPEC = Cell("autoregressive"), Cell("self_speculative", 1, 2)


def hand_rows(cell: Cell, key: str, steps, times, *, tokens=None, eos: bool = False, quality=None) -> list[dict]:
    """Rows of one cell: 2 prompts x len(times[0]) rounds; `steps` (drafted, accepted) the same for both."""
    rows = []
    for prompt, prompt_times in enumerate(times):
        for round_index, time_s in enumerate(prompt_times):
            made = sum(a + 1 for _, a in steps) - (1 if eos else 0)
            rows.append({
                "cell_key": key, **{name: getattr(cell, name) for name in ("strategy", "exit_layer",
                                                                          "num_speculations", "draft_model",
                                                                          "backend", "replica")},
                "prompt_index": prompt, "group": 0, "round": round_index, "repeat": round_index, "new_tokens": made,
                "time_s": time_s, "prefill_s": time_s / 4, "drafted": sum(d for d, _ in steps),
                "accepted": sum(a for _, a in steps), "verify_steps": len(steps),
                "step_drafted": [d for d, _ in steps], "step_accepted": [a for _, a in steps],
                "stop_reason": "eos" if eos else "length",
                "tokens": (tokens or list(range(made))) if prompt == 0 else list(range(100, 100 + made)),
                "peak_mem_bytes": None, **({"quality_exact_match": quality[prompt]} if quality else {}),
            })
    return rows


def test_figures_are_ratios_of_sums_paired_by_round():
    # AR: 8 tokens per prompt; times per (prompt, round). The cell: 8 tokens in 5 steps, half the time in
    # round 0 and a third in round 1, so the speedup pairs rounds: (1.6 + 2.4) / (0.8 + 0.8) = 2.5x.
    ar = hand_rows(AR, "ar", [(0, 0)] * 8, [(0.4, 0.6), (0.4, 0.6)], quality=(1.0, 1.0))
    spec = hand_rows(SPEC, "spec", [(2, 1), (2, 1), (2, 0), (2, 1), (0, 0)], [(0.2, 0.2), (0.2, 0.2)],
                     quality=(1.0, 0.0), tokens=[0, 1, 2, 99, 4, 5, 6, 7])
    summary = summarize(pd.DataFrame(ar + spec)).set_index("cell_key")
    assert summary.loc["ar", "tokens_per_s"] == pytest.approx(32 / 2.0)
    assert summary.loc["spec", "tokens_per_s"] == pytest.approx(32 / 0.8)
    assert summary.loc["spec", "speedup"] == pytest.approx((2.0 / 32) / (0.8 / 32))
    assert summary.loc["spec", "acceptance_rate"] == pytest.approx(3 / 8)
    assert summary.loc["spec", "tokens_per_step"] == pytest.approx(8 / 5)
    assert summary.loc["spec", "lossless"] == 0.5  # prompt 0 differs at index 3
    assert summary.loc["spec", "quality_exact_match"] == 0.5
    assert summary.loc["spec", "accept_by_position"] == pytest.approx([3 / 4, 0.0])
    assert summary.loc["spec", "prefill_share"] == pytest.approx(0.25)
    assert summary.loc["spec", "repeats"] == 2
    # 2 prompts x 2 rounds: 4 paired units, under MIN_UNITS, so no interval (an interval over 4 units would
    # claim far more than they show); the warning says what more it needs.
    assert summary.loc["spec", "speedup_units"] == 4
    assert np.isnan(summary.loc["spec", "speedup_low"]) and np.isnan(summary.loc["spec", "speedup_high"])
    assert any(w.startswith("too few units: 4 paired") and "1 more prompt(s) or --repeats 3" in w
               for w in summary.loc["spec", "warnings"])


def test_an_eos_is_the_last_steps_output_so_autoregressive_stays_at_one_token_per_step():
    summary = summarize(pd.DataFrame(hand_rows(AR, "ar", [(0, 0)] * 5, [(0.1,), (0.1,)], eos=True)))
    assert summary.loc[0, "new_tokens"] == 2 * 4 and summary.loc[0, "tokens_per_step"] == 1.0


def test_a_speedup_above_the_tokens_per_step_is_flagged_impossible():
    ar = hand_rows(AR, "ar", [(0, 0)] * 8, [(1.0, 1.0), (1.0, 1.0)])
    spec = hand_rows(SPEC, "spec", [(2, 1)] * 4, [(0.1, 0.1), (0.1, 0.1)])  # 10x at 2 tokens per step
    summary = summarize(pd.DataFrame(ar + spec)).set_index("cell_key")
    assert any(w.startswith("impossible") for w in summary.loc["spec", "warnings"])
    assert summary.loc["ar", "warnings"] == []


def test_a_control_a_little_above_one_token_per_step_within_its_interval_is_noise_not_impossible():
    # 2 prompts x 3 rounds: the 6 paired units an interval needs (MIN_UNITS).
    ar = hand_rows(AR, "ar", [(0, 0)] * 8, [(1.0, 1.2, 1.05), (1.1, 0.9, 1.0)])
    control = hand_rows(Cell("autoregressive", replica=1), "control", [(0, 0)] * 8,
                        [(1.1, 1.0, 1.0), (0.95, 1.0, 1.0)])
    summary = summarize(pd.DataFrame(ar + control)).set_index("cell_key")
    low, speedup, high = summary.loc["control", ["speedup_low", "speedup", "speedup_high"]]
    assert low < 1.0 < speedup < high  # above one token per step, but only by noise
    assert not any(w.startswith("impossible") for w in summary.loc["control", "warnings"])


def test_the_bootstrap_interval_covers_the_true_speedup_about_95_percent_of_the_time():
    """Simulated timings with a known speedup of 1.5, per-prompt lengths and multiplicative noise shared by
    the pair within a round (machine drift) plus noise of each measurement."""
    rng = np.random.default_rng(1)
    covered, trials = 0, 200
    for _ in range(trials):
        work = rng.uniform(0.5, 2.0, size=(8, 1))
        drift = rng.lognormal(0, 0.2, size=(8, 3))
        base = work * drift * rng.lognormal(0, 0.05, size=(8, 3))
        cell = work / 1.5 * drift * rng.lognormal(0, 0.05, size=(8, 3))
        tokens = np.full((8, 3), 10.0)
        _, low, high = intervals.speedup(intervals.Units(cell, tokens), intervals.Units(base, tokens),
                                         intervals.draws(8, 3, resamples=500, seed=int(rng.integers(1 << 30))))
        covered += low <= 1.5 <= high
    assert 0.88 <= covered / trials <= 0.995, covered / trials


def test_the_interval_does_not_narrow_when_the_baseline_has_rounds_the_cell_lacks():
    """A baseline measured in more rounds (other groups, a retried cell) must not shrink the cell's interval:
    only the paired units count, each prompt drawn as many times as it has them."""
    rng = np.random.default_rng(3)
    cell, base = rng.uniform(0.5, 0.7, size=(6, 3)), rng.uniform(0.9, 1.1, size=(6, 3))
    tokens = np.full((6, 3), 10.0)
    paired = intervals.speedup(intervals.Units(cell, tokens), intervals.Units(base, tokens))
    for extra in (3, 9):  # baseline columns with no cell partner
        padded_cell = np.hstack([cell, np.full((6, extra), np.nan)])
        padded_base = np.hstack([base, rng.uniform(0.9, 1.1, size=(6, extra))])
        padded_tokens = np.full((6, 3 + extra), 10.0)
        padded = intervals.speedup(intervals.Units(padded_cell, padded_tokens),
                                   intervals.Units(padded_base, padded_tokens))
        # The same point; the same interval up to Monte Carlo noise (the padding used to shrink it by half).
        assert padded[0] == pytest.approx(paired[0])
        assert padded[2] - padded[1] == pytest.approx(paired[2] - paired[1], rel=0.1)


def test_intervals_collapse_without_noise_and_are_absent_for_one_measurement():
    tokens = np.full((4, 3), 5.0)
    times = np.tile(np.array([[1.0], [2.0], [3.0], [4.0]]), (1, 3))
    point, low, high = intervals.speedup(intervals.Units(times / 2, tokens), intervals.Units(times, tokens))
    assert point == pytest.approx(2.0) and low == pytest.approx(2.0) and high == pytest.approx(2.0)
    point, low, high = intervals.ratio(intervals.Units(np.array([[5.0]]), np.array([[1.0]])))
    assert point == 5.0 and np.isnan(low) and np.isnan(high)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    setup = Setup(model="synthetic:tiny?agree=2", prompts=("hello", "world wide", "abc"), max_new_tokens=12,
                  warmup=0, repeats=2, threads=1)
    cells = with_baseline([Cell("self_speculative", 2, 4), Cell("self_speculative", 1, 2),
                           Cell("speculative", None, 4, "synthetic:tiny?agree=2&layers=2"),
                           Cell("self_speculative", 2, 4, backend="hf")], control=True)
    return execute(setup, cells, tmp_path_factory.mktemp("real") / "run").root


def test_costs_come_from_the_passes_each_cell_ran(real_run):
    summary, manifest = load_summary(real_run)
    shape = costs.ModelShape.from_config(manifest["models"]["target"]["config"], bytes_per_param=4)
    frame = pd.concat(pd.read_parquet(p) for p in (real_run / "cells").glob("*.parquet"))
    first = frame[frame["repeat"] == 0]
    ar = summary[summary["cell_label"] == "autoregressive"].iloc[0]
    # Autoregressive by hand, from the step contexts alone: a prefill of all prompt tokens but the last, then
    # one full pass per step over one position at its context, with the head on it.
    rows = first[(first["strategy"] == "autoregressive") & (first["replica"] == 0) & (first["backend"] == "native")]
    by_hand = sum(costs.forward_flops(shape, int(row.prompt_tokens) - 1, 0)
                  + sum(costs.forward_flops(shape, 1, int(c), head_positions=1) for c in row.step_context)
                  for row in rows.itertuples())
    assert ar["flops_per_token"] == pytest.approx(by_hand / rows["new_tokens"].sum())
    spec = summary[summary["cell_label"] == "self_speculative E=2 K=4"].iloc[0]
    hf = summary[summary["cell_label"] == "self_speculative (hf) E=2 K=4"].iloc[0]
    # The native engine shares the low layers' work; transformers' assistant_early_exit recomputes it.
    assert spec["flops_per_token"] < hf["flops_per_token"]
    assert spec["flops_wasted_share"] == 0.0 and spec["params_resident"] == ar["params_resident"]
    two_model = summary[summary["strategy"] == "speculative"].iloc[0]
    assert two_model["params_resident"] > ar["params_resident"]
    assert spec["predicted_speedup"] == pytest.approx(ar["bytes_per_token"] / spec["bytes_per_token"])


def test_an_autoregressive_control_is_timed_like_a_cell_against_the_baseline(real_run):
    """Whether its interval holds 1.00 depends on the machine: `nox -s noise` measures that. Here: the
    control is an independent copy, paired with the baseline round by round, with the same tokens."""
    summary, _ = load_summary(real_run)
    control = summary[(summary["replica"] == 1) & (summary["backend"] == "native")].iloc[0]
    baseline = summary[(summary["replica"] == 0) & (summary["strategy"] == "autoregressive")
                       & (summary["backend"] == "native")].iloc[0]
    assert control["cell_key"] != baseline["cell_key"] and control["lossless"] == 1.0
    assert control["new_tokens"] == baseline["new_tokens"] and control["tokens_per_step"] == 1.0
    assert control["speedup_low"] < control["speedup"] < control["speedup_high"]  # a real interval, not 1 by fiat


def test_a_partial_cell_is_left_out_of_the_summary(real_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(real_run, copy)
    victim = next(p for p in (copy / "cells").glob("*.parquet")
                  if pd.read_parquet(p)["strategy"].iloc[0] == "speculative")
    frame = pd.read_parquet(victim)
    frame[frame["prompt_index"] != 2].to_parquet(victim)
    summary, _ = load_summary(copy)
    assert "speculative" not in set(summary["strategy"]) and len(summary) == 7


def test_a_sampled_run_shows_no_lossless(tmp_path):
    setup = Setup(model="synthetic:tiny", prompts=("hi",), max_new_tokens=6, warmup=0, repeats=1, sample=True)
    execute(setup, with_baseline([Cell("self_speculative", 1, 2)]), tmp_path)
    summary, _ = load_summary(tmp_path)
    assert summary["lossless"].isna().all()


def test_the_time_model_adds_each_pass_as_layers_times_its_measured_block_time(real_run):
    """The prediction of the time model, redone by hand from the calibration stored in the manifest and the
    step records (not the passes): autoregressive = prefill + one full pass per step."""
    from skipbench.calibrate import block_sizes

    summary, manifest = load_summary(real_run)
    calibration = manifest["models"]["target"]["calibration"]
    sizes = sorted(int(n) for n in calibration["layer_seconds"])
    assert sizes == block_sizes(max(sizes), 4) and {1, 2, 3, 4, 5, 6} <= set(sizes)

    def layer(n):
        return np.interp(n, sizes, [calibration["layer_seconds"][str(s)] for s in sizes])

    def head(n):
        heads = sorted(int(s) for s in calibration["head_seconds"])
        return np.interp(n, heads, [calibration["head_seconds"][str(s)] for s in heads])

    frame = pd.concat(pd.read_parquet(p) for p in (real_run / "cells").glob("*.parquet"))
    rows = frame[(frame["strategy"] == "autoregressive") & (frame["replica"] == 0) & (frame["backend"] == "native")
                 & (frame["repeat"] == 0)]
    layers = manifest["models"]["target"]["num_layers"]
    by_hand = sum(layers * layer(row.prompt_tokens - 1) + len(row.step_context) * (layers * layer(1) + head(1))
                  for row in rows.itertuples())
    ar = summary[summary["cell_label"] == "autoregressive"].iloc[0]
    assert ar["model_seconds_per_token"] == pytest.approx(by_hand / rows["new_tokens"].sum())
    spec = summary[summary["cell_label"] == "self_speculative E=2 K=4"].iloc[0]
    assert spec["predicted_speedup_time"] == pytest.approx(ar["model_seconds_per_token"]
                                                           / spec["model_seconds_per_token"])
    assert spec["measured_over_predicted"] == pytest.approx(spec["speedup"] / spec["predicted_speedup_time"])
