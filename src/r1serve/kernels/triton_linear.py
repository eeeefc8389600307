"""Skinny matrix products for decode steps: y = act(x) @ W.T (+ bias) for a few rows of x (M ≤ 16), with the
op in front of a decoder layer's projection optionally fused into the product's prologue.

Why: at batch 1 a decode step is a stream of weight reads (3.09 GB for the 1.5B model, ~1 ms at the H100's
copy bandwidth). cuBLAS tiles suit large M; at M = 1 its kernels for the 1.5B model's projections ran at 28-34%
of copy bandwidth (qkv, o_proj) to 79% (gate_up), down_proj needed a split-K reduce kernel, and the norms and
SiLU around them were launches of their own. Here one program owns `block_n` weight rows (and, with
`split_k`, a share of the reduction). Where one chunk of `block_k` columns holds all of K (the 1536-wide
products), the program issues its whole weight slice and the activation row at once, so it waits for memory
once, and it may own `tiles` such row blocks in turn, with the next block's weights in flight while it
multiplies the current one and the activation computed once (fewer, longer programs); otherwise it streams
chunks with the next chunk's weights and activations in flight while it multiplies the current one. The
activation is computed in the prologue from the previous op's output: plain x, or the
RMSNorm of x or of x + residual (each program recomputes the row's norm, and program 0 writes the new
residual). It is rounded where its plain-torch twin rounds (`kernels/reference.py`), so the product sees the
twin's bf16 operands; the sum runs in float32 and is rounded once, bias added first (cuBLAS's epilogue does the
same). The gated form serves the MLP's fused [gate; up] projection: a program owns the gate and the up rows of the
same output columns and stores silu(gate) * up, so the SiLU-and-mul kernel and half the intermediate's bytes go.
With split-K each program stores its float32 partial and the last of a column's programs to arrive (a
self-resetting atomic ticket) sums them in split order: deterministic, one launch. Two product forms: FMA
(broadcast multiply and row sums) and `tl.dot` (tensor cores, x padded to 16 rows). Which tiles serve a (N, K, M)
shape, and whether fusing the activation pays, was measured per device (`TUNED`, `FUSED`, `GATED` for the H100;
`DEVICE_*` for others, e.g. the H200; benchmarks/decode_step_gpu.py): cuBLAS keeps what it won, e.g. every shape
from 4 rows on. On Hopper the kernel launches as a programmatic dependent launch (`triton_ops.use_pdl`): it issues
its first weight load, then waits for the previous kernel, so the weight stream starts during that kernel's tail.
Triton is imported lazily: the module imports without it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from r1serve.kernels import reference, triton_ops

try:  # Triton is absent on CPU-only machines; the reference ops run there instead
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU machines
    triton = None
    tl = None

__all__ = [
    "FUSED", "GATED", "HAS_TRITON", "SKINNY_MAX_M", "TUNED", "SkinnyConfig", "linear", "rms_norm_gate_up",
    "rms_norm_linear", "skinny_config", "skinny_linear",
]

HAS_TRITON = triton is not None
SKINNY_MAX_M = 16
# The activation each kernel computes from its input (the op fused in front of the product).
ACT_PLAIN, ACT_RMS_NORM, ACT_ADD_RMS_NORM = 0, 1, 2
_WORKSPACE_FLOATS = 1 << 21  # split-K partials: 8 MiB per device
_TICKETS = 1 << 14


@dataclass(frozen=True)
class SkinnyConfig:
    """Tiles of one skinny product: `block_n` weight rows per program, `block_k` columns per step, the
    reduction shared by `split_k` programs, tensor cores (`dot`) or FMA, and the launch's warps and stages."""

    block_n: int
    block_k: int
    split_k: int = 1
    dot: bool = False
    warps: int = 4
    stages: int = 1
    tiles: int = 1  # row blocks per program, one after another (whole-K chunks only)

    def __str__(self) -> str:
        return (f"{'dot' if self.dot else 'fma'} n{self.block_n} k{self.block_k} s{self.split_k} "
                f"w{self.warps} st{self.stages}" + (f" t{self.tiles}" if self.tiles > 1 else ""))


