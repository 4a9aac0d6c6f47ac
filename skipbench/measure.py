"""Measure a group of cells on one device: warm-up, then interleaved rounds, one record per generation.

A group is every cell that shares one target model (and its draft models) on one device, with its
autoregressive baseline. Timing is prompt-major and interleaved: in each round, each prompt is decoded by
every cell of the group back to back, in an order that rotates from prompt to prompt and round to round.
So every cell's time on a prompt pairs with the baseline's time on the same prompt in the same round, and
drift of the machine (another job, thermal throttling) hits all cells alike. Warm-up stays outside.

Each row also records the process's CPU time during the generation (`cpu_s`, every thread) and torch's
thread count (`cpu_threads`), so a preempted generation shows (`machine.preempted`). Each finished generation
goes to the run's journal at once; rows become cell files when the session ends (or when the next session
starts after an interruption). A cell is finished when every prompt has `repeats` rows. Greedy decoding must
repeat its tokens and counts: on a CPU a mismatch is an error; on a GPU a note and a flagged row.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from skipbench import tasks
from skipbench.costs import PASS_FIELDS
from skipbench.decoding.loop import synchronize
from skipbench.decoding.record import COUNTS, Generation
from skipbench.decoding.sampling import Sampler
from skipbench.errors import Unsupported, UserError
from skipbench.latency import row_latency, shared
from skipbench.methods import BuildContext
from skipbench.models import LoadedModel
from skipbench.prompts import Prompt, PromptSet
from skipbench.spec import Cell, Setup, baseline_of
from skipbench.store import RunStore, devices_label

COUNT_COLUMNS = (*COUNTS, "tokens")


class MeasurementError(UserError):
    """The measurement itself is wrong (e.g. greedy decoding changed between repeats)."""


def eos_ids(loaded: LoadedModel) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS and the generation config's (maybe a list)."""
    ids = {loaded.tokenizer.eos_token_id}
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def stop_rule(prompt_set: PromptSet, tokenizer) -> Callable[[list[int]], bool] | None:
    """Stop exactly where the completion will be cut, so a leading newline does not end a summary."""
    stops = prompt_set.stop_sequences
    return (lambda ids: tasks.truncate_completion(text := tokenizer.decode(ids), stops) != text) if stops else None


def used_devices(*models: LoadedModel | None) -> list[str]:
    """Every device the models' parts lie on, in the order the hidden state visits them (a spread model's
    placement, else its one device)."""
    names: list[str] = []
    for loaded in models:
        if loaded is not None:
            names += loaded.placement.devices() if loaded.placement else [str(loaded.model.device)]
    return list(dict.fromkeys(names))


