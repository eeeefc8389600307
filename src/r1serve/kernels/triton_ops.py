"""Triton versions of the model's element-wise ops: RMSNorm, fused residual-add + RMSNorm, SiLU-and-mul and
rotary embedding.

Each op is memory-bound, so each kernel makes one pass over its tensors (the fused norm reads x and the
residual once and writes both outputs in the same pass) and launches once per call, which keeps a decode step
of 28 layers cheap. Every function has the signature of its plain-torch twin in `kernels/reference.py` and
rounds where the twin rounds (the normalised row to the input dtype before the weight, the SiLU before the
product), so results match the twin to the last bit or nearly; rotary computes in float32 and rounds once
(within an ulp of the twin, closer to the exact value). The module imports without Triton
(`kernels/triton_support.py`); calling an op there raises an error.

On Hopper (`use_pdl()`; R1SERVE_PDL=0 turns it off) the kernels of a decode step's chain (these norms, the
skinny products, the fused rotary + store, decode attention and its merge) launch as programmatic dependent
launches: each lets the next kernel start early (`griddepcontrol.launch_dependents`) and waits for the previous one
(`griddepcontrol.wait`) before it reads anything that kernel wrote, so launches overlap the previous tail.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from r1serve.kernels.reference import rotary_cos_sin_cache
from r1serve.kernels.triton_support import HAS_TRITON, require_triton, tl, triton

__all__ = [
    "HAS_TRITON", "apply_rotary", "as_rows", "fused_add_rms_norm", "kv_quantize", "pdl", "pdl_launch", "pdl_start",
    "rms_norm", "rotary_cos_sin_cache", "rotate_heads", "silu_and_mul", "use_pdl",
]

# Programmatic dependent launch: True / False, or None to decide on first use (R1SERVE_PDL=1 / 0 overrides).
USE_PDL: bool | None = {"1": True, "0": False}.get(os.environ.get("R1SERVE_PDL", ""))


def use_pdl() -> bool:
    """Whether the chain's kernels launch as programmatic dependent launches: on compute capability 9.0 and
    later (Hopper) unless USE_PDL says otherwise."""
    global USE_PDL
    if USE_PDL is None:
        USE_PDL = bool(torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0))
    return USE_PDL


@contextlib.contextmanager
def pdl(enabled: bool | None) -> Iterator[None]:
    """Kernels launched (and graphs captured) inside the block use PDL or not (None: the device's default);
    the setting before is restored after. For tests and benchmarks comparing the two."""
    global USE_PDL
    before, USE_PDL = USE_PDL, enabled
    try:
        yield
    finally:
        USE_PDL = before


def pdl_launch() -> dict[str, bool]:
    """Launch options of a kernel that waits for its predecessor: pass with USE_PDL=use_pdl()."""
    return {"launch_pdl": True} if use_pdl() else {}


if triton is not None:

    @triton.jit
    def pdl_start(USE_PDL: tl.constexpr):
        """Programmatic dependent launch: let the next kernel launch, then wait until the previous one is done
        and its writes are visible. A no-op without USE_PDL."""
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr, eps,
                         stride_x, stride_r, stride_o, stride_nr, hidden,
                         BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, USE_PDL: tl.constexpr):
        """One row per program: (optionally) s = x + residual, then out = weight * rmsnorm(s)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        pdl_start(USE_PDL)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like torch's bf16 add
            tl.store(new_residual_ptr + row * stride_nr + cols, x, mask=mask)
        x32 = x.to(tl.float32)
        variance = tl.sum(x32 * x32, axis=0) / hidden
        normed = (x32 * tl.rsqrt(variance + eps)).to(x.dtype).to(tl.float32)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(x.dtype).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (w * normed).to(x.dtype), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr,
                             USE_PDL: tl.constexpr):
        """Program (row, chunk): out[row, chunk] = silu(gate) * up, gate = x[row, :I], up = x[row, I:]."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        pdl_start(USE_PDL)
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
        g32 = gate.to(tl.float32)
        silu = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (silu * up.to(tl.float32)).to(gate.dtype), mask=mask)

    @triton.jit
    def kv_quantize(x, inv_scale, cache_ptr, FP8: tl.constexpr):
        """What a KV-cache store writes of x (rounded to the model's dtype already): for an fp8 cache
        (`kernels.attention.quantize_kv`), x * inv_scale in float32 clamped to ±448 and cast to e4m3; else x."""
        if FP8:
            x = tl.minimum(tl.maximum(x.to(tl.float32) * inv_scale, -448.0), 448.0).to(cache_ptr.dtype.element_ty)
        return x

    @triton.jit
    def rotate_heads(x_ptr, out_ptr, token, stride_xt, stride_xh, stride_ot, stride_oh, cos, sin, num_heads,
                      inv_scale, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, FP8: tl.constexpr):
        """Neox rotary of all heads of one token as [heads, half] halves, in float32, rounded once; FP8: into
        an fp8 KV cache, quantized with inv_scale after that rounding."""
        heads = tl.arange(0, HEADS_PAD)
        dims = tl.arange(0, HALF)
        mask = heads[:, None] < num_heads
        src = x_ptr + token * stride_xt + heads[:, None] * stride_xh + dims[None, :]
        x1 = tl.load(src, mask=mask, other=0.0)  # [HEADS_PAD, HALF]
        x2 = tl.load(src + HALF, mask=mask, other=0.0)
        dt = x1.dtype
        c = cos.to(dt).to(tl.float32)[None, :]  # the twin (like HF) casts cos/sin to x's dtype first
        s = sin.to(dt).to(tl.float32)[None, :]
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        dst = out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :]
        tl.store(dst, kv_quantize((a * c - b * s).to(dt), inv_scale, out_ptr, FP8), mask=mask)
        tl.store(dst + HALF, kv_quantize((b * c + a * s).to(dt), inv_scale, out_ptr, FP8), mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, cache_ptr,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot,
                       stride_koh, stride_cache, num_heads, num_kv_heads,
                       Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
        """One token per program: reads its cos/sin row once and rotates every q and k head of the token."""
        token = tl.program_id(0).to(tl.int64)
        pos = tl.load(positions_ptr + token).to(tl.int64)
        dims = tl.arange(0, HALF)
        cos = tl.load(cache_ptr + pos * stride_cache + dims)  # [HALF] float32
        sin = tl.load(cache_ptr + pos * stride_cache + HALF + dims)
        rotate_heads(q_ptr, q_out_ptr, token, stride_qt, stride_qh, stride_qot, stride_qoh, cos, sin,
                      num_heads, 1.0, Q_HEADS_PAD, HALF, False)
        rotate_heads(k_ptr, k_out_ptr, token, stride_kt, stride_kh, stride_kot, stride_koh, cos, sin,
                      num_kv_heads, 1.0, K_HEADS_PAD, HALF, False)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View x as [rows, last] with a contiguous last dimension (copying only if it is not)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def _norm_warps(block: int) -> int:
    return max(1, min(16, block // 256))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, hidden], weight [hidden] → weight * x / rms(x) [T, hidden] in x's dtype (one pass)."""
    require_triton("r1serve.kernels.reference")
    x2 = as_rows(x)  # [T, hidden]
    out = torch.empty_like(x2)
    if x2.shape[0]:
        block = triton.next_power_of_2(x2.shape[1])
        _rms_norm_kernel[(x2.shape[0],)](x2, x2, weight, out, out, eps, x2.stride(0), x2.stride(0),
                                         out.stride(0), out.stride(0), x2.shape[1],
                                         BLOCK=block, HAS_RESIDUAL=False, USE_PDL=use_pdl(),
                                         num_warps=_norm_warps(block), **pdl_launch())
    return out.view(x.shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = x + residual; returns (rms_norm(new_residual), new_residual), both [T, hidden]."""
    require_triton("r1serve.kernels.reference")
    x2, r2 = as_rows(x), as_rows(residual)  # [T, hidden]
    out, new_residual = torch.empty_like(x2), torch.empty_like(x2)
    if x2.shape[0]:
        block = triton.next_power_of_2(x2.shape[1])
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, new_residual, eps, x2.stride(0), r2.stride(0),
                                         out.stride(0), new_residual.stride(0), x2.shape[1],
                                         BLOCK=block, HAS_RESIDUAL=True, USE_PDL=use_pdl(),
                                         num_warps=_norm_warps(block), **pdl_launch())
    return out.view(x.shape), new_residual.view(x.shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2*I] (gate first, up second) → silu(gate) * up [T, I]."""
    require_triton("r1serve.kernels.reference")
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dimension must be even, got {x.shape[-1]}")
    x2 = as_rows(x)  # [T, 2I]
    inter = x2.shape[1] // 2
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)  # [T, I]
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(inter))
        grid = (x2.shape[0], triton.cdiv(inter, block))
        _silu_and_mul_kernel[grid](x2, out, x2.stride(0), out.stride(0), inter, BLOCK=block, USE_PDL=use_pdl(),
                                   num_warps=4, **pdl_launch())
    return out.view(*x.shape[:-1], inter)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotary of q [T, num_heads, head_dim] and k [T, num_kv_heads, head_dim] at positions [T] with the
    [max_position, head_dim] float32 cache. q and k may be strided views (e.g. of a fused qkv output); with
    `inplace=True` they are rotated where they lie and returned, else new tensors are returned."""
    require_triton("r1serve.kernels.reference")
    head_dim = q.shape[-1]
    if head_dim % 2 or head_dim & (head_dim - 1):
        raise ValueError(f"apply_rotary: head_dim must be an even power of two, got {head_dim}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("apply_rotary: the last dimension of q, k and the cache must be contiguous")
    q_out = q if inplace else torch.empty_like(q)
    k_out = k if inplace else torch.empty_like(k)
    if q.shape[0]:
        _rotary_kernel[(q.shape[0],)](
            q, k, q_out, k_out, positions, cos_sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1),
            k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0), q.shape[1], k.shape[1],
            Q_HEADS_PAD=triton.next_power_of_2(q.shape[1]), K_HEADS_PAD=triton.next_power_of_2(k.shape[1]),
            HALF=head_dim // 2, num_warps=4)
    return q_out, k_out
