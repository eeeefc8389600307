"""Frozen, validated configuration: what the model is (`ModelConfig`) and how the engine runs it (`EngineConfig`).

Both are built once at start-up and never mutated. `ModelConfig` is read from a Hugging Face `config.json`
(or the built-in config of DeepSeek-R1-Distill-Qwen-1.5B, so that `--load-format dummy` needs no file);
`EngineConfig` holds the engine arguments that `LLM(...)`, `AsyncEngine` and the server's flags share.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)

# `--quantization` (vLLM's names where vLLM has them): awq and compressed-tensors checkpoints; int8 (weight-only),
# w8a8 (int8 weights and activations), fp8 and w4a16 (int4, group 128) quantize a dense checkpoint on load; awq
# and w4a16 also quantize dummy weights. docs/quantization.md has the table.
QuantizationFlag = Literal["none", "awq", "compressed-tensors", "fp8", "int8", "w8a8", "w4a16"]  # none: as it is
QUANTIZATION_METHODS: tuple[str, ...] = QuantizationFlag.__args__[1:]  # type: ignore[attr-defined]

# config.json of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (see shared/data/SOURCES.md), so that the default
# model runs with `--load-format dummy` on a machine that has no file of it.
R1_DISTILL_QWEN_1_5B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "max_position_embeddings": 131072,
    "model_type": "qwen2",
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 151936,
}


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Qwen2-family checkpoint, with the names Hugging Face uses."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    attention_bias: bool = True  # Qwen2 has a bias on q/k/v, none on o_proj
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}: r1serve runs {', '.join(SUPPORTED_ARCHITECTURES)} "
                "(DeepSeek-R1-Distill-Qwen-1.5B/7B/14B/32B, Qwen2.5)"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"config.json: hidden_act {self.hidden_act!r} is not supported (only 'silu')")

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from the dict of a Hugging Face config.json; refuses what the engine would run wrongly."""
        archs = hf.get("architectures") or [hf.get("model_type", "?")]
        if hf.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported yet")
        if hf.get("rope_scaling"):
            raise ValueError(f"config.json: rope_scaling {hf['rope_scaling']!r} is not supported yet")
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        eos = hf.get("eos_token_id")
        return cls(
            architecture=archs[0],
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_key_value_heads=int(hf.get("num_key_value_heads", num_heads)),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            hidden_act=str(hf.get("hidden_act", "silu")),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            return cls.from_hf_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a valid Qwen2 config.json ({type(e).__name__}: {e})") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as a Hugging Face config.json dict (used by tests and to build reference models)."""
        return {
            "architectures": [self.architecture], "model_type": "qwen2", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings, "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype, "use_sliding_window": False,
        }

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def kv_cache_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        return 2 * self.num_hidden_layers * self.kv_size * dtype_bytes

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + (self.q_size + 2 * self.kv_size)  # qkv + bias
        per_layer += self.q_size * h + 3 * h * i + 2 * h  # o_proj, mlp, two norms
        embed = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embed + h

    def decode_bytes_per_step(self, dtype_bytes: int) -> int:
        """Weight bytes a decode step must read: every layer plus lm_head (the embedding row is a gather)."""
        return (self.num_parameters() - self.vocab_size * self.hidden_size * (0 if self.tie_word_embeddings else 1)
                ) * dtype_bytes


# `--kv-cache-dtype` (vLLM's names): auto = the model's dtype; fp8 and fp8_e4m3 = float8 e4m3 with per-tensor
# scales (docs/quantization.md)
KVCacheDType = Literal["auto", "fp8", "fp8_e4m3"]
KV_CACHE_DTYPES: tuple[str, ...] = KVCacheDType.__args__  # type: ignore[attr-defined]

DType = Literal["auto", "bfloat16", "float16", "float32"]
LoadFormat = Literal["auto", "safetensors", "dummy"]
Device = Literal["auto", "cpu", "cuda"]



def option(default: Any, help: str, *, server: bool = True, **bounds: float) -> Any:
    """An `EngineConfig` field with what `r1serve serve` makes of it: the flag's help and the value's bounds
    (pydantic's names: gt, ge, le), checked here and by the server's settings alike. `server=False`: an engine
    argument that is no server flag."""
    return field(default=default, metadata={"help": help, "bounds": bounds, "server": server})


_BOUND_CHECKS = {"gt": lambda value, bound: value > bound, "ge": lambda value, bound: value >= bound,
                 "le": lambda value, bound: value <= bound}


@dataclass(frozen=True)
class EngineConfig:
    """Engine arguments, shared by `LLM(...)`, `AsyncEngine` and `r1serve serve` (names follow vLLM's). Each
    field's metadata holds its flag's help and its bounds: `server.settings` builds the server's engine options
    from them."""

    model: str = option(DEFAULT_MODEL, "model folder or Hugging Face id")
    tokenizer: str | None = option(None, "tokenizer folder (default: the model's)")  # dummy: bytes without one
    revision: str | None = option(None, "model revision on the Hugging Face hub")
    load_format: LoadFormat = option("auto", "'dummy' builds random weights (no checkpoint needed)")
    dtype: DType = option("auto", "weight dtype")
    device: Device = option("auto", "where the model runs")
    seed: int = option(0, "seed of dummy weights and of requests without their own seed")
    max_model_len: int = option(4096, "context window: prompt + output tokens", gt=0)
    max_num_seqs: int = option(256, "sequences decoded together (also the most `n` allowed)", gt=0)
    max_num_batched_tokens: int = option(8192, "token budget of one engine step", gt=0)  # prefill chunks + decodes
    block_size: int = option(16, "tokens per KV-cache block", gt=0)
    gpu_memory_utilization: float = option(
        0.90, "fraction of GPU memory r1serve may use (weights + KV cache)", gt=0.0, le=1.0)
    kv_cache_space: float = option(4.0, "GiB of KV cache when running on CPU", gt=0.0)
    num_kv_blocks: int | None = option(  # overrides both of the above
        None, "exact number of KV blocks (for tests)", server=False, gt=0)
    enable_prefix_caching: bool = option(True, "reuse the KV blocks of shared prompt prefixes")
    enforce_eager: bool = option(False, "no CUDA graphs")
    tensor_parallel_size: int = option(1, "GPUs per model (only 1 is supported yet)", ge=1)
    quantization: QuantizationFlag | None = option(
        None, "weight quantization (none: as config.json's quantization_config says)")
    download_dir: str | None = option(None, "where hub downloads go (default: the Hugging Face cache)")
    kv_cache_dtype: KVCacheDType = option(
        "auto", "KV-cache dtype: auto = the model's; fp8 (= fp8_e4m3) holds twice the tokens")
    num_cpu_threads: int | None = option(
        None, "threads of a CPU engine (default: every core; the HTTP process keeps one)", gt=0)
    stream_interval: int = option(
        1, "output tokens a stream gathers before they are sent (the first and the last go at once)", gt=0)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for kind, bound in f.metadata.get("bounds", {}).items():
                if value is not None and not _BOUND_CHECKS[kind](value, bound):
                    raise ValueError(f"{f.name}: invalid value {value!r}")
        choices = {"load_format": LoadFormat, "dtype": DType, "device": Device}
        for name, lit in choices.items():
            allowed = lit.__args__  # type: ignore[attr-defined]
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} is not supported yet: r1serve runs on one device"
            )
        if self.quantization not in (None, "none", *QUANTIZATION_METHODS):
            raise ValueError(f"quantization {self.quantization!r} is not supported "
                             f"(accepted: none, {', '.join(QUANTIZATION_METHODS)})")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported "
                             f"(accepted: {', '.join(KV_CACHE_DTYPES)}; fp8 is float8 e4m3)")

    @property
    def fp8_kv_cache(self) -> bool:
        """Whether the KV cache is float8 e4m3 (`--kv-cache-dtype fp8` or `fp8_e4m3`)."""
        return self.kv_cache_dtype != "auto"

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)
