"""Run a list of cells on one setup: models loaded once, prompts built once, each cell stored as it ends.

A rerun of the same run directory skips the cells already stored (resume); `force` redoes them. A cell
that fails is recorded with its error and the rest go on; Ctrl-C loses at most the cell in progress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from skipbench.decoding.layers import EngineError
from skipbench.measure import run_cell
from skipbench.models import LoadedModel, ModelError, check_vocab_match, load_model, num_layers_of
from skipbench.prompts import build_prompts
from skipbench.spec import Cell, Setup, SpecError, cell_key
from skipbench.store import RunStore, manifest_for


class RunError(Exception):
    """The run as a whole cannot go on; one line for the user."""


def check_plan(setup: Setup, cells: list[Cell]) -> None:
    """Every knob checked before any model is loaded."""
    setup.check()
    if not cells:
        raise SpecError("no cells to run")
    layers = num_layers_of(setup.model)
    for cell in cells:
        cell.check(layers)


def model_info(loaded: LoadedModel) -> dict:
    config = loaded.model.config
    return {"name": loaded.name, "source": loaded.source, "revision": loaded.revision,
            "synthetic": loaded.synthetic, "num_layers": config.num_hidden_layers,
            "num_params": loaded.num_params, "config": config.to_dict()}


class Progress:
    """What the executor reports; the CLI draws it with rich, tests may record it."""

    def plan(self, cells: int, prompts: int) -> None: ...
    def cell_started(self, cell: Cell, prompts: int) -> None: ...
    def prompt_done(self, row: dict) -> None: ...
    def cell_done(self, cell: Cell, status: str) -> None: ...  # "done" | "skipped" | "failed: ..."
    def note(self, text: str) -> None: ...


def execute(setup: Setup, cells: list[Cell], out_dir: Path | str, *, force: bool = False,
            progress: Progress | None = None,
            loader: Callable[..., LoadedModel] = load_model) -> RunStore:
    progress = progress or Progress()
    check_plan(setup, cells)
    store = RunStore(out_dir)
    if store.manifest_path().is_file() and not force:
        previous = store.read_manifest().get("setup")
        if previous is not None and previous != _jsonable(asdict(setup)):
            raise RunError(f"{out_dir} holds a run with other settings; choose another --out, or --force")

    if setup.threads is not None:
        torch.set_num_threads(setup.threads)
    target = loader(setup.model, dtype=setup.dtype, device=setup.device)
    drafts: dict[str, LoadedModel] = {}
    for name in sorted({cell.draft_model for cell in cells if cell.draft_model}):
        drafts[name] = loader(name, dtype=setup.dtype, device=setup.device)
        check_vocab_match(target, drafts[name])
    prompt_set = build_prompts(setup, target.tokenizer)
    if not prompt_set.prompts:
        raise RunError("the prompt set is empty")

    store.write_manifest(manifest_for(
        setup, cells,
        models={"target": model_info(target), "drafts": {name: model_info(d) for name, d in drafts.items()}},
        prompts=prompt_set.describe(), device=target.model.device, dtype=target.model.dtype))

    progress.plan(len(cells), len(prompt_set.prompts))
    for cell in cells:
        key = cell_key(setup, cell)
        if store.has_cell(key) and not force:
            progress.cell_done(cell, "skipped")
            continue
        progress.cell_started(cell, len(prompt_set.prompts))
        try:
            rows = run_cell(cell, setup, target, drafts.get(cell.draft_model), prompt_set,
                            on_prompt=progress.prompt_done)
        except (EngineError, ModelError, SpecError, torch.OutOfMemoryError, RuntimeError, ValueError) as error:
            message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            store.write_error(key, cell, message)
            progress.cell_done(cell, f"failed: {message}")
            if target.model.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        store.write_cell(key, cell, rows)
        progress.cell_done(cell, "done")
    return store


def _jsonable(value):
    """What a value looks like after a JSON round trip (tuples become lists), to compare manifests."""
    import json

    return json.loads(json.dumps(value, default=str))
