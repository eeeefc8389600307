"""From an `EngineConfig` to a ready model on the device and dtype it is given (the runner chooses them,
`engine/device.py`): where the checkpoint is (local folder or hub id), which architecture (config.json or the
built-in R1-Distill-1.5B config), and the weights.

The model is built on the meta device and materialised once on the target device in the target dtype, then
filled either from safetensors (single file or sharded with its index, streamed shard by shard behind a
`Loading checkpoint shards` progress bar) or, for `--load-format dummy`, with seeded random weights generated
on the device. A quantized model (config.json's `quantization_config`, or `--quantization`) is built with
packed projections and filled by the same two paths, repacked or quantized on the way in (`model.quant`).
Every failure a user can cause (model not found offline, no safetensors, a checkpoint that
does not fit the config) is one clear error that says what to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from r1serve.config import DEFAULT_MODEL, R1_DISTILL_QWEN_1_5B_CONFIG, EngineConfig, ModelConfig
from r1serve.kernels.attention import AttentionBackend
from r1serve.model.quant.config import QuantScheme, resolve_quantization
from r1serve.model.qwen2 import FUSED_SHARDS, Qwen2ForCausalLM

logger = logging.getLogger(__name__)

_CONFIG_PATTERNS = ["*.json", "tokenizer*", "*.jinja", "*.txt", "*.model"]
_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
SHARDS_DESC = "Loading checkpoint shards"
DUMMY_STD = 0.02
_DUMMY_BOUND = DUMMY_STD * 3 ** 0.5  # uniform(-b, b) has std b / sqrt(3)


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local folder nor reachable on the hub (one line: what, and what to do)."""


def resolve_model_path(model: str, revision: str | None, allow_missing: bool,
                       download_dir: str | None = None) -> Path | None:
    """A local folder as is; else a hub id fetched (or found in the cache) with `huggingface_hub`.

    With `allow_missing` (dummy weights) only config and tokenizer files are fetched, and a model that cannot
    be found gives None instead of an error."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local.resolve()
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        if allow_missing:
            return None
        raise ModelNotFoundError(f"model folder {model} does not exist")
    patterns = _CONFIG_PATTERNS if allow_missing else _CONFIG_PATTERNS + _WEIGHT_PATTERNS
    try:
        return Path(_snapshot(model, revision, patterns, download_dir))
    except Exception as e:  # the hub raises many types (offline, not found, gated, network): all = absent
        if allow_missing:
            logger.info("model %s not found locally or on the hub (%s); continuing without files", model,
                        type(e).__name__)
            return None
        raise ModelNotFoundError(
            f"model {model!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({_why(e)}); pass a local path with --model, or run with --load-format dummy"
        ) from e


def _why(error: Exception) -> str:
    name = type(error).__name__
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return f"{name}: not in the local cache, and the hub is offline or unreachable"
    return f"{name}: {str(error).splitlines()[0][:200]}" if str(error) else name


def _snapshot(model: str, revision: str | None, patterns: list[str], cache_dir: str | None) -> str:
    from huggingface_hub import snapshot_download

    try:  # the local cache first, so that a cached model needs no network
        return snapshot_download(model, revision=revision, allow_patterns=patterns, local_files_only=True,
                                 cache_dir=cache_dir)
    except Exception:
        return snapshot_download(model, revision=revision, allow_patterns=patterns, cache_dir=cache_dir)


def load_model_config(config: EngineConfig, model_path: Path | None) -> ModelConfig:
    """The folder's config.json; for dummy weights of the default model, the built-in config."""
    if model_path is not None and (model_path / "config.json").is_file():
        return ModelConfig.from_file(model_path / "config.json")
    builtin_ok = config.load_format == "dummy" and _is_default_model(config.model)
    if builtin_ok:
        logger.info("using the built-in config of %s (no config.json found)", DEFAULT_MODEL)
        return ModelConfig.from_hf_dict(R1_DISTILL_QWEN_1_5B_CONFIG)
    where = f"in {model_path}" if model_path is not None else f"for {config.model!r}"
    raise ModelNotFoundError(f"no config.json {where}: pass a model folder that has one "
                             f"(only {DEFAULT_MODEL} has a built-in config, with --load-format dummy)")


def _is_default_model(model: str) -> bool:
    return model == DEFAULT_MODEL or Path(model.rstrip("/")).name == Path(DEFAULT_MODEL).name


