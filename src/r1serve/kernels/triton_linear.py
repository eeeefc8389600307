"""Skinny matrix products for decode steps: y = act(x) @ W.T (+ bias) for a few rows of x (M ≤ 16), with the
op in front of a decoder layer's projection optionally fused into the product's prologue.

Why: at batch 1 a decode step is a stream of weight reads (3.09 GB for the 1.5B model, ~1 ms at the H100's copy
bandwidth). cuBLAS tiles suit large M; at M = 1 its kernels for the 1.5B model's projections ran at 28-34% of copy
bandwidth (qkv, o_proj) to 79% (gate_up), down_proj needed a split-K reduce kernel, and the norms and SiLU around
them were launches of their own. Here one program owns `block_n` weight rows (and, with `split_k`, a share of the
reduction). Where one chunk of `block_k` columns holds all of K (the 1536-wide products), the program issues its
whole weight slice and the activation row at once, so it waits for memory once, and it may own `tiles` such row
blocks in turn, with the next block's weights in flight while it multiplies the current one and the activation
computed once (fewer, longer programs); otherwise it streams chunks with the next chunk's weights and activations in
flight while it multiplies the current one. The activation is computed in the prologue from the previous op's
output: plain x, the RMSNorm of x or of x + residual (each program recomputes the row's norm, and program 0 writes
the new residual), or silu(gate) * up of the MLP's [gate, up] projection. It is rounded where its plain-torch twin
rounds (`kernels/reference.py`), so the product sees the twin's bf16 operands; the sum runs in float32 and is
rounded once, bias added first (cuBLAS's epilogue does the same). With split-K each program stores its float32
partial and the last of a column's programs to arrive (a self-resetting atomic ticket) sums them in split order:
deterministic, one launch. Two product forms: FMA (broadcast multiply and row sums) and `tl.dot` (tensor cores, x
padded to 16 rows). Which tiles serve a (N, K, M) shape, and whether fusing the activation pays, is measured per
device by benchmarks/decode_step_gpu.py and read from its files in `kernels/tuning/` (`SKINNY_TABLE`; the H100's
file serves devices with none of their own): cuBLAS keeps what it won, e.g. every shape from 4 rows on. On Hopper
the kernel launches as a programmatic dependent launch (`triton_ops.use_pdl`): it issues its first weight load, then
waits for the previous kernel, so the weight stream starts during that kernel's tail.
The module imports without Triton (`kernels/triton_support.py`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from r1serve.kernels import reference, triton_ops
from r1serve.kernels.triton_support import HAS_TRITON, require_triton, tl, triton
from r1serve.kernels.tuning import TuningTable

__all__ = [
    "HAS_TRITON", "SKINNY_MAX_M", "SKINNY_TABLE", "SkinnyConfig", "linear", "rms_norm_linear", "silu_linear",
    "skinny_config", "skinny_linear", "split_k_shares", "split_k_workspace",
]

SKINNY_MAX_M = 16
# The activation each kernel computes from its input (the op fused in front of the product).
ACT_PLAIN, ACT_RMS_NORM, ACT_ADD_RMS_NORM, ACT_SILU_MUL = 0, 1, 2, 3
WORKSPACE_FLOATS = 1 << 21  # split-K partials: 8 MiB per device
NUM_TICKETS = 1 << 14


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


# The measured configs, keyed (form, N, K, M bucket) with form "plain" (the product alone; null: cuBLAS was faster)
# or "fused" (with the op in front of it: the RMSNorm of qkv and gate_up, the SiLU-and-mul of down_proj; null: that
# op's own kernel, then the plain product, was faster).
SKINNY_TABLE: TuningTable[SkinnyConfig] = TuningTable("skinny", ("form", "n", "k", "m"),
                                                      lambda fields: SkinnyConfig(**fields))


@functools.lru_cache(maxsize=16)
def device_name(device: torch.device) -> str:
    """The name the device tables are keyed by ('' for a CPU tensor)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else ""


