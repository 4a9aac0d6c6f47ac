"""Models spread over devices: placements from configs alone, the engine's boundary moves (over CPU "devices"
and eight fake GPUs), and the dry run."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import make_model
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

from skipbench import dryrun, placement, sweep
from skipbench.costs import ModelShape
from skipbench.decoding.autoregressive import Autoregressive
from skipbench.decoding.layers import DecoderStack, KVCache
from skipbench.decoding.loop import generate
from skipbench.decoding.sampling import Sampler
from skipbench.decoding.self_speculative import SelfSpeculative
from skipbench.decoding.speculative import TwoModel
from skipbench.models import PRESETS, synthetic_config
from skipbench.spec import SweepFile

PROMPT = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]
NEW = 24


def decode(strategy, k=0):
    return generate(strategy, PROMPT, max_new_tokens=NEW, num_speculations=k, sampler=Sampler(), eos_ids=[],
                    device=torch.device("cpu"))


# --------------------------------------------------------------------------- placements from configs


def shape_of(preset: str, dtype_bytes: int = 2) -> ModelShape:
    return ModelShape.from_config(synthetic_config(f"synthetic:{preset}"), bytes_per_param=dtype_bytes)


@pytest.mark.parametrize("preset", [name for name in PRESETS if name != "tiny"])
@pytest.mark.parametrize("gpus, size", [(8, "80GB"), (2, "24GB"), (4, "40GB")])
def test_every_preset_is_placed_from_its_config_within_each_devices_memory(preset, gpus, size):
    shape = shape_of(preset)
    devices = placement.target_devices(gpus, size)
    kv_tokens = 2048 + 128
    parts = placement.Parts.of(shape, kv_tokens)
    room = sum(placement.MEMORY_SHARE * device.memory for device in devices)
    for mode in placement.MODES:
        if parts.total() > room:
            with pytest.raises(placement.PlacementError, match="does not fit"):
                placement.place(shape, devices, mode, kv_tokens=kv_tokens)
            continue
        placed = placement.place(shape, devices, mode, kv_tokens=kv_tokens)
        assert len(placed.layers) == shape.layers
        table = placement.memory(shape, placed, kv_tokens)
        placement.check_fits(table, devices, preset)  # every device within its share
        assert sum(entry.weights for entry in table.values()) == shape.params().total * 2
        assert sum(entry.kv for entry in table.values()) == parts.kv_per_layer * shape.layers
        # Stages are contiguous and in device order: the hidden state only moves forward.
        order = [int(device.split(":")[1]) for _, _, device in placed.stages()]
        assert order == sorted(order)


def test_llama2_70b_over_8_a100s_is_spread_evenly_and_8b_needs_both_24gb_cards():
    devices = placement.target_devices(8, "80GB")
    placed = placement.place(shape_of("llama2-70b"), devices, "balanced", kv_tokens=4096)
    assert placed.devices() == [f"cuda:{index}" for index in range(8)]
    per_device = [end - start for start, end, _ in placed.stages()]
    assert max(per_device) - min(per_device) <= 2 and sum(per_device) == 80
    table = placement.memory(shape_of("llama2-70b"), placed, 4096)
    assert max(entry.total for entry in table.values()) < 20e9  # ~138 GB / 8
    # Sequential fills cuda:0 first: 70B in bf16 needs two 80 GB cards.
    sequential = placement.place(shape_of("llama2-70b"), devices, "sequential", kv_tokens=4096)
    assert sequential.devices() == ["cuda:0", "cuda:1"]
    # Llama-3-8B in bf16 (16 GB) with a long KV cache fits on neither 24 GB card's share... but on two.
    eight = shape_of("llama3-8b")
    two = placement.target_devices(2, "24GB")
    assert placement.place(eight, two, "balanced", kv_tokens=8192).devices() == ["cuda:0", "cuda:1"]
    with pytest.raises(placement.PlacementError, match="does not fit"):
        placement.place(eight, placement.target_devices(1, "24GB"), "auto", kv_tokens=8192 * 8)


def test_a_tied_head_stays_with_the_embedding_and_a_draft_takes_what_is_left():
    shape = shape_of("llama3.2-1b")
    devices = placement.target_devices(2, "4GB")
    placed = placement.place(shape, devices, "balanced", kv_tokens=1024)
    assert placed.head == placed.embed == "cuda:0" and placed.layers[-1] == "cuda:1"
    table = placement.memory(shape, placed, 1024)
    used = {name: entry.total for name, entry in table.items()}
    draft = placement.place(shape_of("tiny"), devices, "sequential", kv_tokens=1024, used=used)
    placement.memory(shape_of("tiny"), draft, 1024, table, draft=True)
    assert sum(entry.draft for entry in table.values()) > 0


def test_a_json_device_map_uses_the_longest_matching_module_name(tmp_path):
    file = tmp_path / "map.json"
    file.write_text(json.dumps({"": 0, "model.layers": 1, "model.layers.3": "cuda:2", "lm_head": 2,
                                "model.norm": 2}))
    placed = placement.read_map(str(file), 4)
    assert placed.embed == "cuda:0" and placed.layers == ["cuda:1"] * 3 + ["cuda:2"] and placed.head == "cuda:2"
    assert placed.boundaries() == 2
    file.write_text(json.dumps({"model.layers": "disk"}))
    with pytest.raises(placement.PlacementError, match="not a device"):
        placement.read_map(str(file), 4)


def test_memory_sizes_read_like_accelerate():
    assert placement.parse_memory("80GB") == 80 * 10**9
    assert placement.parse_memory("80GiB") == 80 * 2**30
    assert placement.parse_memory("24000MB") == 24 * 10**9
    with pytest.raises(placement.PlacementError):
        placement.parse_memory("lots")


# --------------------------------------------------------------------------- the engine over CPU "devices"


def cpu_placement(layers: int, cut: list[int]) -> placement.Placement:
    """CPU devices with distinct indices (cpu:0, cpu:1, ...): every stage boundary makes a real .to() call."""
    names = []
    for index in range(layers):
        names.append(f"cpu:{sum(1 for point in cut if index >= point)}")
    return placement.Placement(embed="cpu:0", layers=names, head=f"cpu:{len(cut) + 1}")


@pytest.mark.parametrize("compiled", [False])
def test_a_spread_model_decodes_the_same_tokens_with_every_boundary_moved(model, compiled):
    layers = model.config.num_hidden_layers
    spread = cpu_placement(layers, [1, layers - 1])  # stages [0,1) [1,L-1) [L-1,L), head apart
    single = DecoderStack(model)
    stack = DecoderStack(model, placement=spread)
    assert stack.spread and len(stack._spans(0, layers)) == 3
    reference = decode(Autoregressive(single)).tokens
    record = decode(Autoregressive(stack))
    assert record.tokens == reference
    # Prefill crosses the 2 layer boundaries; each of the NEW steps those and the head's.
    assert stack.moves == 2 + 3 * NEW
    for exit_layer in range(1, layers):
        stack.moves = 0
        record = decode(SelfSpeculative(stack, exit_layer), 3)
        assert record.tokens == reference, exit_layer
        assert stack.moves > 0
    draft_model = make_model("gqa", seed=7, vocab_size=model.config.vocab_size)
    draft = DecoderStack(draft_model, placement=cpu_placement(4, [2]))
    for k in (1, 4):
        assert decode(TwoModel(stack, draft), k).tokens == reference
    assert draft.moves > 0


# --------------------------------------------------------------------------- eight fake GPUs


def fake_copy(module: torch.nn.Module, device: str, mode: FakeTensorMode) -> None:
    """Replace a module's parameters and buffers by fake tensors on `device` (no CUDA needed)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                fake = mode.from_tensor(param.detach())
                with mode:
                    sub._parameters[name] = torch.nn.Parameter(fake.to(device), requires_grad=False)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                fake = mode.from_tensor(buffer)
                with mode:
                    sub._buffers[name] = fake.to(device)