# Measured on the H100 (benchmarks/decode_step_gpu.py, docs/kernels.md), keyed (N, K, M bucket). TUNED: the
# plain product's config, or None where cuBLAS was faster. FUSED: the config of the product with its activation
# fused in, or None where the activation's own kernel followed by the plain product was faster. Shapes not
# listed take `_default_config`.
# H100 run of 2026-11-25, µs per call (28 weight copies in a graph): e.g. M=1 qkv 4.92 vs cuBLAS 6.20, o_proj 4.44
# vs 5.72, gate_up 20.69 vs 23.10, down 12.43 vs 14.86, lm_head 161.7 vs 176.8; fused with their norm: qkv 5.33
# vs 7.95 (norm kernel + cuBLAS), gate_up 21.82 vs 25.56. From 4 rows on cuBLAS won every shape.
TUNED: dict[tuple[int, int, int], SkinnyConfig | None] = {
    (1536, 1536, 1): SkinnyConfig(1, 2048),  # o_proj
    (1536, 1536, 2): SkinnyConfig(2, 2048, warps=8),
    (1536, 1536, 4): None,
    (1536, 8960, 1): SkinnyConfig(2, 1024),  # down_proj
    (1536, 8960, 2): SkinnyConfig(2, 1024),
    (1536, 8960, 4): None,
    (2048, 1536, 1): SkinnyConfig(1, 2048),  # qkv_proj
    (2048, 1536, 2): SkinnyConfig(4, 2048, warps=8),
    (2048, 1536, 4): None,
    (17920, 1536, 1): SkinnyConfig(2, 2048),  # gate_up_proj
    (17920, 1536, 2): None,
    (17920, 1536, 4): None,
    (151936, 1536, 1): SkinnyConfig(2, 2048),  # lm_head
    (151936, 1536, 2): None,
    (151936, 1536, 4): None,
}
FUSED: dict[tuple[int, int, int], SkinnyConfig | None] = {
    (2048, 1536, 1): SkinnyConfig(2, 2048),
    (2048, 1536, 2): SkinnyConfig(4, 2048, warps=8),
    (2048, 1536, 4): None,
    (17920, 1536, 1): SkinnyConfig(2, 2048),
    (17920, 1536, 2): None,
    (17920, 1536, 4): None,
}

# Other devices' sweeps (the same benchmark), keyed by torch.cuda.get_device_name(): their entries replace the
# H100's; shapes and row counts not listed keep the H100's choice.
# H200 run of 2026-12-02, M = 1 and 2 swept (M = 4 not: cuBLAS stays), µs per call at M=1: qkv 3.48 vs cuBLAS
# 5.87, o_proj 2.54 vs 6.55, down 9.43 vs 12.09, but gate_up 18.11 vs 17.51 and lm_head 140.96 vs 123.55: cuBLAS
# read those two faster; fused with its norm: qkv 4.04 vs 4.46 (norm kernel + skinny). The row-tile sweep
# (gate_up_proj, lm_head, qkv, o_proj at M = 1, 2, with row tiles): gate_up with 16 one-row blocks per program
# 16.56 vs cuBLAS 17.47, fused with its norm 17.25 vs 20.09 (norm kernel + cuBLAS); lm_head's best 128.43 vs
# 123.46 and every M = 2 gate_up 22.71 vs 17.55: cuBLAS keeps those. (SiLU-and-mul fused
# into down_proj's prologue lost on both devices, 13.98 vs 13.93 and 11.02 vs 10.35 µs, and is gone: each
# program recomputed it over all 2 x 8960 inputs; SiLU now goes into gate_up's epilogue, `GATED`.)
DEVICE_TUNED: dict[str, dict[tuple[int, int, int], SkinnyConfig | None]] = {
    "NVIDIA H200": {
        (1536, 1536, 1): SkinnyConfig(4, 2048, warps=8),
        (1536, 1536, 2): SkinnyConfig(4, 2048),
        (1536, 8960, 1): SkinnyConfig(2, 2048),
        (1536, 8960, 2): None,
        (2048, 1536, 1): SkinnyConfig(4, 2048, warps=8),
        (2048, 1536, 2): SkinnyConfig(4, 2048, warps=8),
        (17920, 1536, 1): SkinnyConfig(1, 2048, tiles=16),
        (17920, 1536, 2): None,
        (151936, 1536, 1): None,
        (151936, 1536, 2): None,
    },
}
# The in-step sweep (8cb814d): each projection's candidates timed inside the whole step graph at one and two rows
# (decode_step_gpu.py --step-sweep): at one row only qkv + norm moved, to 4 rows and 4 warps per program (µs per
# batch-1 step, two calls: 1,109.9-1,111.9 against 1,132.1-1,134.2 for the old config and 1,115.0-1,117.4 for 8
# rows, 8 warps); at two rows o_proj (DEVICE_TUNED above, 4 rows, 4 warps: 1,328.4-1,331.7 against 1,335.8-1,336.2).
DEVICE_FUSED: dict[str, dict[tuple[int, int, int], SkinnyConfig | None]] = {
    "NVIDIA H200": {
        (2048, 1536, 1): SkinnyConfig(4, 2048),
        (2048, 1536, 2): SkinnyConfig(4, 2048, warps=8),
        (17920, 1536, 1): SkinnyConfig(1, 2048, tiles=16),
        (17920, 1536, 2): None,
    },
}


