"""Where each part of a model lives when it spans devices, computed from its config alone.

A placement names a device for the token embedding, for every decoder layer and for the head (final
norm and LM head). skipbench's engine runs the layers of each device as one stage and moves the hidden
state at every boundary; transformers' `from_pretrained(device_map=...)` takes the same placement as
an accelerate device map (`device_map`).

The ways to ask for one are accelerate's: `auto` and `balanced` spread the bytes evenly over the devices,
`sequential` fills each device before the next, and a JSON file maps module names (`model.embed_tokens`,
`model.layers.7`, `model.layers`, `model.norm`, `lm_head`; the longest prefix wins) to devices (`0`,
`"cuda:1"`, `"cpu"`). Bytes per part come from `costs` (weights) plus the KV cache each layer holds at the
run's longest generation: nothing is loaded to decide.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import dispatch_model

from skipbench.costs import ModelShape, kv_cache_bytes
from skipbench.errors import UserError

MODES = ("auto", "balanced", "sequential")
# What the weights and KV cache of a device may take of its memory: the rest holds activations, the CUDA
# context and allocator slack (the same share the single-device memory check uses).
MEMORY_SHARE = 0.9


class PlacementError(UserError):
    """A placement that cannot be made or read; one line for the user."""


@dataclass(frozen=True)
class Device:
    name: str  # "cuda:3", "cpu"
    memory: int  # bytes it has for us


@dataclass
class Placement:
    """The device of the embedding, of each decoder layer and of the head (final norm + LM head)."""

    embed: str
    layers: list[str]
    head: str
    mode: str = "sequential"  # how it was made: a mode or the JSON file's path

    def stages(self) -> list[tuple[int, int, str]]:
        """Runs of consecutive layers on one device: (start, end, device)."""
        found: list[tuple[int, int, str]] = []
        for index, device in enumerate(self.layers):
            if found and found[-1][2] == device:
                found[-1] = (found[-1][0], index + 1, device)
            else:
                found.append((index, index + 1, device))
        return found

    def devices(self) -> list[str]:
        """Every device used, in the order the hidden state visits them."""
        return list(dict.fromkeys([self.embed, *self.layers, self.head]))

    def boundaries(self) -> int:
        """Moves of the hidden state in one pass through the whole model (embedding -> layers -> head)."""
        path = [self.embed, *self.layers, self.head]
        return sum(1 for before, after in zip(path, path[1:], strict=False) if before != after)

    def device_map(self) -> dict[str, str]:
        """The placement as an accelerate device map for a Llama-family `from_pretrained` (`cpu:N`, distinct
        only to skipbench's engine, is accelerate's `cpu`)."""
        mapped = {"model.embed_tokens": self.embed, "model.rotary_emb": self.embed}
        mapped |= {f"model.layers.{index}": device for index, device in enumerate(self.layers)}
        mapped |= {"model.norm": self.head, "lm_head": self.head}
        return {module: physical(device) for module, device in mapped.items()}

    def describe(self) -> dict:
        """What the manifest records: the mode, the devices and each stage's layers."""
        return {"mode": self.mode, "devices": self.devices(), "embed": self.embed, "head": self.head,
                "stages": [{"layers": [start, end], "device": device} for start, end, device in self.stages()]}

    def summary(self) -> str:
        """One line: `cuda:0 embed + layers 0-9 | cuda:1 layers 10-19 | ... + head`."""
        parts = []
        for start, end, device in self.stages():
            text = f"{device} layers {start}-{end - 1}"
            if start == 0 and device == self.embed:
                text = f"{device} embed + layers {start}-{end - 1}"
            parts.append(text)
        if self.stages() and self.stages()[0][2] != self.embed:
            parts.insert(0, f"{self.embed} embed")
        if self.stages() and self.stages()[-1][2] == self.head:
            parts[-1] += " + head"
        else:
            parts.append(f"{self.head} head")
        return " | ".join(parts)