class CellRunner:
    """Decodes prompts with one cell's method; one per cell, the models loaded once outside. `devices`: every
    device the run's models use (the rows' device is that set; default: this cell's models')."""

    def __init__(self, cell: Cell, setup: Setup, target: LoadedModel, draft: LoadedModel | None,
                 prompt_set: PromptSet, context: BuildContext, devices: list[str] | None = None):
        self.cell, self.setup, self.target, self.prompt_set = cell, setup, target, prompt_set
        self.device = target.model.device
        cell.method.check_batch(cell.batch_size)
        self.devices = devices or used_devices(target, draft)
        # Tokens are drawn where the logits are: on the head's device when the model spans several.
        self.sample_device = torch.device(target.placement.head) if target.placement else self.device
        self.decoder = cell.method.build(cell, target, draft, context)
        self.eos = eos_ids(target)
        self.stop = stop_rule(prompt_set, target.tokenizer)

    def seed(self, prompt: Prompt) -> int:
        return self.setup.seed * 1_000_003 + prompt.index  # one stream per prompt, the same in every repeat

    def sampler(self, prompt: Prompt) -> Sampler:
        generator = None
        if self.setup.sample:
            generator = torch.Generator(device=self.sample_device)
            generator.manual_seed(self.seed(prompt))
        return Sampler(self.setup.sample, self.setup.temperature, self.setup.top_p, generator)

    def generate(self, prompt: Prompt) -> Generation:
        return self.decoder.generate(prompt.token_ids, max_new_tokens=self.prompt_set.max_new_tokens,
                                     sampler=self.sampler(prompt), eos_ids=self.eos, stop=self.stop,
                                     seed=self.seed(prompt))

    def generate_batch(self, prompts: Sequence[Prompt]) -> tuple[list[Generation], float]:
        """Decode a batch of prompts together (the cell's batch size > 1): rows and the batch's wall time."""
        return self.decoder.generate_batch([prompt.token_ids for prompt in prompts],
                                           max_new_tokens=self.prompt_set.max_new_tokens,
                                           samplers=[self.sampler(prompt) for prompt in prompts], eos_ids=self.eos,
                                           stop=self.stop, seed=self.seed(prompts[0]))

    def warm_up(self) -> None:
        """Compile every shape the cell runs (timed apart, as compile time), then the uncounted generations."""
        self.decoder.warm()
        prompts, size = self.prompt_set.prompts, self.cell.batch_size
        for index in range(self.setup.warmup):
            chosen = [prompts[(index * size + i) % len(prompts)] for i in range(size)]
            _ = self.generate_batch(chosen) if size > 1 else self.generate(chosen[0])

    def batch_rows(self, prompts: Sequence[Prompt], scored: Sequence[dict | None]) -> list[dict]:
        """Decode a batch and return its rows, each with its share of the batch's time (`latency.shared`)."""
        generations, wall = self.generate_batch(prompts)
        shares = shared(generations, wall)
        return [self.row(prompt, generation, score) | share for prompt, generation, score, share
                in zip(prompts, generations, scored, shares, strict=True)]

    def row(self, prompt: Prompt, generation: Generation, scored: dict | None) -> dict:
        """The stored record of one generation; `scored`: quality already computed for this prompt."""
        text = self.target.tokenizer.decode(generation.tokens, skip_special_tokens=True)
        completion = tasks.truncate_completion(text, self.prompt_set.stop_sequences)
        row = {
            "prompt_index": prompt.index,
            "prompt_id": prompt.id,
            "prompt_tokens": generation.prompt_tokens,
            "new_tokens": generation.new_tokens,
            "time_s": generation.time_s,
            "prefill_s": generation.prefill_s,
            "decode_s": generation.time_s - generation.prefill_s,
            "drafted": generation.drafted,
            "accepted": generation.accepted,
            "verify_steps": generation.verify_steps,
            "step_context": [step.context for step in generation.steps],
            "step_drafted": [step.drafted for step in generation.steps],
            "step_accepted": [step.accepted for step in generation.steps],
            "step_exit": [-1 if step.exit_layer is None else step.exit_layer for step in generation.steps],
            **{f"pass_{name}": [getattr(entry, name) for entry in generation.passes] for name in PASS_FIELDS},
            "stop_reason": generation.stop_reason,
            "tokens": generation.tokens,
            "batch_size": self.cell.batch_size,
            "batch_rows": 1,
            "batch_time_s": generation.time_s,
            **row_latency(generation),
            "text": text,
            "completion": completion,
        }
        task = self.prompt_set.task
        if scored is not None and list(scored["tokens"]) == list(generation.tokens):  # its first round's score
            row |= {name: value for name, value in scored.items() if name != "tokens"}
        elif task is not None:
            example = tasks.Example(prompt.id, prompt.text, prompt.reference, prompt.extra)
            scores = tasks.score(task, example, completion, execute_code=self.setup.execute_code,
                                 allow_uncontained=self.setup.execute_uncontained)
            row |= {f"quality_{name}": value for name, value in scores.items()}
        return row


class Progress:
    """What the measurement reports; the CLI draws it, tests may record it."""

    def plan(self, cells: list[Cell], generations: int, rounds: int) -> None: ...
    def warming_up(self, cell: Cell) -> None: ...
    def generation_done(self, cell: Cell, row: dict) -> None: ...
    def round_done(self, round_index: int, rounds: int) -> None: ...
    def cell_done(self, cell: Cell, status: str) -> None: ...  # "done" | "skipped" | "failed: ..."
    def note(self, text: str) -> None: ...


@dataclass
class GroupRows:
    """The rows of each cell of a group: stored ones, then this session's."""

    rows: dict[str, list[dict]] = field(default_factory=dict)
    session: list[tuple[str, dict]] = field(default_factory=list)  # (key, row) of what this session measured

    def count(self, key: str, prompt_index: int) -> int:
        return sum(1 for row in self.rows.get(key, ()) if row["prompt_index"] == prompt_index)

    def first(self, key: str, prompt_index: int) -> dict | None:
        return next((row for row in self.rows.get(key, ()) if row["prompt_index"] == prompt_index), None)

    def has(self, key: str, prompt_index: int, round_index: int) -> bool:
        return any(row["prompt_index"] == prompt_index and row["round"] == round_index
                   for row in self.rows.get(key, ()))

    def add(self, key: str, row: dict) -> None:
        self.rows.setdefault(key, []).append(row)

    def last_round(self) -> int:
        return max((int(row["round"]) for rows in self.rows.values() for row in rows), default=-1)