# The gate/up projection with SiLU-and-mul in its epilogue (`gated`; with the norm in its prologue), keyed
# (2 * intermediate, K, M bucket) like the others: a config where it beat the unfused op (norm kernel, the
# product the tables choose, SiLU kernel), None or absent where it did not or was not measured (the unfused op
# runs). Not measured on the H100 (where the skinny gate_up beat cuBLAS, 20.69 vs 23.10 µs). H200 run of
# 2026-12-02, µs per call: M=1 gated 21.53 (fma n8 k2048 w8) vs 20.23 unfused (cuBLAS alone 16.87); M=2 31.33 vs
# 20.76; forced into the decode step's graph at 1 and 2 rows: 1,274.3 vs 1,211.5 µs at batch 1. With row tiles
# M=1: 18.78 (fma n2 k2048 w4 t4) vs 20.38 for norm kernel + cuBLAS + SiLU, but the unfused op
# is now the norm-fused skinny gate_up (17.25) + SiLU kernel, and in the step that won: 1,106.5 vs 1,154.4 µs per
# batch-1 graph. M=2 26.84 vs 21.00. Gate and up in two accumulators (no interleaved tile): M=1 19.66 (fma n8
# k2048 w8), and in the step 1,157.9 vs 1,133.7 µs for the unfused op: still off.
GATED: dict[tuple[int, int, int], SkinnyConfig | None] = {}
DEVICE_GATED: dict[str, dict[tuple[int, int, int], SkinnyConfig | None]] = {
    "NVIDIA H200": {
        (17920, 1536, 1): None,
        (17920, 1536, 2): None,
    },
}