if triton is not None:

    @triton.jit
    def _load_raw(x_ptr, res_ptr, nw_ptr, rows, cols, mask, K, stride_xm, stride_rm, ACT: tl.constexpr):
        """What the activation of columns `cols` is computed from, loaded together: (h, its partner).
        h: x, or x + residual rounded to x's dtype (ACT_ADD_RMS_NORM), and the norm weight; or, for ACT_SILU_MUL,
        the gate half of x and its up half (x is [M, 2K])."""
        h = tl.load(x_ptr + rows * stride_xm + cols, mask=mask, other=0.0)
        partner = h
        if ACT == 2:
            r = tl.load(res_ptr + rows * stride_rm + cols, mask=mask, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)  # rounded like torch's bf16 add
        if ACT == 1 or ACT == 2:
            partner = tl.load(nw_ptr + cols, mask=cols < K, other=0.0)
        if ACT == 3:
            partner = tl.load(x_ptr + rows * stride_xm + K + cols, mask=mask, other=0.0)
        return h, partner

    @triton.jit
    def _activation(h, partner, inv_rms, ACT: tl.constexpr):
        """The [BLOCK_M, BLOCK_K] activation chunk the product consumes, rounded where the twin rounds."""
        if ACT == 1 or ACT == 2:  # weight * rmsnorm(h)
            normed = (h.to(tl.float32) * inv_rms[:, None]).to(h.dtype).to(tl.float32)
            a = (partner.to(h.dtype).to(tl.float32) * normed).to(h.dtype)
        elif ACT == 3:  # silu(gate) * up, as triton_ops.silu_and_mul rounds it
            g32 = h.to(tl.float32)
            silu = (g32 / (1.0 + tl.exp(-g32))).to(h.dtype).to(tl.float32)
            a = (silu * partner.to(tl.float32)).to(h.dtype)
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
    def store_out(y_ptr, b_ptr, acc, offs_n, offs_m, n_mask, m_mask, stride_ym, HAS_BIAS: tl.constexpr):
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
    def split_k_sum(ws_ptr, tickets_ptr, acc, pid_n, pid_k, N, offs_n, offs_m, n_mask,
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
    def _tile_rows(tile, N, BLOCK_N: tl.constexpr):
        """The weight rows of row block `tile` and their mask."""
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
                       SINGLE: tl.constexpr, DOT: tl.constexpr, TILES: tl.constexpr, USE_PDL: tl.constexpr):
        """Program (n block, k split): rows [BLOCK_N] of W over columns [k_lo, k_lo + split_span) of the
        reduction, for all M rows of x. SINGLE: one chunk holds all K columns (one load of everything), and the
        program may own TILES row blocks in turn."""
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
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()  # the activations do: wait for the kernel that wrote them
        rows = offs_m[:, None]
        if SINGLE:
            h, partner = _load_raw(x_ptr, res_ptr, nw_ptr, rows, cols, m_mask[:, None] & (cols < K), K,
                                   stride_xm, stride_rm, ACT)
            inv_rms = tl.zeros([BLOCK_M], tl.float32)
            if ACT == 1 or ACT == 2:  # the norm's statistics from the same registers (masked columns are 0)
                h32 = h.to(tl.float32)
                inv_rms = tl.rsqrt(tl.sum(h32 * h32, axis=1) / K + eps)
            a = _activation(h, partner, inv_rms, ACT)
            for t in range(TILES):  # TILES row blocks, the next one's weights in flight during each product
                tile = pid_n * TILES + t
                w = w_next
                if TILES > 1:
                    rows_next, mask_next = _tile_rows(tile + 1, N, BLOCK_N)
                    mask_next = mask_next & (t + 1 < TILES)
                    w_next = _load_rows(w_ptr, rows_next, mask_next, cols, col_mask, stride_wn)
                offs_n, n_mask = _tile_rows(tile, N, BLOCK_N)
                acc = _multiply_add(tl.zeros([BLOCK_N, BLOCK_M], tl.float32), w, a, DOT)
                store_out(y_ptr, b_ptr, acc, offs_n, offs_m, n_mask, m_mask, stride_ym, HAS_BIAS)
        else:
            inv_rms = tl.zeros([BLOCK_M], tl.float32)
            if ACT == 1 or ACT == 2:
                inv_rms = _inv_rms(x_ptr, res_ptr, nw_ptr, offs_m, m_mask, K, eps, stride_xm, stride_rm, ACT,
                                   BLOCK_K)
            h_next, partner_next = _load_raw(x_ptr, res_ptr, nw_ptr, rows, cols, m_mask[:, None] & (cols < K),
                                             K, stride_xm, stride_rm, ACT)
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for k0 in range(k_lo, tl.minimum(k_end, K), BLOCK_K):
                w, h, partner = w_next, h_next, partner_next
                ks_next = k0 + BLOCK_K + tl.arange(0, BLOCK_K)  # the next chunk's loads are in flight meanwhile
                in_split = ((ks_next < K) & (ks_next < k_end))[None, :]
                w_next = _load_rows(w_ptr, offs_n, n_mask, ks_next[None, :], in_split, stride_wn)
                h_next, partner_next = _load_raw(x_ptr, res_ptr, nw_ptr, rows, ks_next[None, :],
                                                 m_mask[:, None] & in_split, K, stride_xm, stride_rm, ACT)
                acc = _multiply_add(acc, w, _activation(h, partner, inv_rms, ACT), DOT)
            if SPLIT_K == 1:
                store_out(y_ptr, b_ptr, acc, offs_n, offs_m, n_mask, m_mask, stride_ym, HAS_BIAS)
            else:
                last, total = split_k_sum(ws_ptr, tickets_ptr, acc, pid_n, pid_k, N, offs_n, offs_m, n_mask,
                                          BLOCK_M, BLOCK_N, SPLIT_K)
                if last:
                    store_out(y_ptr, b_ptr, total, offs_n, offs_m, n_mask, m_mask, stride_ym, HAS_BIAS)
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


