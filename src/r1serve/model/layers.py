"""The building blocks of a Qwen2 decoder layer: RMSNorm, rotary embedding, paged grouped-query attention
and the SwiGLU MLP, as small `nn.Module`s over the element-wise ops of `kernels.reference`.

Every layer calls its ops through a `KernelOps` table held in `self.ops`, not through direct imports, so
the model runner can point a whole model at Triton kernels on CUDA (`set_ops`) without touching any
layer. Attention goes through an `AttentionBackend` (`kernels.attention`) that owns the paged KV cache layout.
Parameter names (`qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj`) are vLLM's fused forms of Hugging Face's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from r1serve.config import ModelConfig
from r1serve.kernels import reference
from r1serve.kernels.attention import AttentionBackend, AttentionMetadata


@dataclass(frozen=True)
class KernelOps:
    """The element-wise ops a model runs, with `kernels.reference`'s signatures (Triton twins may replace)."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    fused_add_rms_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float],
                                 tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    apply_rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                           tuple[torch.Tensor, torch.Tensor]]


REFERENCE_OPS = KernelOps(
    rms_norm=reference.rms_norm,
    fused_add_rms_norm=reference.fused_add_rms_norm,
    silu_and_mul=reference.silu_and_mul,
    apply_rotary=reference.apply_rotary,
)


class RMSNorm(nn.Module):
    """RMSNorm; given a residual, first adds it (`residual = x + residual`) and returns (normed, residual)."""

    def __init__(self, hidden_size: int, eps: float, ops: KernelOps = REFERENCE_OPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Holds the float32 cos/sin cache [max_position, head_dim] and rotates q and k by their positions.

    The cache is a non-persistent buffer, recomputed whenever the module is moved to another device or cast:
    it stays float32 under `model.to(torch.bfloat16)` and is valid after `to_empty` from the meta device.
    """

    def __init__(self, head_dim: int, max_position: int, theta: float,
                 ops: KernelOps = REFERENCE_OPS) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.theta = theta
        self.ops = ops
        cache = reference.rotary_cos_sin_cache(head_dim, max_position, theta)  # [max_position, head_dim]
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self._computed_on = cache.device

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RotaryEmbedding:
        super()._apply(fn, recurse)
        cache = self.cos_sin_cache
        if cache.device != self._computed_on or cache.dtype != torch.float32:
            with torch.device(cache.device):
                self.cos_sin_cache = reference.rotary_cos_sin_cache(self.head_dim, self.max_position,
                                                                    self.theta)
            self._computed_on = cache.device
        return self

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64, q [T, heads, head_dim], k [T, kv_heads, head_dim] → rotated (q, k)."""
        return self.ops.apply_rotary(q, k, positions, self.cos_sin_cache)


class Qwen2Attention(nn.Module):
    """Grouped-query self-attention with a fused QKV projection (bias) over the paged KV cache."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = self.head_dim ** -0.5
        qkv_size = self.q_size + 2 * self.kv_size
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.backend = backend

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor], rotary_emb: RotaryEmbedding) -> torch.Tensor:
        """hidden [T, hidden_size] → [T, hidden_size]; stores this step's K/V into `kv_cache` first.

        `rotary_emb` is the model's one shared rotary module (one cos/sin cache for all layers)."""
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, heads, head_dim]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, kv_heads, head_dim]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = rotary_emb(positions, q, k)
        k_cache, v_cache = kv_cache
        self.backend.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = self.backend.attend(q, k_cache, v_cache, meta, self.scale)  # [T, heads, head_dim]
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class Qwen2MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused into one projection (gate first)."""

    def __init__(self, hidden_size: int, intermediate_size: int, ops: KernelOps = REFERENCE_OPS) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] → [T, hidden]."""
        gate_up = self.gate_up_proj(x)  # [T, 2 * intermediate]
        return self.down_proj(self.ops.silu_and_mul(gate_up))


def set_ops(module: nn.Module, ops: KernelOps) -> None:
    """Point every layer under `module` that calls kernel ops at `ops`."""
    for sub in module.modules():
        if hasattr(sub, "ops") and isinstance(sub.ops, KernelOps):
            sub.ops = ops