def anchors(cells: dict[str, Cell]) -> dict[str, str]:
    """Each cell's key -> the key of the cell its speedup divides by (`spec.baseline_of`), within the group."""
    found = {}
    for key, cell in cells.items():
        base = baseline_of(cell, list(cells.values()))
        found[key] = next((other for other, candidate in cells.items() if candidate == base), key)
    return found


def consolidate(store: RunStore, cells: dict[str, Cell], group: int = 0) -> GroupRows:
    """Stored rows of the group's cells, with an interrupted session's journal merged into the cell files.

    A cell's row whose baseline has no row for the same prompt and round (the session was cut between the
    two) cannot be compared, so it is dropped and measured again. Journal rows of cells this session does
    not measure (a narrower grid on the same run) stay in the journal for the session that does."""
    stored = GroupRows()
    for key, cell in cells.items():
        frame = store.read_cell(key, cell, group)
        if frame is not None:
            stored.rows[key] = frame.to_dict("records")
    journal = store.read_journal(group)
    changed = set()
    for row in journal:
        key = row.get("cell_key")
        if key in cells and not stored.has(key, row["prompt_index"], row["round"]):
            stored.add(key, {name: value for name, value in row.items() if name != "cell_key"})
            changed.add(key)
    changed |= _drop_unpaired(stored, anchors(cells))
    for key in changed:
        if stored.rows.get(key):
            store.write_cell(key, cells[key], stored.rows[key], group)
        else:
            store.cell_path(key, group).unlink(missing_ok=True)
    store.drop_journal(group, set(cells))
    return stored


def _drop_unpaired(stored: GroupRows, anchor: dict[str, str]) -> set[str]:
    """Drop rows without their anchor's row of the same (prompt, round), anchors before the cells on them."""

    def depth(key: str) -> int:
        return 0 if anchor[key] == key else 1 + depth(anchor[key])

    changed = set()
    for key in sorted(anchor, key=depth):
        if anchor[key] == key or key not in stored.rows:
            continue
        partners = {(row["prompt_index"], row["round"]) for row in stored.rows.get(anchor[key], ())}
        kept = [row for row in stored.rows[key] if (row["prompt_index"], row["round"]) in partners]
        if len(kept) != len(stored.rows[key]):
            stored.rows[key] = kept
            changed.add(key)
    return changed


def _check_repeat(cell: Cell, first: dict | None, row: dict, sampled: bool, exact: bool) -> str | None:
    """A greedy decode that changed since its first round: an error where it must repeat (a CPU), else a note (GPU
    kernels, chosen per shape and memory alignment, round differently, and a near tie flips)."""
    changed = [name for name in COUNT_COLUMNS if not sampled and first is not None and (
        list(first[name]) != list(row[name]) if name == "tokens" else int(first[name]) != int(row[name]))]
    if not changed:
        return None
    said = f"{cell.label()}: prompt {row['prompt_index']} decoded differently in round {row['round']} than before "
    if exact:
        raise MeasurementError(f"{said}({changed[0]} changed): greedy decoding must repeat exactly; this is a bug, "
                               f"please report it")
    return (f"warning: {said}({changed[0]} changed): this device's kernels do not repeat bit for bit (rows flagged "
            f"repeat_changed; their times still count)")


@dataclass(frozen=True)
class Event:
    """One thing a group's measurement reports, in order. A consumer records them: the run's store, in the
    same process or on the driver of remote workers (`record`)."""

    kind: str  # "plan" | "warming" | "row" | "round" | "done" | "skipped" | "failed" | "unsupported"; remote
    # workers add "worker" (where it runs, the manifest) and "note", which the launchers consume (skipbench.launch)
    key: str | None = None
    row: dict | None = None
    text: str = ""  # "failed": the error
    numbers: tuple[int, ...] = ()  # "plan": (generations, rounds); "round": (index, rounds)