def skinny_config(m: int, n: int, k: int, fused: bool = False, device: str = "") -> SkinnyConfig | None:
    """The config for an (M, N, K) product (`fused`: with its activation fused in) on the device named `device`,
    or None: cuBLAS for the plain product, the activation's own kernel first for the fused one. Measured
    (`SKINNY_TABLE`), else `_default_config`'s rule."""
    if m > SKINNY_MAX_M or m < 1:
        return None
    bucket = m_bucket(m)
    measured, config = SKINNY_TABLE.lookup(device, ("fused" if fused else "plain", n, k, bucket))
    return config if measured else _default_config(bucket, n, k)


_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def split_k_workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per device: float32 split-K partials and zeroed int32 tickets (every launch leaves them at zero), for
    `split_k_sum`."""
    space = _WORKSPACES.get(device)
    if space is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("skinny linear / decode attention: run one eager call before capturing a CUDA "
                               "graph (it allocates the split-K workspace and its tickets)")
        space = (torch.empty(WORKSPACE_FLOATS, dtype=torch.float32, device=device),
                 torch.zeros(NUM_TICKETS, dtype=torch.int32, device=device))
        _WORKSPACES[device] = space
    return space


def split_k_shares(config: SkinnyConfig, n: int, k: int, block_m: int) -> tuple[int, int]:
    """(programs along K, columns per program): `split_k` shares of whole chunks, none empty; one share when the
    partials or tickets would not fit the split-K workspace."""
    chunks = triton.cdiv(k, config.block_k)
    per_split = triton.cdiv(chunks, max(1, min(config.split_k, chunks)))
    split = triton.cdiv(chunks, per_split)
    if split > 1 and (split * n * block_m > WORKSPACE_FLOATS or triton.cdiv(n, config.block_n) > NUM_TICKETS):
        split, per_split = 1, chunks
    return split, per_split * config.block_k


def _check_skinny(x2: torch.Tensor, weight: torch.Tensor, config: SkinnyConfig | None, act: int) -> SkinnyConfig:
    """The config a skinny call runs, after the checks of its operands and tiles."""
    m, (n, k) = x2.shape[0], weight.shape
    if weight.stride(-1) != 1:
        raise ValueError("skinny_linear: the weight's rows must be contiguous")
    in_cols = 2 * k if act == ACT_SILU_MUL else k  # [gate, up] halves for the SiLU
    if x2.shape[1] != in_cols:
        raise ValueError(f"skinny_linear: x has {x2.shape[1]} columns where a weight of {k} needs {in_cols}")
    config = config or skinny_config(m, n, k, device=device_name(weight.device))
    if config is None or m > SKINNY_MAX_M:
        raise ValueError(f"skinny_linear: no config for M={m}, N={n}, K={k}")
    if config.dot and config.block_n < 16:
        raise ValueError(f"skinny_linear: tensor cores need 16 rows per block ({config.block_n})")
    return config


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, act: int = ACT_PLAIN,
                  residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                  config: SkinnyConfig | None = None, compile_only: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """act(x) @ weight.T (+ bias) for x [M ≤ 16, K_in] in one launch; returns (y [M, N], new residual or None).

    act: ACT_PLAIN (x), ACT_RMS_NORM (norm_weight * rmsnorm(x)),
    ACT_ADD_RMS_NORM (the same of x + residual, also returned as the new residual), ACT_SILU_MUL (silu(gate) *
    up of x = [gate, up], [M, 2 K_in]: the MLP's SiLU-and-mul in front of down_proj). `config` overrides the
    measured choice (the benchmark's sweep); `compile_only` compiles the kernel without running it (so a sweep
    can compile its candidates in parallel first)."""
    require_triton("r1serve.kernels.reference")
    x2 = triton_ops.as_rows(x)
    config = _check_skinny(x2, weight, config, act)
    m, n, k = x2.shape[0], weight.shape[0], weight.shape[1]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res2 = triton_ops.as_rows(residual) if residual is not None else x2
    new_res = torch.empty_like(x2) if act == ACT_ADD_RMS_NORM else None
    if act == ACT_SILU_MUL and x2.stride(1) != 1:
        raise ValueError("skinny_linear: the SiLU's [gate, up] rows must be contiguous")
    if m == 0:
        return y, new_res
    block_m = 16 if config.dot else m_bucket(m)
    split, span = split_k_shares(config, n, k, block_m)
    single = split == 1 and config.block_k >= k
    if config.tiles > 1 and not single:
        raise ValueError(f"skinny_linear: tiles={config.tiles} needs one chunk over all K={k} columns, no split")
    ws, tickets = split_k_workspace(x.device) if split > 1 else (y, y)
    grid = (triton.cdiv(triton.cdiv(n, config.block_n), config.tiles), split)
    kernel = _skinny_kernel[grid] if not compile_only else functools.partial(_skinny_kernel.warmup, grid=grid)
    kernel(
        x2, res2, norm_weight if norm_weight is not None else x2, weight, bias if bias is not None else weight, y,
        new_res if new_res is not None else y, ws, tickets, m, n, k, eps, span,
        x2.stride(0), res2.stride(0), weight.stride(0), y.stride(0), new_res.stride(0) if new_res is not None else 0,
        ACT=act, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT_K=split, SINGLE=single, DOT=config.dot, TILES=config.tiles, USE_PDL=triton_ops.use_pdl(),
        num_warps=config.warps, num_stages=config.stages, **triton_ops.pdl_launch())
    return y, new_res


def _operands_fit(x: torch.Tensor, weight: torch.Tensor, in_cols: int) -> bool:
    """Whether the skinny kernel can run on these operands at all (CUDA, bf16/fp16, aligned K, x of `in_cols`
    columns); the float32, CPU and odd-shape calls go to the unfused path."""
    if triton is None or not x.is_cuda or weight.dtype not in (torch.bfloat16, torch.float16):
        return False
    k = weight.shape[1]
    return (x.dtype == weight.dtype and k > 0 and k % 8 == 0 and weight.stride(-1) == 1
            and x.shape[-1] == in_cols)


def _skinny_ok(x: torch.Tensor, weight: torch.Tensor, fused: bool) -> SkinnyConfig | None:
    """The config for this call, or None when it goes to the unfused path (large M, float32, CPU, odd shapes)."""
    if not _operands_fit(x, weight, weight.shape[1]):
        return None
    return skinny_config(x.numel() // x.shape[-1], weight.shape[0], weight.shape[1], fused, device_name(weight.device))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`reference.linear`: the skinny kernel where it was measured faster, cuBLAS otherwise."""
    config = _skinny_ok(x, weight, fused=False)
    if config is None:
        return reference.linear(x, weight, bias)
    y, _ = skinny_linear(x, weight, bias, config=config)
    return y.view(*x.shape[:-1], weight.shape[0])


def silu_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`reference.silu_linear`: one launch that computes silu(gate) * up in the product's prologue where the
    tuning file has a measured "fused" config for the down projection's shape (the rule does not guess one: the
    prologue's exponentials cost in proportion to the programs that share a column chunk); else the Triton
    SiLU-and-mul kernel, then `linear`."""
    config = _silu_config(gate_up, weight)
    if config is None:
        act = triton_ops.silu_and_mul(gate_up) if gate_up.is_cuda and HAS_TRITON else reference.silu_and_mul(gate_up)
        return linear(act, weight)
    y, _ = skinny_linear(gate_up, weight, act=ACT_SILU_MUL, config=config)
    return y.view(*gate_up.shape[:-1], weight.shape[0])


def silu_entry(device: str, n: int, k: int, m_rows: int) -> tuple[bool, SkinnyConfig | None]:
    """(measured, config) of the SiLU-fused down projection [n, k] at m_rows rows: this device's own entry only.
    The fused form wins or loses by a few µs per step, device by device, so it never comes from the fallback
    file."""
    return SKINNY_TABLE.lookup(device, ("fused", n, k, m_bucket(m_rows)), own=True)


def _silu_config(gate_up: torch.Tensor, weight: torch.Tensor) -> SkinnyConfig | None:
    """The SiLU-fused config of this down projection measured on this device (`silu_entry`), or None (unfused)."""
    rows, (n, k) = gate_up.numel() // max(1, gate_up.shape[-1]), weight.shape
    if not (1 <= rows <= SKINNY_MAX_M and _operands_fit(gate_up, weight, 2 * k) and gate_up.stride(-1) == 1):
        return None
    measured, config = silu_entry(device_name(weight.device), n, k, rows)
    return config if measured else None


def rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.rms_norm_linear` in one launch where that was measured faster; else the Triton (add +)
    RMSNorm kernel, then `linear`."""
    config = _skinny_ok(x, weight, fused=True)
    if config is None:
        if not (x.is_cuda and HAS_TRITON):
            return reference.rms_norm_linear(x, residual, norm_weight, eps, weight, bias)
        if residual is None:
            return linear(triton_ops.rms_norm(x, norm_weight, eps), weight, bias), x
        normed, residual = triton_ops.fused_add_rms_norm(x, residual, norm_weight, eps)
        return linear(normed, weight, bias), residual
    act = ACT_RMS_NORM if residual is None else ACT_ADD_RMS_NORM
    y, new_res = skinny_linear(x, weight, bias, act=act, residual=residual, norm_weight=norm_weight, eps=eps,
                               config=config)
    out = y.view(*x.shape[:-1], weight.shape[0])
    return out, (x if new_res is None else new_res.view(x.shape))