@functools.lru_cache(maxsize=16)
def device_name(device: torch.device) -> str:
    """The name the device tables are keyed by ('' for a CPU tensor)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else ""


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("triton is not installed: use r1serve.kernels.reference on this machine")


if triton is not None:

    @triton.jit
    def _load_raw(x_ptr, res_ptr, nw_ptr, rows, cols, mask, K, stride_xm, stride_rm, ACT: tl.constexpr):
        """What the activation of columns `cols` is computed from, loaded together: (h, norm weight).
        h: x, or x + residual rounded to x's dtype (ACT_ADD_RMS_NORM)."""
        h = tl.load(x_ptr + rows * stride_xm + cols, mask=mask, other=0.0)
        nw = h
        if ACT == 2:
            r = tl.load(res_ptr + rows * stride_rm + cols, mask=mask, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)  # rounded like torch's bf16 add
        if ACT >= 1:
            nw = tl.load(nw_ptr + cols, mask=cols < K, other=0.0)
        return h, nw

    @triton.jit
    def _activation(h, nw, inv_rms, ACT: tl.constexpr):
        """The [BLOCK_M, BLOCK_K] activation chunk the product consumes, rounded where the twin rounds."""
        if ACT >= 1:  # weight * rmsnorm(h)
            normed = (h.to(tl.float32) * inv_rms[:, None]).to(h.dtype).to(tl.float32)
            a = (nw.to(h.dtype).to(tl.float32) * normed).to(h.dtype)
        else:
            a = h
        return a

    @triton.jit
    def _inv_rms(x_ptr, res_ptr, nw_ptr, offs_m, m_mask, K, eps, stride_xm, stride_rm,
                 ACT: tl.constexpr, BLOCK_K: tl.constexpr):
        """1 / rms of each row of x (+ residual) over all K columns: [BLOCK_M] float32 (a pass of its own, for
        reductions longer than one chunk)."""
        sum_sq = tl.zeros([offs_m.shape[0]], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = (k0 + tl.arange(0, BLOCK_K))[None, :]
            h, _ = _load_raw(x_ptr, res_ptr, nw_ptr, offs_m[:, None], ks, m_mask[:, None] & (ks < K), K,
                             stride_xm, stride_rm, ACT)
            h32 = h.to(tl.float32)
            sum_sq += tl.sum(h32 * h32, axis=1)
        return tl.rsqrt(sum_sq / K + eps)

    @triton.jit
    def _multiply_add(acc, w, a, DOT: tl.constexpr):
        """acc [BLOCK_N, BLOCK_M] += w [BLOCK_N, BLOCK_K] @ a.T ([BLOCK_M, BLOCK_K]), float32 sums."""
        if DOT:
            acc = tl.dot(w, tl.trans(a.to(w.dtype)), acc)
        else:
            prod = w.to(tl.float32)[:, None, :] * a.to(tl.float32)[None, :, :]  # [BLOCK_N, BLOCK_M, BLOCK_K]
            acc += tl.sum(prod, axis=2)
        return acc

    @triton.jit
    def _store_out(y_ptr, b_ptr, acc, offs_n, offs_m, n_mask, m_mask, stride_ym, HAS_BIAS: tl.constexpr):
        """y[m, n] = acc[n, m] (+ bias[n]), rounded once to y's dtype."""
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        dst = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
        tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])

    @triton.jit
    def _store_new_residual(x_ptr, res_ptr, new_res_ptr, offs_m, m_mask, K, stride_xm, stride_rm, stride_nm,
                            BLOCK_K: tl.constexpr):
        """new_residual = x + residual (rounded) for all M rows: written by one program."""
        for k0 in range(0, K, BLOCK_K):
            ks = (k0 + tl.arange(0, BLOCK_K))[None, :]
            mask = m_mask[:, None] & (ks < K)
            h, _ = _load_raw(x_ptr, res_ptr, x_ptr, offs_m[:, None], ks, mask, K, stride_xm, stride_rm, 2)
            tl.store(new_res_ptr + offs_m[:, None] * stride_nm + ks, h, mask=mask)

    @triton.jit
    def _split_k_sum(ws_ptr, tickets_ptr, acc, pid_n, pid_k, N, offs_n, offs_m, n_mask,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
        """Publishes this split's float32 partial; the column's last program to arrive gets (True, the sum of
        all partials in split order), the others (False, acc)."""
        parts = ws_ptr + (offs_n[:, None] * BLOCK_M + offs_m[None, :])  # [SPLIT_K, N, BLOCK_M] float32
        tl.store(parts + pid_k * N * BLOCK_M, acc, mask=n_mask[:, None])
        tl.debug_barrier()  # every thread's partial precedes the release below
        ticket = tl.atomic_add(tickets_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        last = ticket == SPLIT_K - 1
        if last:  # the column's other programs have all published their partials
            tl.atomic_xchg(tickets_ptr + pid_n, 0, sem="relaxed", scope="gpu")  # ready for the next launch
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for s in tl.static_range(SPLIT_K):  # in split order: the sum does not depend on who is last
                acc += tl.load(parts + s * N * BLOCK_M, mask=n_mask[:, None], other=0.0, cache_modifier=".cg")
        return last, acc

    @triton.jit
    def _store_gated(y_ptr, gate, up, offs_n, offs_m, n_mask, m_mask, stride_ym):
        """GATED: y[m, n] = silu(gate[n, m]) * up[n, m], each product rounded to y's dtype first, as
        `silu_and_mul` over the plain product's output sees them."""
        dt = y_ptr.dtype.element_ty
        g32 = gate.to(dt).to(tl.float32)
        silu = (g32 / (1.0 + tl.exp(-g32))).to(dt).to(tl.float32)
        out = (silu * up.to(dt).to(tl.float32)).to(dt)
        tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], out, mask=n_mask[:, None] & m_mask[None, :])

    @triton.jit
    def _tile_rows(tile, N, BLOCK_N: tl.constexpr):
        """The weight rows of row block `tile` (GATED: its gate rows; the up rows are N further) and their mask."""
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        return offs_n, offs_n < N

    @triton.jit
    def _load_rows(w_ptr, offs_n, n_mask, cols, col_mask, stride_wn):
        return tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + cols, mask=n_mask[:, None] & col_mask,
                       other=0.0)

    @triton.jit(do_not_specialize=["M"])
    def _skinny_kernel(x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, new_res_ptr, ws_ptr, tickets_ptr,
                       M, N, K, eps, split_span,
                       stride_xm, stride_rm, stride_wn, stride_ym, stride_nm,
                       ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                       SINGLE: tl.constexpr, DOT: tl.constexpr, GATED: tl.constexpr, TILES: tl.constexpr,
                       USE_PDL: tl.constexpr):
        """Program (n block, k split): rows [BLOCK_N] of W over columns [k_lo, k_lo + split_span) of the
        reduction, for all M rows of x. SINGLE: one chunk holds all K columns (one load of everything), and the
        program may own TILES row blocks in turn. GATED (SINGLE only): W is [gate; up], 2N rows; the program
        multiplies gate rows [BLOCK_N] and the same columns' up rows and stores silu(gate) * up."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n, n_mask = _tile_rows(pid_n * TILES, N, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        k_lo = pid_k * split_span
        k_end = k_lo + split_span  # the split's end; columns past K are masked too
        ks = k_lo + tl.arange(0, BLOCK_K)
        cols = ks[None, :]
        col_mask = ((ks < K) & (ks < k_end))[None, :]
        w_next = _load_rows(w_ptr, offs_n, n_mask, cols, col_mask, stride_wn)  # depends on no earlier kernel
        up_next = w_next  # a placeholder the loop carries unless GATED
        if GATED:
            up_next = _load_rows(w_ptr, offs_n + N, n_mask, cols, col_mask, stride_wn)
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()  # the activations do: wait for the kernel that wrote them
        rows = offs_m[:, None]
        if SINGLE:
            h, nw = _load_raw(x_ptr, res_ptr, nw_ptr, rows, cols, m_mask[:, None] & (cols < K), K,
                              stride_xm, stride_rm, ACT)
            inv_rms = tl.zeros([BLOCK_M], tl.float32)
            if ACT >= 1:  # the norm's statistics from the same registers (masked columns are 0)
                h32 = h.to(tl.float32)
                inv_rms = tl.rsqrt(tl.sum(h32 * h32, axis=1) / K + eps)
            a = _activation(h, nw, inv_rms, ACT)
            for t in range(TILES):  # TILES row blocks, the next one's weights in flight during each product
                tile = pid_n * TILES + t
                w, up_w = w_next, up_next
                if TILES > 1:
                    rows_next, mask_next = _tile_rows(tile + 1, N, BLOCK_N)
                    mask_next = mask_next & (t + 1 < TILES)
                    w_next = _load_rows(w_ptr, rows_next, mask_next, cols, col_mask, stride_wn)
                    if GATED:
                        up_next = _load_rows(w_ptr, rows_next + N, mask_next, cols, col_mask, stride_wn)
                offs_n, n_mask = _tile_rows(tile, N, BLOCK_N)
                acc = _multiply_add(tl.zeros([BLOCK_N, BLOCK_M], tl.float32), w, a, DOT)
                if GATED:
                    up = _multiply_add(tl.zeros([BLOCK_N, BLOCK_M], tl.float32), up_w, a, DOT)
                    _store_gated(y_ptr, acc, up, offs_n, offs_m, n_mask, m_mask, stride_ym)
                else:
                    _store_out(y_ptr, b_ptr, acc, offs_n, offs_m, n_mask, m_mask, stride_ym, HAS_BIAS)
        else:
            inv_rms = tl.zeros([BLOCK_M], tl.float32)
            if ACT >= 1:
                inv_rms = _inv_rms(x_ptr, res_ptr, nw_ptr, offs_m, m_mask, K, eps, stride_xm, stride_rm, ACT,
                                   BLOCK_K)
            h_next, nw_next = _load_raw(x_ptr, res_ptr, nw_ptr, rows, cols, m_mask[:, None] & (cols < K), K,
                                        stride_xm, stride_rm, ACT)
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for k0 in range(k_lo, tl.minimum(k_end, K), BLOCK_K):
                w, h, nw = w_next, h_next, nw_next
                ks_next = k0 + BLOCK_K + tl.arange(0, BLOCK_K)  # the next chunk's loads are in flight meanwhile
                in_split = ((ks_next < K) & (ks_next < k_end))[None, :]
                w_next = _load_rows(w_ptr, offs_n, n_mask, ks_next[None, :], in_split, stride_wn)
                h_next, nw_next = _load_raw(x_ptr, res_ptr, nw_ptr, rows, ks_next[None, :],
                                            m_mask[:, None] & in_split, K, stride_xm, stride_rm, ACT)
                acc = _multiply_add(acc, w, _activation(h, nw, inv_rms, ACT), DOT)
            if SPLIT_K == 1:
                _store_out(y_ptr, b_ptr, acc, offs_n, offs_m, n_mask, m_mask, stride_ym, HAS_BIAS)
            else:
                last, total = _split_k_sum(ws_ptr, tickets_ptr, acc, pid_n, pid_k, N, offs_n, offs_m, n_mask,
                                           BLOCK_M, BLOCK_N, SPLIT_K)
                if last:
                    _store_out(y_ptr, b_ptr, total, offs_n, offs_m, n_mask, m_mask, stride_ym, HAS_BIAS)
        if ACT == 2:
            if (pid_n == 0) & (pid_k == 0):
                _store_new_residual(x_ptr, res_ptr, new_res_ptr, offs_m, m_mask, K, stride_xm, stride_rm,
                                    stride_nm, BLOCK_K)


def _default_config(m_bucket: int, n: int, k: int) -> SkinnyConfig | None:
    """A config for shapes the H100 sweep did not cover: FMA for up to 4 rows, cuBLAS above."""
    if m_bucket > 4:
        return None
    block_n = 8 if m_bucket == 1 else 4
    block_k = 512 if m_bucket <= 2 else 256
    split = 1
    while triton.cdiv(n, block_n) * split < 264 and k >= 2 * split * block_k:
        split *= 2
    return SkinnyConfig(block_n=block_n, block_k=block_k, split_k=split)


def m_bucket(m: int) -> int:
    """The power of two ≥ m that a config is chosen (and the FMA form's rows padded) for."""
    return 1 << max(0, (m - 1).bit_length())


def skinny_config(m: int, n: int, k: int, fused: bool = False, device: str = "", gated: bool = False
                  ) -> SkinnyConfig | None:
    """The config for an (M, N, K) product (`fused`: with its activation fused in; `gated`: the gate/up
    product with its norm and SiLU-and-mul) on the device named `device`, or None: cuBLAS for the plain product,
    the activation's own kernel first for the fused one, the unfused op for the gated one."""
    if m > SKINNY_MAX_M or m < 1:
        return None
    key = (n, k, m_bucket(m))
    if gated:
        return DEVICE_GATED.get(device, {}).get(key, GATED.get(key))
    for table in ((DEVICE_FUSED if fused else DEVICE_TUNED).get(device, {}), FUSED if fused else TUNED):
        if key in table:
            return table[key]
    return _default_config(key[2], n, k)


_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per device: float32 split-K partials and zeroed int32 tickets (every launch leaves them at zero)."""
    space = _WORKSPACES.get(device)
    if space is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("skinny linear: run one eager call before capturing a CUDA graph (it allocates "
                               "the split-K workspace)")
        space = (torch.empty(_WORKSPACE_FLOATS, dtype=torch.float32, device=device),
                 torch.zeros(_TICKETS, dtype=torch.int32, device=device))
        _WORKSPACES[device] = space
    return space


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, columns] with a contiguous last dimension."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def _fits(config: SkinnyConfig, block_m: int, n: int, split: int) -> bool:
    """Whether the split-K partials and tickets fit the workspace."""
    return split == 1 or (split * n * block_m <= _WORKSPACE_FLOATS and triton.cdiv(n, config.block_n) <= _TICKETS)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, act: int = ACT_PLAIN,
                  residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                  config: SkinnyConfig | None = None, compile_only: bool = False, gated: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """act(x) @ weight.T (+ bias) for x [M ≤ 16, K_in] in one launch; returns (y [M, N], new residual or None).

    act: ACT_PLAIN (x), ACT_RMS_NORM (norm_weight * rmsnorm(x)),
    ACT_ADD_RMS_NORM (the same of x + residual, also returned as the new residual). `gated`: weight is the fused
    [gate; up] projection [2N, K] and y [M, N] = silu(gate) * up of its product (no bias; `config.block_n`
    counts weight rows, so it is even). `config` overrides the measured choice (the benchmark's sweep);
    `compile_only` compiles the kernel without running it (so a sweep can compile its candidates in parallel
    first)."""
    _require_triton()
    x2 = _rows(x)
    m, n, k = x2.shape[0], weight.shape[0], weight.shape[1]
    if weight.stride(-1) != 1:
        raise ValueError("skinny_linear: the weight's rows must be contiguous")
    if x2.shape[1] != k:
        raise ValueError(f"skinny_linear: x has {x2.shape[1]} columns for a weight of {k} (act {act})")
    config = config or skinny_config(m, n, k, device=device_name(weight.device), gated=gated)
    if config is None or m > SKINNY_MAX_M:
        raise ValueError(f"skinny_linear: no config for M={m}, N={n}, K={k}")
    if gated:
        if n % 2 or bias is not None or config.block_n % 2:
            raise ValueError(f"skinny_linear: gated needs an even row count ({n}), no bias and an even block_n "
                             f"({config.block_n})")
        n //= 2
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res2 = _rows(residual) if residual is not None else x2
    new_res = torch.empty_like(x2) if act == ACT_ADD_RMS_NORM else None
    if m == 0:
        return y, new_res
    block_m = 16 if config.dot else m_bucket(m)
    chunks = triton.cdiv(k, config.block_k)
    per_split = triton.cdiv(chunks, min(1 if gated else config.split_k, chunks))
    split = triton.cdiv(chunks, per_split)  # no empty splits
    if not _fits(config, block_m, n, split):
        split, per_split = 1, chunks
    single = split == 1 and config.block_k >= k
    if (config.tiles > 1 or gated) and not single:
        raise ValueError(f"skinny_linear: {'gated' if gated else f'tiles={config.tiles}'} needs one chunk over "
                         f"all K={k} columns, no split")
    ws, tickets = _workspace(x.device) if split > 1 else (y, y)
    block_n = config.block_n // 2 if gated else config.block_n  # gated: block_n counts gate and up rows
    if config.dot and block_n < 16:
        raise ValueError(f"skinny_linear: tensor cores need 16 rows per block ({block_n}{' gated' if gated else ''})")
    grid = (triton.cdiv(triton.cdiv(n, block_n), config.tiles), split)
    kernel = _skinny_kernel[grid] if not compile_only else functools.partial(_skinny_kernel.warmup, grid=grid)
    kernel(
        x2, res2, norm_weight if norm_weight is not None else x2, weight, bias if bias is not None else weight, y,
        new_res if new_res is not None else y, ws, tickets, m, n, k, eps, per_split * config.block_k,
        x2.stride(0), res2.stride(0), weight.stride(0), y.stride(0), new_res.stride(0) if new_res is not None else 0,
        ACT=act, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=config.block_k,
        SPLIT_K=split, SINGLE=single, DOT=config.dot, GATED=gated, TILES=config.tiles, USE_PDL=triton_ops.use_pdl(),
        num_warps=config.warps, num_stages=config.stages, **triton_ops.pdl_launch())
    return y, new_res


def _skinny_ok(x: torch.Tensor, weight: torch.Tensor, fused: bool, gated: bool = False) -> SkinnyConfig | None:
    """The config for this call, or None when it goes to the unfused path (large M, float32, CPU, odd shapes)."""
    if triton is None or not x.is_cuda or weight.dtype not in (torch.bfloat16, torch.float16):
        return None
    k = weight.shape[1]
    if x.dtype != weight.dtype or k % 8 or weight.stride(-1) != 1 or not x.shape[-1]:
        return None
    return skinny_config(x.numel() // x.shape[-1], weight.shape[0], k, fused, device_name(weight.device), gated)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`reference.linear`: the skinny kernel where it was measured faster, cuBLAS otherwise."""
    config = _skinny_ok(x, weight, fused=False)
    if config is None:
        return reference.linear(x, weight, bias)
    y, _ = skinny_linear(x, weight, bias, config=config)
    return y.view(*x.shape[:-1], weight.shape[0])


def rms_norm_gate_up(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                     weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.rms_norm_gate_up` in one launch where that was measured faster (`GATED`); else
    `rms_norm_linear`, then the Triton SiLU-and-mul kernel."""
    config = _skinny_ok(x, weight, fused=True, gated=True)
    if config is None:
        gate_up, residual = rms_norm_linear(x, residual, norm_weight, eps, weight)
        if not (x.is_cuda and HAS_TRITON):
            return reference.silu_and_mul(gate_up), residual
        return triton_ops.silu_and_mul(gate_up), residual
    act = ACT_RMS_NORM if residual is None else ACT_ADD_RMS_NORM
    y, new_res = skinny_linear(x, weight, act=act, residual=residual, norm_weight=norm_weight, eps=eps,
                               config=config, gated=True)
    return y.view(*x.shape[:-1], weight.shape[0] // 2), (x if new_res is None else new_res.view(x.shape))


def rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.rms_norm_linear` in one launch where that was measured faster; else the Triton (add +)
    RMSNorm kernel, then `linear`."""
    config = _skinny_ok(x, weight, fused=True)
    if config is None:
        if not (x.is_cuda and HAS_TRITON):
            return reference.rms_norm_linear(x, residual, norm_weight, eps, weight, bias)
        from r1serve.kernels import triton_ops

        if residual is None:
            return linear(triton_ops.rms_norm(x, norm_weight, eps), weight, bias), x
        normed, residual = triton_ops.fused_add_rms_norm(x, residual, norm_weight, eps)
        return linear(normed, weight, bias), residual
    act = ACT_RMS_NORM if residual is None else ACT_ADD_RMS_NORM
    y, new_res = skinny_linear(x, weight, bias, act=act, residual=residual, norm_weight=norm_weight, eps=eps,
                               config=config)
    out = y.view(*x.shape[:-1], weight.shape[0])
    return out, (x if new_res is None else new_res.view(x.shape))