def fake_gpu_stack(layers: int = 8, compile_static: bool = False):
    """A tiny Llama whose embedding is on cuda:0, layer i on cuda:i and the head on cuda:7, all fake."""
    model = make_model("gqa", num_hidden_layers=layers)
    mode = FakeTensorMode()
    spread = placement.Placement(embed="cuda:0", layers=[f"cuda:{index}" for index in range(layers)],
                                 head="cuda:7")
    fake_copy(model.model.embed_tokens, "cuda:0", mode)
    for index, layer in enumerate(model.model.layers):
        fake_copy(layer, f"cuda:{index}", mode)
    fake_copy(model.model.norm, "cuda:7", mode)
    fake_copy(model.lm_head, "cuda:7", mode)
    fake_copy(model.model.rotary_emb, "cuda:0", mode)
    with mode:
        stack = DecoderStack(model, placement=spread, compile=False, capacity=64 if compile_static else 0)
    # aten.embedding (and indexing a fake CUDA tensor by a tensor) do not run under FakeTensorMode without a CUDA
    # build ("PyTorch is not linked with support for cuda devices"); index_select does the same lookup.
    weight = model.model.embed_tokens.weight
    stack.embed_tokens = lambda ids: torch.index_select(weight, 0, ids[0])[None]
    return stack, mode