def parse_memory(text: str) -> int:
    """`80GB` (10^9), `80GiB` (2^30), `24000MB`, or plain bytes -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?)?\s*", str(text), re.I)
    if not match:
        raise PlacementError(f"cannot read the memory size {text!r}: write e.g. 80GB, 80GiB or 24000MB")
    unit = (match[2] or "B").upper().removesuffix("B") or "B"
    scale = {"B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(float(match[1]) * scale[unit])


def target_devices(gpus: int, memory: str | int) -> list[Device]:
    """`--gpus N --gpu-memory 80GB`: N devices cuda:0..N-1 of that size (for a dry run of another machine)."""
    if gpus < 1:
        raise PlacementError(f"--gpus must be >= 1 (got {gpus})")
    size = memory if isinstance(memory, int) else parse_memory(memory)
    return [Device(f"cuda:{index}", size) for index in range(gpus)]


@dataclass
class Parts:
    """The bytes of each part of a model that a placement puts somewhere."""

    embed: int
    layers: list[int]  # weights + KV cache of each layer
    head: int  # final norm + LM head (0 when tied: it is the embedding's matrix)
    tied: bool
    kv_per_layer: int = 0
    weights: int = 0

    @classmethod
    def of(cls, shape: ModelShape, kv_tokens: int = 0) -> Parts:
        counts = shape.params()
        size = shape.bytes_per_param
        kv = int(kv_cache_bytes(shape, kv_tokens, layers=1))
        return cls(embed=counts.embedding * size, layers=[counts.per_layer * size + kv] * shape.layers,
                   head=(counts.final_norm + counts.lm_head) * size, tied=shape.tied_embeddings, kv_per_layer=kv,
                   weights=counts.total * size)

    def total(self) -> int:
        return self.embed + sum(self.layers) + self.head


def place(shape: ModelShape, devices: list[Device], mode: str = "auto", *, kv_tokens: int = 0,
          used: dict[str, int] | None = None) -> Placement:
    """Place a model of `shape` over `devices` (`auto`/`balanced`: even bytes; `sequential`: fill in order).
    `used`: bytes already taken on each device (a target model, when placing its draft)."""
    if mode not in MODES:
        raise PlacementError(f"unknown device map {mode!r}: choose {', '.join(MODES)} or a JSON file")
    if not devices:
        raise PlacementError("no device to place the model on")
    parts = Parts.of(shape, kv_tokens)
    used = dict(used or {})
    room = [max(int(MEMORY_SHARE * device.memory) - used.get(device.name, 0), 0) for device in devices]
    sizes = [parts.embed, *parts.layers, parts.head]  # the order the hidden state visits them
    if mode == "sequential":
        chosen = _fill(sizes, room)
    else:
        chosen = _balance(sizes, room)
    if chosen is None:
        have = ", ".join(f"{d.name} {r / 1e9:.1f} GB" for d, r in zip(devices, room, strict=True))
        raise PlacementError(f"a model of {parts.total() / 1e9:.1f} GB (weights and KV cache) does not fit on "
                             f"{len(devices)} device(s) with room for {have}")
    names = [devices[index].name for index in chosen]
    head = names[0] if parts.tied else names[-1]  # a tied head is the embedding's matrix: where it is
    return Placement(embed=names[0], layers=names[1:-1], head=head, mode=mode)


def _fill(sizes: list[int], room: list[int]) -> list[int] | None:
    """Each part on the first device, from the current one on, with room left for it."""
    left, device, chosen = list(room), 0, []
    for size in sizes:
        while device < len(left) and size > left[device]:
            device += 1
        if device == len(left):
            return None
        left[device] -= size
        chosen.append(device)
    return chosen


def _balance(sizes: list[int], room: list[int]) -> list[int] | None:
    """Contiguous runs of parts, one per device, each about an equal share of the total (weighted by the
    device's room), never past a device's room; falls back to filling in order when that does not fit."""
    total, capacity = sum(sizes), sum(room)
    if total > capacity:
        return None
    shares = [total * r / capacity for r in room]
    limits, running = [], 0.0
    for share in shares:
        running += share
        limits.append(running)
    chosen, left, done, device = [], list(room), 0, 0
    for size in sizes:
        # Move on once this device's share is reached (by the part's middle), or when it has no room left.
        while device < len(room) - 1 and (done + size / 2 > limits[device] or size > left[device]):
            device += 1
        if size > left[device]:
            return _fill(sizes, room)
        left[device] -= size
        done += size
        chosen.append(device)
    return chosen


def read_map(path: str, num_layers: int, tied: bool = False) -> Placement:
    """A JSON device map (module name -> device) as a placement; the longest matching name wins."""
    file = Path(path)
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise PlacementError(f"--device-map {path}: cannot read it as JSON ({error})") from None
    if not isinstance(data, dict) or not data:
        raise PlacementError(f"--device-map {path}: expected an object mapping module names to devices")
    mapping = {str(name): _device_name(value, path) for name, value in data.items()}

    def lookup(module: str) -> str:
        parts = module.split(".")
        for cut in range(len(parts), -1, -1):
            key = ".".join(parts[:cut])
            if key in mapping:
                return mapping[key]
        raise PlacementError(f"--device-map {path} places no module for {module} (add it, a prefix of it, or \"\")")

    layers = [lookup(f"model.layers.{index}") for index in range(num_layers)]
    embed = lookup("model.embed_tokens")
    head = embed if tied else lookup("lm_head")
    if not tied and lookup("model.norm") != head:
        raise PlacementError(f"--device-map {path}: model.norm and lm_head must be on one device")
    return Placement(embed=embed, layers=layers, head=head, mode=str(path))


def _device_name(value, path: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"cuda:{value}"
    if isinstance(value, str) and (value == "cpu" or re.fullmatch(r"(cuda|cpu):\d+", value)):
        return value
    raise PlacementError(f"--device-map {path}: {value!r} is not a device (use 0, \"cuda:1\" or \"cpu\"; disk "
                         f"offload is not supported)")


def resolve(spec: str, shape: ModelShape, devices: list[Device], *, kv_tokens: int = 0,
            used: dict[str, int] | None = None) -> Placement:
    """A --device-map value (a mode or a JSON file) as a placement of this model."""
    if spec in MODES:
        return place(shape, devices, spec, kv_tokens=kv_tokens, used=used)
    return read_map(spec, shape.layers, shape.tied_embeddings)


@dataclass
class DeviceMemory:
    """Bytes a placement puts on one device, by kind."""

    weights: int = 0
    kv: int = 0
    draft: int = 0  # a separate draft model's weights and KV cache
    roles: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.draft


def memory(shape: ModelShape, placement: Placement, kv_tokens: int,
           into: dict[str, DeviceMemory] | None = None, *, draft: bool = False) -> dict[str, DeviceMemory]:
    """Bytes per device of a placed model: weights and the KV cache at `kv_tokens` positions (added to `into`;
    a `draft` model's bytes go to the draft column)."""
    parts = Parts.of(shape, kv_tokens)
    table = into if into is not None else {}
    role = "draft" if draft else "target"

    def add(device: str, weights: int, kv: int = 0) -> None:
        entry = table.setdefault(device, DeviceMemory())
        if draft:
            entry.draft += weights + kv
        else:
            entry.weights += weights
            entry.kv += kv
        if role not in entry.roles:
            entry.roles.append(role)

    add(placement.embed, parts.embed)
    for device in placement.layers:
        add(device, parts.layers[0] - parts.kv_per_layer, parts.kv_per_layer)
    if parts.head:
        add(placement.head, parts.head)
    return table


def physical(name: str) -> str:
    """The memory a device name draws on: `cpu:N` (stages the engine tells apart) are all the one `cpu`."""
    return "cpu" if name.startswith("cpu") else name


def check_fits(table: dict[str, DeviceMemory], devices: list[Device], what: str) -> None:
    """Refuse, before loading, a placement whose bytes pass a device's share of its memory (the `cpu:N` of one
    machine add up on its `cpu`)."""
    sizes = {device.name: device.memory for device in devices}
    totals = Counter()
    for name, entry in table.items():
        totals[physical(name)] += entry.total
    for name, total in totals.items():
        size = sizes.get(name)
        if size is not None and total > MEMORY_SHARE * size:
            raise PlacementError(f"{what} needs {total / 1e9:.1f} GB on {name} (weights, KV cache, draft) but "
                                 f"{size / 1e9:.1f} GB is available there; use --device-map balanced or more devices")


def check_present(placed: Placement, devices: list[Device], what: str) -> None:
    """Refuse a placement naming a device this machine lacks (a JSON map written for another machine)."""
    present = {device.name for device in devices}
    missing = [name for name in placed.devices() if physical(name) not in present]
    if missing:
        raise PlacementError(f"{what} is placed on {', '.join(missing)}, which this machine lacks; it has "
                             f"{', '.join(sorted(present))}")


# --------------------------------------------------------------------------- a loaded model's modules


def parts_of(model: torch.nn.Module, placed: Placement) -> list[tuple[torch.nn.Module, str]]:
    """(module, device) of every part a placement names, in a Llama-family causal LM."""
    body = model.model
    found = [(body.embed_tokens, placed.embed), (body.rotary_emb, placed.embed)]
    found += [(layer, device) for layer, device in zip(body.layers, placed.layers, strict=True)]
    return [*found, (body.norm, placed.head), (model.lm_head, placed.head)]


def allocate(model: torch.nn.Module, placed: Placement) -> torch.nn.Module:
    """Uninitialised storage for a model built on the meta device, each part on its own device (never the
    whole model on one first): a model too big for any one device is allocated where it will run."""
    for module, device in parts_of(model, placed):
        module.to_empty(device=device, recurse=True)
    return model


def hook(model: torch.nn.Module, placed: Placement) -> torch.nn.Module:
    """transformers' own forward (the hf backends) across devices needs accelerate's hooks, which move each
    part's inputs to its device: `from_pretrained(device_map=)` adds them; a model built here gets them now."""
    if len({physical(device) for device in placed.devices()}) > 1:
        dispatch_model(model, device_map=placed.device_map())
    return model


def label(devices: list[str], names: list[str]) -> str:
    """The device of a model spread over `devices` (each called `names[i]` by the hardware) as one string:
    `8 x NVIDIA A100-SXM4-80GB (cuda:0, ..., cuda:7)`; one device is just its name."""
    if len(devices) == 1:
        return names[0]
    counted = Counter(names)
    return f"{' + '.join(f'{count} x {name}' for name, count in counted.items())} ({', '.join(devices)})"
