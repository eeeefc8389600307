"""The building blocks of a Qwen2 decoder layer: RMSNorm, rotary embedding, paged grouped-query attention
and the SwiGLU MLP, as small `nn.Module`s over the ops of `kernels.reference`.

Every layer calls its ops through a `KernelOps` table held in `self.ops`, not through direct imports, so
the model runner can point a whole model at Triton kernels on CUDA (`set_ops`) without touching any
layer. The table also names the fused ops a decoder layer is built from (norm then projection, SiLU-and-mul
then the down projection, rotary then KV store); an entry left empty runs as the composition of the
table's own element-wise ops, so a table of element-wise kernels alone still runs the whole model. Attention
goes through an `AttentionBackend` (`kernels.attention`) that owns the paged KV cache layout. Parameter names
(`qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj`) are vLLM's fused forms of Hugging Face's; the `nn.Linear`
modules hold the weights, and the ops table computes their products.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from r1serve.config import ModelConfig
from r1serve.kernels import quant_reference, reference
from r1serve.kernels.attention import UNIT_SCALES, AttentionBackend, AttentionMetadata, KVScales

Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
NormLinear = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, float, torch.Tensor, torch.Tensor | None],
                      tuple[torch.Tensor, torch.Tensor]]
SiluLinear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RotaryStore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                        torch.Tensor, torch.Tensor, KVScales], torch.Tensor]
StoreKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, KVScales], None]
# x, qweight, scales, zeros, group_size, bias → x @ W.T + bias (the int4 layout of `kernels.quant_reference`)
Int4Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int, torch.Tensor | None],
                      torch.Tensor]
# x, qweight, scales, bias, act_quant → x @ W.T + bias (the int8 / fp8 per-channel layouts)
PerChannelLinear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool], torch.Tensor]
RotaryStoreAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor, AttentionMetadata, float, AttentionBackend, KVScales], torch.Tensor]


@dataclass(frozen=True)
class KernelOps:
    """The ops a model runs, with `kernels.reference`'s signatures (Triton twins may replace them).

    The four element-wise ops, `linear` and the quantized products (`int4_linear`, `per_channel_linear`, with
    `kernels.quant_reference`'s signatures) are always set. The fused entries may be None: then the methods
    `norm_linear`, `silu_linear`, `rotary_store_kv` and `rotary_store_attend` run the composition of this
    table's own ops (and the attention backend's). The fused norm + projection entries read a dense weight: a
    quantized layer runs the norm, then its quantized product."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    fused_add_rms_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float],
                                 tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    apply_rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                           tuple[torch.Tensor, torch.Tensor]]
    linear: Linear = reference.linear
    int4_linear: Int4Linear = quant_reference.int4_linear
    per_channel_linear: PerChannelLinear = quant_reference.per_channel_linear
    fused_norm_linear: NormLinear | None = None
    fused_silu_linear: SiluLinear | None = None
    fused_rotary_store_kv: RotaryStore | None = None
    fused_rotary_store_attend: RotaryStoreAttend | None = None

    def norm_linear(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`reference.rms_norm_linear`: (linear(norm(x [+ residual])), the residual stream)."""
        if self.fused_norm_linear is not None:
            return self.fused_norm_linear(x, residual, norm_weight, eps, weight, bias)
        if residual is None:
            return self.linear(self.rms_norm(x, norm_weight, eps), weight, bias), x
        normed, residual = self.fused_add_rms_norm(x, residual, norm_weight, eps)
        return self.linear(normed, weight, bias), residual

    def silu_linear(self, gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`reference.silu_linear`: linear(silu_and_mul(gate_up)), the MLP's down projection of [gate, up]."""
        if self.fused_silu_linear is not None:
            return self.fused_silu_linear(gate_up, weight)
        return self.linear(self.silu_and_mul(gate_up), weight, None)

    def rotary_store_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, store_kv: StoreKV,
                        kv_scales: KVScales = UNIT_SCALES) -> torch.Tensor:
        """`reference.rotary_store_kv`: rotates q and k, stores k and v; returns q. Unfused, the store is the
        attention backend's `store_kv` (same cache layout), so the fused kernel and the backend agree."""
        if self.fused_rotary_store_kv is not None:
            return self.fused_rotary_store_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                              kv_scales)
        q, k = self.apply_rotary(q, k, positions, cos_sin_cache)
        store_kv(k, v, k_cache, v_cache, slot_mapping, kv_scales)
        return q

    def rotary_store_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                            cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float, backend: AttentionBackend,
                            kv_scales: KVScales = UNIT_SCALES) -> torch.Tensor:
        """`rotary_store_kv`, then `backend.attend`: q [T, heads, D] → attention output [T, heads, D]."""
        if self.fused_rotary_store_attend is not None:
            return self.fused_rotary_store_attend(q, k, v, positions, cos_sin_cache, k_cache, v_cache, meta, scale,
                                                  backend, kv_scales)
        q = self.rotary_store_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, meta.slot_mapping,
                                 backend.store_kv, kv_scales)
        return backend.attend(q, k_cache, v_cache, meta, scale, kv_scales)


