"""Plain-PyTorch reference of the model's element-wise kernels: RMSNorm, fused residual add + RMSNorm,
SiLU-and-mul and rotary embedding; and of the fused ops built from them (norm then projection, norm then
gate/up projection then SiLU-and-mul, rotary then KV-cache store), written as the composition they fuse.

These are what the CPU runs and what the Triton kernels of `kernels/` are tested against, so their signatures
are a contract: each is a pure function (the store writes only the cache slots it is given), returns the dtype
it was given, and computes in float32 inside where Hugging Face's Qwen2 does (norms and rotary), so that fp32
results match transformers to rounding. A fused kernel rounds where its composition rounds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from r1serve.kernels import onednn
from r1serve.kernels.attention import UNIT_SCALES, KVScales, quantize_kv, write_kv_slots


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, hidden], weight [hidden] → [T, hidden] in x's dtype; normalised in float32 like HF's RMSNorm."""
    x32 = x.float()
    variance = x32.pow(2).mean(dim=-1, keepdim=True)  # [T, 1]
    normed = (x32 * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight.to(x.dtype) * normed


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual = x + residual, then (rms_norm(residual), residual); both [T, hidden] in x's dtype."""
    new_residual = x + residual  # [T, hidden]
    return rms_norm(new_residual, weight, eps), new_residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2*I], gate in the first half and up projection in the second → silu(gate) * up [T, I]."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dimension must be even, got {x.shape[-1]}")
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


def rotary_cos_sin_cache(head_dim: int, max_position: int, theta: float) -> torch.Tensor:
    """[max_position, head_dim] float32: cos(position * freq) in the first half, sin in the second."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # [head_dim/2]
    inv_freq = 1.0 / (theta ** exponents)
    positions = torch.arange(max_position, dtype=torch.int64).float()  # [max_position]
    freqs = torch.outer(positions, inv_freq)  # [max_position, dim/2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (HF `rotate_half`) rotary embedding of q [T, num_heads, head_dim] and k [T, num_kv_heads,
    head_dim] at positions [T] int64, with the [max_position, head_dim] float32 cache. Returns new q, k."""
    half = cos_sin_cache.shape[-1] // 2
    cos_sin = cos_sin_cache.index_select(0, positions)  # [T, head_dim]
    cos = cos_sin[:, None, :half].to(q.dtype)  # [T, 1, head_dim/2], cast first like HF
    sin = cos_sin[:, None, half:].to(q.dtype)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]: x * cos + rotate_half(x) * sin, written per half (the same products as HF)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [T, heads, head_dim/2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in], weight [out, in], bias [out] or None → x @ weight.T + bias [T, out] (`nn.Linear`'s product). A
    weight that `onednn.prepack_linears` reordered (the CPU's bf16 projections) runs oneDNN's product on it."""
    if weight.is_mkldnn:
        return onednn.packed_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm projection of a decoder layer: with a residual, residual = x + residual first; then
    linear(rms_norm(residual or x)). Returns (projection [T, out], the residual stream [T, hidden])."""
    if residual is None:
        return linear(rms_norm(x, norm_weight, eps), weight, bias), x
    normed, residual = fused_add_rms_norm(x, residual, norm_weight, eps)
    return linear(normed, weight, bias), residual


def silu_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The MLP's second half: `silu_and_mul` of the [gate, up] projection [T, 2*I], then the down projection
    weight [hidden, I] (no bias). Returns [T, hidden]."""
    return linear(silu_and_mul(gate_up), weight)


def rotary_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, kv_scales: KVScales = UNIT_SCALES) -> torch.Tensor:
    """Rotates q [T, heads, D] and k [T, kv_heads, D], writes the rotated k and v [T, kv_heads, D] into their
    cache slots ([num_blocks, block_size, kv_heads, D] caches; slot -1 is skipped; an fp8 cache gets
    `quantize_kv` of them with `kv_scales`) and returns the rotated q."""
    q, k = apply_rotary(q, k, positions, cos_sin_cache)
    valid = slot_mapping >= 0  # a host sync: fine for the reference, never used under a CUDA graph
    slots = slot_mapping[valid]
    write_kv_slots(k_cache, slots, quantize_kv(k[valid], k_cache.dtype, kv_scales.k))
    write_kv_slots(v_cache, slots, quantize_kv(v[valid], v_cache.dtype, kv_scales.v))
    return q
