"""The compiled engine: static shapes and torch.compile give the eager engine's tokens and counts exactly,
compile only while warming up (never inside a timed generation), and run unwarmed shapes eagerly."""

import pytest
import torch
from torch._dynamo.utils import counters

from skipbench.decoding.sampling import Sampler
from skipbench.methods import BuildContext
from skipbench.models import load_model
from skipbench.spec import Cell

NEW = 20
CELLS = [Cell("autoregressive"), Cell("self_speculative", 1, 2), Cell("self_speculative", 2, 2),
         Cell("speculative", None, 2, "synthetic:tiny?layers=2")]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports


@pytest.fixture(scope="module")
def models():
    target = load_model("synthetic:tiny")  # random layers: drafts are often rejected, so every path runs
    draft = load_model("synthetic:tiny?layers=2")
    prompts = [target.tokenizer.encode(text) for text in ("def fibonacci(n):", "The quick brown fox", "1, 2, 3,")]
    return target, draft, prompts


def decoders(models, compiled: bool):
    target, draft, prompts = models
    context = BuildContext.for_run(CELLS, max(map(len, prompts)), NEW)
    built = {}
    for cell in CELLS:
        cell = Cell(cell.strategy, cell.exit_layer, cell.num_speculations, cell.draft_model,
                    "compiled" if compiled else "native")
        built[cell] = cell.method.build(cell, target, draft if cell.draft_model else None, context)
        built[cell].warm()
    return built, context


def generate(decoder, prompt, sampler=None, eos=()):
    return decoder.generate(prompt, max_new_tokens=NEW, sampler=sampler or Sampler(), eos_ids=list(eos), stop=None,
                            seed=0)


def steps(record):
    return [(step.context, step.drafted, step.accepted) for step in record.steps]


def test_compiled_decoding_equals_eager_token_for_token_and_step_for_step(models):
    eager, _ = decoders(models, compiled=False)
    compiled, context = decoders(models, compiled=True)
    graphs = counters["stats"]["unique_graphs"]
    seconds = context.compile_seconds()
    assert seconds and all(value > 0 for value in seconds.values())
    for prompt in models[2]:
        for (cell, ours), theirs in zip(compiled.items(), eager.values(), strict=True):
            want, got = generate(theirs, prompt), generate(ours, prompt)
            assert got.tokens == want.tokens, cell
            assert steps(got) == steps(want), cell
            # The same passes, but a compiled pass scores every query against the whole static cache.
            assert [(p.phase, p.model, p.start, p.end, p.positions, p.context, p.head_positions) for p in got.passes] \
                == [(p.phase, p.model, p.start, p.end, p.positions, p.context, p.head_positions) for p in want.passes]
            assert {p.window for p in got.passes} == {context.capacity}
    # Nothing compiled while decoding: every shape was compiled while warming up, the rest ran eagerly
    # (prefill, and the last steps before the token budget, which draft fewer than K).
    assert counters["stats"]["unique_graphs"] == graphs and context.compile_seconds() == seconds


def test_compiled_sampling_draws_what_eager_sampling_draws(models):
    """The sampler and its generator are the eager engine's, so with the same seed the compiled engine draws
    the same tokens: it keeps the target distribution that tests/test_sampling.py checks."""
    eager, _ = decoders(models, compiled=False)
    compiled, _ = decoders(models, compiled=True)
    for prompt in models[2]:
        for ours, theirs in zip(compiled.values(), eager.values(), strict=True):
            draws = [generate(decoder, prompt, Sampler(True, 0.8, 0.95, torch.Generator().manual_seed(5)))
                     for decoder in (theirs, ours)]
            assert draws[0].tokens == draws[1].tokens and steps(draws[0]) == steps(draws[1])


def test_the_compiled_graphs_of_a_grid_do_not_grow_with_its_exits(models):
    """Exits {1, 2, 3} compile the graphs exits {1} compiled and not one more (dynamo's own count says so too):
    a graph is a pass shape, (rows, positions), shared by every layer and every exit."""
    target, _, prompts = models

    def warm(exits):
        cells = [Cell("self_speculative", exit_layer, k, backend="compiled") for exit_layer in exits for k in (2, 4)]
        context = BuildContext.for_run(cells, max(map(len, prompts)), NEW)
        before = counters["stats"]["unique_graphs"]
        for cell in cells:
            cell.method.build(cell, target, None, context).warm()
        return context.compiled_graphs()["synthetic:tiny"], counters["stats"]["unique_graphs"] - before

    graphs_one, _ = warm((1,))
    graphs_three, compiled_for_three = warm((1, 2, 3))
    assert graphs_one == graphs_three == 3 * 3  # (inputs, layer, head) x positions {1, 3, 5}
    assert compiled_for_three == 0


def test_a_generation_longer_than_the_compiled_capacity_is_refused(models):
    from skipbench.decoding.layers import EngineError

    compiled, context = decoders(models, compiled=True)
    decoder = next(iter(compiled.values()))
    with pytest.raises(EngineError, match="cached positions"):
        decoder.generate(models[2][0] * 20, max_new_tokens=NEW, sampler=Sampler(), eos_ids=[], stop=None, seed=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_float32_the_compiled_engine_equals_eager():
    target = load_model("synthetic:tiny?agree=2", dtype="float32", device="cuda")
    prompt = target.tokenizer.encode("def fibonacci(n):")
    cells = [Cell("autoregressive", backend=b) for b in ("native", "compiled")]
    cells += [Cell("self_speculative", 2, 4, backend=b) for b in ("native", "compiled")]
    context = BuildContext.for_run(cells, len(prompt), NEW)
    made = {}
    for cell in cells:
        decoder = cell.method.build(cell, target, None, context)
        decoder.warm()
        made[cell] = generate(decoder, prompt)
    reference = made[cells[0]].tokens
    assert all(record.tokens == reference for record in made.values())


def test_hitting_a_compile_limit_is_an_error_not_a_silent_fall_back_to_eager(models, monkeypatch):
    from skipbench.decoding import layers
    from skipbench.decoding.layers import EngineError

    monkeypatch.setattr(layers, "WARM_UP_LIMITS", dict(recompile_limit=1, accumulated_recompile_limit=1,
                                                       fail_on_recompile_limit_hit=True))
    target, _, prompts = models
    cell = Cell("self_speculative", 3, 3, backend="compiled")  # shapes no other test compiled
    decoder = cell.method.build(cell, target, None, BuildContext.for_run([cell], max(map(len, prompts)), NEW))
    with pytest.raises(EngineError, match="torch.compile failed"):
        decoder.warm()