REFERENCE_OPS = KernelOps(
    rms_norm=reference.rms_norm,
    fused_add_rms_norm=reference.fused_add_rms_norm,
    silu_and_mul=reference.silu_and_mul,
    apply_rotary=reference.apply_rotary,
)


def triton_kernel_ops(fused: bool = True) -> KernelOps:
    """The CUDA table: Triton element-wise kernels and, with `fused`, the skinny-product kernels of
    `kernels.triton_linear` (a few rows; cuBLAS beyond), the fused rotary + KV store, and decode attention with
    both folded in. Needs Triton."""
    from r1serve.kernels import triton_attention, triton_linear, triton_ops, triton_quant

    elementwise = KernelOps(rms_norm=triton_ops.rms_norm, fused_add_rms_norm=triton_ops.fused_add_rms_norm,
                            silu_and_mul=triton_ops.silu_and_mul, apply_rotary=triton_ops.apply_rotary,
                            int4_linear=triton_quant.int4_linear,
                            per_channel_linear=triton_quant.per_channel_linear)
    if not fused:
        return elementwise
    return replace(elementwise, linear=triton_linear.linear, fused_norm_linear=triton_linear.rms_norm_linear,
                   fused_silu_linear=triton_linear.silu_linear,
                   fused_rotary_store_kv=triton_attention.rotary_store_kv,
                   fused_rotary_store_attend=triton_attention.rotary_store_attend)


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

    def project(self, x: torch.Tensor, residual: torch.Tensor | None, proj: nn.Linear
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """proj(norm(x [+ residual])) and the residual stream (x itself when there is no residual yet): the
        norm and the projection as one op where the ops table fuses them."""
        return self.ops.norm_linear(x, residual, self.weight, self.eps, proj.weight, proj.bias)


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
        cache = torch.empty(max_position, head_dim)  # [max_position, head_dim] float32
        if cache.device.type != "meta":  # (on meta, computed where the model lands: see `_apply`)
            cache = reference.rotary_cos_sin_cache(head_dim, max_position, theta)
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self._computed_on = cache.device

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RotaryEmbedding:
        super()._apply(fn, recurse)
        cache = self.cos_sin_cache
        if cache.device.type == "meta":  # nowhere yet: computed where it lands
            self.cos_sin_cache = torch.empty(self.max_position, self.head_dim, device=cache.device)
            self._computed_on = cache.device
        elif cache.device != self._computed_on or cache.dtype != torch.float32:
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

    def __init__(self, config: ModelConfig, backend: AttentionBackend, ops: KernelOps = REFERENCE_OPS) -> None:
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
        self.ops = ops
        self.kv_scales = UNIT_SCALES  # the per-tensor scales of an fp8 KV cache (`KVScales`)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor], rotary_emb: RotaryEmbedding) -> torch.Tensor:
        """hidden [T, hidden_size] (normed) → [T, hidden_size]; stores this step's K/V into `kv_cache` first.

        `rotary_emb` is the model's one shared rotary module (one cos/sin cache for all layers)."""
        qkv = self.ops.linear(hidden, self.qkv_proj.weight, self.qkv_proj.bias)  # [T, q_size + 2 * kv_size]
        return self.attend(positions, qkv, meta, kv_cache, rotary_emb)

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata,
               kv_cache: tuple[torch.Tensor, torch.Tensor], rotary_emb: RotaryEmbedding) -> torch.Tensor:
        """The rest of `forward` from the QKV projection's output qkv [T, q_size + 2 * kv_size]."""
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, heads, head_dim]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, kv_heads, head_dim]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        out = self.ops.rotary_store_attend(q, k, v, positions, rotary_emb.cos_sin_cache, k_cache, v_cache, meta,
                                           self.scale, self.backend, self.kv_scales)  # [T, heads, head_dim]
        return self.project_out(out.reshape(num_tokens, self.q_size))

    def project_out(self, attended: torch.Tensor) -> torch.Tensor:
        """The output projection of the heads' outputs [T, q_size] → [T, hidden_size]."""
        return self.ops.linear(attended, self.o_proj.weight, None)


class Qwen2MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused into one projection (gate first)."""

    def __init__(self, hidden_size: int, intermediate_size: int, ops: KernelOps = REFERENCE_OPS) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] (normed) → [T, hidden]."""
        return self.down(self.ops.linear(x, self.gate_up_proj.weight, None))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The down projection of silu(gate) * up, from the [gate, up] projection [T, 2 * intermediate] →
        [T, hidden]: one op where the ops table fuses the SiLU into the product."""
        return self.ops.silu_linear(gate_up, self.down_proj.weight)


def set_ops(module: nn.Module, ops: KernelOps) -> None:
    """Point every layer under `module` that calls kernel ops at `ops`."""
    for sub in module.modules():
        if hasattr(sub, "ops") and isinstance(sub.ops, KernelOps):
            sub.ops = ops