def measure(cells: dict[str, Cell], runners: Callable[[Cell], CellRunner], prompt_set: PromptSet,
            stored: GroupRows, *, repeats: int, sampled: bool, group: int = 0) -> Iterator[Event]:
    """Run the rounds a group still needs after its `stored` rows, as events.

    `cells` maps key -> cell, the baseline(s) among them (`anchors`: what each cell's speedup divides). A
    cell takes part in as many rounds as its least-measured prompt lacks, and every (prompt, round) it
    measures also runs its baseline, the baseline's baseline and so on, so each time it pairs with is from
    the same moment. A cell that fails is reported with its error and leaves the schedule; a failing
    baseline fails the group (nothing can be timed against it).
    """
    rows = GroupRows({key: list(value) for key, value in stored.rows.items()})
    prompts = prompt_set.prompts
    anchor = anchors(cells)
    baselines = set(anchor.values())
    before = {key: {prompt.index: rows.count(key, prompt.index) for prompt in prompts} for key in cells}

    def wanted(key: str, prompt: Prompt, session_round: int) -> bool:
        return before[key][prompt.index] + session_round < repeats

    def with_anchors(keys: set[str]) -> set[str]:
        while not {anchor[key] for key in keys} <= keys:
            keys |= {anchor[key] for key in keys}
        return keys

    needed = {key: max(repeats - min(before[key].values()), 0) for key in cells}
    for key in cells:
        if needed[key] == 0 and key not in baselines:
            yield Event("skipped", key)
    schedule = []  # (session round, prompts decoded together, keys in the order they run)
    sizes = sorted({cell.batch_size for cell in cells.values()})
    for session_round in range(max(needed.values(), default=0)):
        for size in sizes:  # batch 1 first: a run without batches is scheduled as before batches existed
            chunks = [prompts[start : start + size] for start in range(0, len(prompts), size)]
            for number, chunk in enumerate(chunks):
                chosen = with_anchors({key for key, cell in cells.items() if cell.batch_size == size
                                       and any(wanted(key, prompt, session_round) for prompt in chunk)})
                keys = [key for key in cells if key in chosen]  # grid order, baselines first
                if keys:
                    place = chunk[0].index if size == 1 else number
                    shift = (session_round * len(chunks) + place) % len(keys)
                    schedule.append((session_round, chunk, keys[shift:] + keys[:shift]))
    if not schedule:
        return
    active = list(dict.fromkeys(key for _, _, keys in schedule for key in keys))
    rounds = schedule[-1][0] + 1
    generations = sum(len(keys) * len(chunk) for _, chunk, keys in schedule)
    yield Event("plan", numbers=(generations, rounds), text=" ".join(active))

    built: dict[str, CellRunner] = {}
    failed: dict[str, str] = {}

    def attempt(key: str, action: Callable[[], object]):
        try:
            return action(), None
        except (MeasurementError, KeyboardInterrupt):
            raise
        except Unsupported as error:  # the method cannot run this cell (a batch): recorded with the reason
            failed[key] = str(error)
            return None, Event("unsupported", key, text=str(error))
        except Exception as error:  # any failure of one method must not stop the others (recorded, retried)
            message = f"{type(error).__name__}: {_first_line(error)}"
            if key in baselines:
                raise MeasurementError(f"the baseline {cells[key].label()} failed, so no cell of this group can be "
                                       f"timed: {message}") from error
            failed[key] = message
            _empty_cache()
            return None, Event("failed", key, text=message)

    for key in active:
        yield Event("warming", key)
        runner, failure = attempt(key, lambda key=key: runners(cells[key]))
        if failure is None:
            _, failure = attempt(key, runner.warm_up)
        if failure is not None:
            yield failure
        else:
            built[key] = runner
    if not built:
        return  # every cell failed, each reported
    first_round = rows.last_round() + 1
    device = next(iter(built.values())).device
    where = {"host": platform.node(), "device": devices_label(next(iter(built.values())).devices)}
    repeat_noted: set[str] = set()  # cells whose greedy decode changed between rounds (said once each)
    for session_round, chunk, keys in schedule:
        for key in keys:
            if key in failed:
                continue
            _reset_peak(device)
            cpu_began = time.process_time()
            firsts = [rows.first(key, prompt.index) for prompt in chunk]
            scored = [{name: value for name, value in first.items() if name.startswith("quality_") or name == "tokens"}
                      if first else None for first in firsts]
            if cells[key].batch_size > 1:
                made, failure = attempt(key, lambda key=key, chunk=chunk, scored=scored: built[key].batch_rows(
                    chunk, scored))
            else:
                generation, failure = attempt(key, lambda key=key, prompt=chunk[0]: built[key].generate(prompt))
                made = None if failure else [built[key].row(chunk[0], generation, scored[0])]
            cpu_s = time.process_time() - cpu_began  # every thread of this process (`machine.preempted`)
            if failure is not None:
                yield failure
                continue
            for prompt, first, row in zip(chunk, firsts, made, strict=True):
                if len(chunk) > 1 and not wanted(key, prompt, session_round):
                    continue  # a batch decodes all its prompts; this one already has its rows
                row = row | where | {
                    "group": group, "round": first_round + session_round, "repeat": rows.count(key, prompt.index),
                    "peak_mem_bytes": _peak(device), "cpu_s": cpu_s / len(made), "cpu_threads": torch.get_num_threads(),
                    "batch_index": chunk[0].index // cells[key].batch_size}
                changed = _check_repeat(cells[key], first, row, sampled, exact=device.type == "cpu")
                row["repeat_changed"] = changed is not None
                if changed and key not in repeat_noted:
                    repeat_noted.add(key)
                    yield Event("note", key, text=changed)
                rows.add(key, row)
                yield Event("row", key, row)
        if chunk[-1] is prompts[-1] and cells[keys[0]].batch_size == sizes[-1]:
            yield Event("round", numbers=(session_round, rounds))
    for key in active:
        if key not in failed:
            yield Event("done", key)


def record(events: Iterator[Event], store: RunStore, cells: dict[str, Cell], stored: GroupRows, progress: Progress,
           group: int = 0) -> GroupRows:
    """Write a group's events into the run: each row to the journal at once (so an interruption loses at most
    the generation in progress), each finished cell to its file, each failure to its error record."""
    rows = GroupRows({key: list(value) for key, value in stored.rows.items()})
    for event in events:
        if event.kind == "row":
            store.append_journal(event.row | {"cell_key": event.key}, group)
            rows.add(event.key, event.row)
            rows.session.append((event.key, event.row))
            progress.generation_done(cells[event.key], event.row)
        elif event.kind == "done":
            store.write_cell(event.key, cells[event.key], rows.rows[event.key], group)
            progress.cell_done(cells[event.key], "done")
        elif event.kind == "failed":
            store.write_error(event.key, cells[event.key], event.text)
            progress.cell_done(cells[event.key], f"failed: {event.text}")
        elif event.kind == "unsupported":
            store.write_error(event.key, cells[event.key], event.text, unsupported=True)
            progress.cell_done(cells[event.key], event.text)
        elif event.kind == "skipped":
            progress.cell_done(cells[event.key], "skipped")
        elif event.kind == "plan":
            progress.plan([cells[key] for key in event.text.split()], *event.numbers)
        elif event.kind == "warming":
            progress.warming_up(cells[event.key])
        elif event.kind == "round":
            progress.round_done(*event.numbers)
        elif event.kind == "note":
            progress.note(event.text)
    store.drop_journal(group, set(cells))
    return rows


def measure_group(cells: dict[str, Cell], runners: Callable[[Cell], CellRunner], prompt_set: PromptSet,
                  store: RunStore, *, repeats: int, sampled: bool, progress: Progress, group: int = 0,
                  when_measuring: Sequence[str] = ()) -> GroupRows:
    """Measure a group in this process, recording into `store`; return every row of its cells (`session`: the
    ones measured now). `when_measuring`: notes that concern only a session that times something (a busy
    machine), given to `progress` just before the plan, never when nothing is left to measure."""
    stored = consolidate(store, cells, group)
    events = measure(cells, runners, prompt_set, stored, repeats=repeats, sampled=sampled, group=group)
    return record(noted_before_plan(events, when_measuring, progress.note), store, cells, stored, progress, group)


def noted_before_plan(events: Iterator[Event], notes: Sequence[str], note: Callable[[str], None]) -> Iterator[Event]:
    """The events, with `notes` given just before the "plan" event (which comes only when something is measured)."""
    for event in events:
        if event.kind == "plan":
            for text in notes:
                note(text)
        yield event


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def measure_roofline(device: torch.device, dtype: torch.dtype, size_mb: int = 1024, repeats: int = 10) -> dict:
    """The device's copy bandwidth (bytes read + written per second) and matmul rate, measured here.

    Bandwidth / weight bytes is the autoregressive roofline: a batch-1 decode reads every weight once
    per token, so it cannot exceed that many tokens per second.
    """
    def timed(action) -> float:
        action()  # warm-up
        synchronize(device)
        began = time.perf_counter()
        for _ in range(repeats):
            action()
        synchronize(device)
        return (time.perf_counter() - began) / repeats

    source = torch.empty(size_mb * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    copy_s = timed(lambda: target.copy_(source))
    side = 4096 if device.type == "cuda" else 1024
    a = torch.randn(side, side, device=device).to(dtype)
    b = torch.randn(side, side, device=device).to(dtype)
    matmul_s = timed(lambda: a @ b)
    return {"bandwidth_bytes_per_s": 2 * source.numel() * 4 / copy_s,
            "matmul_flops_per_s": 2 * side**3 / matmul_s, "dtype": str(dtype).removeprefix("torch.")}