def test_with_eight_fake_gpus_each_layer_has_its_cache_rotary_and_input_device():
    stack, mode = fake_gpu_stack(compile_static=True)
    stack.compiled = True
    with mode, torch.inference_mode():
        with pytest.raises(FakeTensorDeviceMismatchError):  # the guard the moves are checked against
            stack.layers[1].mlp(torch.zeros(1, 2, 64, device="cuda:0"))
        cache = stack.new_cache(64, None, "target")
        gpus = [torch.device(f"cuda:{index}") for index in range(8)]
        assert [cache.slots[index].keys.device for index in range(8)] == gpus
        assert [slot.values.device for slot in stack.new_slots(4)] == gpus  # a batch's static slots too
        assert [stack._rotary[device].inv_freq.device for device in gpus] == gpus
        assert [stack.input_device(index) for index in range(9)] == [gpus[0], *gpus]
        assert stack._spans(2, 6) == [(index, index + 1, gpus[index]) for index in range(2, 6)]


# A whole pass does not run under FakeTensorMode on this CPU-only torch: Tensor.__getitem__ (any slicing, e.g. in
# transformers' rotate_half and the engine's hidden[:, -1:]) and aten.embedding on a fake CUDA tensor raise
# "PyTorch is not linked with support for cuda devices". The boundary moves are proven on CPU devices above.
@pytest.mark.xfail(raises=RuntimeError, strict=True, reason="slicing a fake CUDA tensor needs a CUDA build")
def test_with_eight_fake_gpus_every_pass_moves_the_hidden_state_at_each_boundary():
    stack, mode = fake_gpu_stack()
    with mode, torch.inference_mode():
        # Without the moves a layer would mix devices: the guard itself works.
        with pytest.raises(FakeTensorDeviceMismatchError):
            stack.layers[1].mlp(torch.zeros(1, 2, 64, device="cuda:0"))
        cache = KVCache(stack.num_layers, 64)
        prompt = torch.zeros(5, dtype=torch.long, device="cuda:0")
        hidden, _ = stack.run(prompt, cache, 0, stack.num_layers)
        assert stack.moves == 7 and hidden.device == torch.device("cuda:7")
        assert [cache.keys[index].device for index in range(8)] == [torch.device(f"cuda:{i}") for i in range(8)]
        # A decode step with its logits: 7 layer boundaries, the head on the last layer's device.
        _, logits = stack.run(torch.zeros(1, dtype=torch.long, device="cuda:7"), cache, 0, 8, head=1)
        assert stack.moves == 14 and logits.device == torch.device("cuda:7")
        # A self-speculative draft of layers < 3 exits to the head on cuda:7; the verify resumes at layer 3.
        states, drafts = stack.chain(logits.argmax(-1), cache, 3, 2)
        assert drafts.device == torch.device("cuda:7") and states.device == torch.device("cuda:2")
        _, verified = stack.run(states, cache, 3, 8, head=2)
        assert verified.device == torch.device("cuda:7")


@pytest.mark.xfail(raises=RuntimeError, strict=True, reason="slicing a fake CUDA tensor needs a CUDA build")
def test_with_eight_fake_gpus_static_caches_and_passes_stay_on_each_layers_device():
    stack, mode = fake_gpu_stack(compile_static=True)
    stack.compiled = True  # static caches and the static pass, run eagerly (no compiler under fake tensors)
    with mode, torch.inference_mode():
        cache = stack.new_cache(64, None, "target")
        assert [cache.slots[i].keys.device for i in range(8)] == [torch.device(f"cuda:{i}") for i in range(8)]
        _, logits = stack.run(torch.zeros(4, dtype=torch.long, device="cuda:0"), cache, 0, 8, head=1)
        assert stack.moves == 8 and logits.device == torch.device("cuda:7")
        states, drafts = stack.chain(logits.argmax(-1), cache, 4, 3)
        assert states.device == torch.device("cuda:3") and drafts.device == torch.device("cuda:7")


def test_the_blog_70b_sweep_dry_run_places_it_on_8_gpus_without_weights():
    plan = sweep.plan("sweeps/blog-llama2-70b.toml", {}, {}, None, SweepFile({}, {}, None, []))
    setup = replace(plan.setup, dataset=plan.tasks[0])
    lines = dryrun.report(setup, plan.cells, dryrun.Options(gpus=8, gpu_memory="80GB"))
    text = "\n".join(lines)
    assert "synthetic:llama2-70b stands in" in text and "fits: yes" in text
    assert "cuda:7 layers 70-79 + head" in text
