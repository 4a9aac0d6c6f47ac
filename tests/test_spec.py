import re

import pytest

from skipbench.spec import Cell, Grid, Setup, SpecError, cell_key, grid_from, load_sweep_file, parse_range, setup_from


@pytest.mark.parametrize("text, expected", [
    ("2..16", list(range(2, 17))),
    ("2..16:2", [2, 4, 6, 8, 10, 12, 14, 16]),
    ("1,2,4", [1, 2, 4]),
    ("1,2,8..12", [1, 2, 8, 9, 10, 11, 12]),
    ("4", [4]),
    ("3..3", [3]),
    ("8..12, 1", [1, 8, 9, 10, 11, 12]),
])
def test_ranges(text, expected):
    assert parse_range(text) == expected


@pytest.mark.parametrize("text", ["", "2..", "a", "16..2", "2..16:0", "1,,2", "2...4", "1-4"])
def test_bad_ranges_are_refused(text):
    with pytest.raises(SpecError):
        parse_range(text)


def test_grid_expands_every_combination_after_the_baseline():
    cells = Grid(strategies=("self_speculative", "speculative"), exits=(2, 4), speculations=(1, 3),
                 draft_models=("d",)).expand()
    assert cells[0] == Cell("autoregressive")
    assert cells[1:] == [Cell("self_speculative", 2, 1), Cell("self_speculative", 2, 3),
                         Cell("self_speculative", 4, 1), Cell("self_speculative", 4, 3),
                         Cell("speculative", None, 1, "d"), Cell("speculative", None, 3, "d")]


def test_grid_from_strings_and_lists():
    grid = grid_from({"exits": "2..6:2", "speculations": [2, 4], "backends": "native,hf"})
    assert grid.exits == (2, 4, 6) and grid.speculations == (2, 4) and grid.backends == ("native", "hf")
    assert [c for c in grid.expand() if c.strategy == "autoregressive"] == [
        Cell("autoregressive", backend="native"), Cell("autoregressive", backend="hf")]
    with pytest.raises(SpecError, match="unknown sweep key"):
        grid_from({"exit": "2"})
    with pytest.raises(SpecError, match="needs --exits"):
        grid_from({}).expand()


def test_a_policy_or_draft_model_named_twice_gives_each_cell_once():
    # The dry run counts and estimates the cells expand() returns: a repeat must not count twice.
    grid = grid_from({"exits": "2", "speculations": "2", "strategies": "self_speculative,speculative",
                      "draft_models": ["d", "d"], "draft_policies": "static,heuristic,static,heuristic"})
    cells = grid.expand()
    assert len(cells) == len(set(cells)) == 5  # AR, self static, self heuristic, draft static, draft heuristic


@pytest.mark.parametrize("cell, message", [
    (Cell("self_speculative", 0, 4), "outside 1..3"),
    (Cell("self_speculative", 4, 4), "outside 1..3"),
    (Cell("self_speculative", None, 4), "needs --exit-layer"),
    (Cell("self_speculative", 2, 0), "K >= 1"),
    (Cell("speculative", None, 4), "needs a draft model"),
    (Cell("autoregressive", 2), "takes no exit layer"),
    (Cell("beam", 2, 2), "unknown strategy"),
    (Cell("self_speculative", 2, 2, backend="vllm"), "unknown backend"),
])
def test_bad_cells_are_refused(cell, message):
    with pytest.raises(SpecError, match=message):
        cell.check(num_layers=4)


def test_cell_key_depends_on_what_defines_the_numbers_only():
    setup = Setup(model="m", prompts=("a",))
    cell = Cell("self_speculative", 2, 4)
    assert cell_key(setup, cell) == cell_key(Setup(model="m", prompts=("a",), warmup=5), cell)
    assert cell_key(setup, cell) != cell_key(Setup(model="m", prompts=("b",)), cell)
    assert cell_key(setup, cell) != cell_key(setup, Cell("self_speculative", 2, 5))


def test_sweep_file(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('out = "runs/x"\n[setup]\nmodel = "synthetic:tiny"\nprompts = ["a", "b"]\n'
                    '[sweep]\nexits = "1..3"\nspeculations = [2]\n')
    loaded = load_sweep_file(str(path))
    assert loaded.setup == {"model": "synthetic:tiny", "prompts": ["a", "b"]} and loaded.out == "runs/x"
    assert setup_from(loaded.setup) == Setup(model="synthetic:tiny", prompts=("a", "b"))
    assert len(grid_from(loaded.grid).expand()) == 4 and loaded.train == []
    path.write_text("[setup]\nmodle = 'x'\n")
    with pytest.raises(SpecError, match="unknown setup key"):
        load_sweep_file(str(path))
    with pytest.raises(SpecError, match="does not exist"):
        load_sweep_file(str(tmp_path / "none.toml"))


@pytest.mark.parametrize("text, message", [
    ('prompts = "hello"', "prompts must be a list of strings"),
    ('num_samples = "two"', "num_samples must be a whole number"),
    ("model = 5", "model must be a string"),
    ("sample = 1", "sample must be true or false"),
    ("temperature = true", "temperature must be a number"),
    ("dataset = 3", "dataset must be a task name or a list"),
])
def test_sweep_file_values_of_the_wrong_type_are_one_clear_error(tmp_path, text, message):
    path = tmp_path / "s.toml"
    path.write_text(f"[setup]\n{text}\n")
    with pytest.raises(SpecError, match=message):
        load_sweep_file(str(path))


@pytest.mark.parametrize("changes, message", [
    (dict(prompts=("",)), "empty --prompt"),
    (dict(prompts=("a",), template="no placeholder"), "no {prompt} placeholder"),
    (dict(prompts=("a",), n_shot=-1), "--n-shot must be >= 0"),
    (dict(prompts=("a",), n_shot=2), "--n-shot needs a --dataset"),
    (dict(prompts=("a",), temperature=-1.0), "--temperature must be > 0"),
    (dict(prompts=("a",), repeats=0), "--repeats must be >= 1"),
])
def test_bad_setups_are_refused(changes, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        Setup(**changes).check()


def test_the_method_registry_is_the_one_list_of_methods():
    from skipbench import methods

    assert methods.strategies() == ("autoregressive", "speculative", "self_speculative")
    assert methods.backends() == ("native", "compiled", "hf", "hf_static")
    with pytest.raises(SpecError, match="backend hf_static does not run self_speculative decoding"):
        Cell("self_speculative", 2, 2, backend="hf_static").check()
    assert grid_from({"backends": "native,hf", "exits": "1", "speculations": "2",
                      "control": True}).expand()[:4] == [
        Cell("autoregressive"), Cell("autoregressive", backend="hf"), Cell("autoregressive", replica=1),
        Cell("autoregressive", backend="hf", replica=1)]
