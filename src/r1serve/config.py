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
QUANTIZATION_METHODS = ("awq", "compressed-tensors", "fp8", "int8", "w8a8", "w4a16")

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
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")

DType = Literal["auto", "bfloat16", "float16", "float32"]
LoadFormat = Literal["auto", "safetensors", "dummy"]
Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class EngineConfig:
    """Engine arguments, shared by `LLM(...)`, `AsyncEngine` and `r1serve serve` (names follow vLLM's)."""

    model: str = DEFAULT_MODEL
    tokenizer: str | None = None  # defaults to the model's folder; dummy mode falls back to bytes
    revision: str | None = None
    load_format: LoadFormat = "auto"
    dtype: DType = "auto"
    device: Device = "auto"
    seed: int = 0
    max_model_len: int = 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # token budget of one engine step (prefill chunks + decodes)
    block_size: int = 16
    gpu_memory_utilization: float = 0.90
    kv_cache_space: float = 4.0  # GiB of KV cache on CPU
    num_kv_blocks: int | None = None  # exact number of KV blocks (overrides both of the above; for tests)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    quantization: str | None = None  # None: as config.json's quantization_config says (dense without one)
    download_dir: str | None = None  # where hub downloads go (default: the Hugging Face cache)
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES
    num_cpu_threads: int | None = None  # torch's threads for a CPU engine (None: every core this process may use)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        checks = {
            "max_model_len": self.max_model_len > 0,
            "max_num_seqs": self.max_num_seqs > 0,
            "max_num_batched_tokens": self.max_num_batched_tokens > 0,
            "block_size": self.block_size > 0,
            "gpu_memory_utilization": 0.0 < self.gpu_memory_utilization <= 1.0,
            "kv_cache_space": self.kv_cache_space > 0,
            "num_kv_blocks": self.num_kv_blocks is None or self.num_kv_blocks > 0,
            "num_cpu_threads": self.num_cpu_threads is None or self.num_cpu_threads > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}")
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