def load_quant_scheme(config: EngineConfig, model_path: Path | None, device: torch.device) -> QuantScheme | None:
    """The run's quantization: config.json's `quantization_config` checked against `--quantization`, or the
    flag's on-load mode; dummy weights are quantized on load in the checkpoint's layout."""
    config_file = model_path / "config.json" if model_path is not None else None
    hf_config = json.loads(config_file.read_text()) if config_file is not None and config_file.is_file() else None
    dummy = config.load_format == "dummy"
    scheme = resolve_quantization(config.quantization, hf_config, dummy, device.type == "cuda")
    return scheme.on_load() if scheme is not None and dummy else scheme


@contextlib.contextmanager
def skip_random_init() -> Iterator[None]:
    """Modules built on the meta device are filled later: their random initialisers are skipped. (On meta
    tensors torch runs them through its compiler stack, whose import takes ~1.5 s and loads Triton where it
    is installed, which on a CPU then reports leaked objects at exit.)"""
    names = ("uniform_", "normal_", "kaiming_uniform_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, _keep)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _keep(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return tensor


def load_model(config: EngineConfig, model_config: ModelConfig, model_path: Path | None,
               device: torch.device, dtype: torch.dtype,
               backend: AttentionBackend | None = None) -> Qwen2ForCausalLM:
    """Build the model on `device` in `dtype`, fill it (safetensors or seeded dummy weights); eval mode."""
    quant = load_quant_scheme(config, model_path, device)
    with torch.device("meta"), skip_random_init():
        model = Qwen2ForCausalLM(model_config, backend, quant=quant)
    _materialize(model.to(dtype), device)
    if config.load_format == "dummy" and quant is not None:
        model.load_weights(dummy_weights(model_config, config.seed, device, dtype))
    elif config.load_format == "dummy":
        init_dummy_weights(model, config.seed)
    else:
        if model_path is None:
            raise ModelNotFoundError(f"no checkpoint folder for {config.model!r}: pass a local path, "
                                     "or run with --load-format dummy")
        model.load_weights(iter_safetensors(safetensors_files(model_path)))
    model.requires_grad_(False)
    return model.eval()


def _materialize(model: Qwen2ForCausalLM, device: torch.device) -> None:
    """Allocate the meta model's parameters on `device`, once each: a tied lm_head is detached first (else
    `to_empty` would give it storage of its own) and tied again after."""
    if model.config.tie_word_embeddings:
        del model.lm_head.weight
    model.to_empty(device=device)
    model.tie_weights()


@torch.no_grad()
def init_dummy_weights(model: Qwen2ForCausalLM, seed: int) -> None:
    """Seeded random weights of std 0.02 (uniform: twice as fast as normal on CPU), norm weights 1; generated
    on the model's device, so the 1.5B model fills in seconds."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():  # a fixed order, so the same seed gives the same weights
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        param.uniform_(-_DUMMY_BOUND, _DUMMY_BOUND, generator=generators[param.device])


@torch.no_grad()
def dummy_weights(model_config: ModelConfig, seed: int, device: torch.device, dtype: torch.dtype
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """The dense model's dummy weights (the values `init_dummy_weights` gives it for `seed`) as Hugging
    Face-named tensors, made one at a time on `device`: what a quantized model quantizes on load."""
    with torch.device("meta"):
        dense = Qwen2ForCausalLM(model_config)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in dense.named_parameters():  # the order init_dummy_weights fills them in
        tensor = torch.empty(param.shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            tensor.uniform_(-_DUMMY_BOUND, _DUMMY_BOUND, generator=generator)
        fused = next((f for f in FUSED_SHARDS if f".{f}." in name), None)
        if fused is None:
            yield name, tensor
            continue
        for part in FUSED_SHARDS[fused]:
            start, rows = dense.shard_range(part)
            yield name.replace(f".{fused}.", f".{part}."), tensor.narrow(0, start, rows)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as stored (packed layouts as packed; a tied lm_head counted once; a weight
    reordered for oneDNN, which has no storage to point at and is never shared, by its identity)."""
    tensors = {id(t) if t.is_mkldnn else t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def safetensors_files(model_path: Path) -> list[Path]:
    """The checkpoint's safetensors files: those of the shard index, else model.safetensors, else any."""
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from e
        files = [model_path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are not in the folder: {', '.join(absent)}")
        return files
    if (model_path / "model.safetensors").is_file():
        return [model_path / "model.safetensors"]
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_path} (other formats are not "
                                "supported): convert the checkpoint, or run with --load-format dummy")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every file, one shard open at a time. Each shard read is a log line (so `--log-file`
    has them); on a terminal the `Loading checkpoint shards` bar also runs, with the log lines above it."""
    from safetensors import safe_open

    with logging_redirect_tqdm():
        for done, path in enumerate(tqdm(files, desc=SHARDS_DESC, unit="shard", disable=None), start=1):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, f.get_tensor(name)
            logger.info("%s: %d/%d (%s)", SHARDS_DESC, done, len(files), path.name)
