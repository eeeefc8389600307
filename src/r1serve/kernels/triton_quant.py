"""Quantized linear layers on the GPU: products that read r1serve's packed int4, int8 and fp8 weights where they
lie in device memory and dequantize them in registers. The layouts, and the twins these functions must match
(same signatures, same results within rounding), are in `kernels/quant_reference.py`.

Why: a decode step at batch 1 is a stream of weight reads, so its time is the weight bytes over the memory
bandwidth. 4-bit weights (with bf16 group scales) carry about a quarter of bf16's bytes and 8-bit ones half, but
only if no decode kernel writes or rereads a dequantized copy: every packed byte must be read once per step and
turned into products in registers. Each public function dispatches on the number of rows T of x:

- **skinny** (T ≤ 16, decode): one program owns `block_n` weight rows and, with `split_k`, a share of the
  reduction; it streams `block_k`-column chunks of packed weights with the next chunk's loads in flight while it
  multiplies the current one, for all T rows at once, so each weight byte is read once. Products by FMA (up to
  2 rows: broadcast multiply and row sums) or by `tl.dot` (x padded to 16 rows). Split-K partials are summed by
  the column's last program to arrive (the self-resetting ticket of `triton_linear`): deterministic, one launch.
- **dense** (T > 16, weight-only: prefill chunks, larger decode batches): the weight dequantized into a scratch
  by one kernel, then cuBLAS; at that many rows the product's arithmetic hides the extra pass over the weight.
- **tiled** (T > 16, W8A8): a `tl.dot` GEMM over [block_m tokens, block_n weight rows] tiles on the quantized
  activations (int8 tensor cores), the weight tile converted in registers as the dot's first operand.

int4 words are loaded whole (8 columns in 32 bits); nibble j is shifted out and OR'd into the mantissa of
2**23, which makes the float 2**23 + q exactly, so one subtraction of 2**23 + z gives q - z without an
integer-to-float conversion; a word lies in one group (groups are multiples of 8 columns), so its scale and
zero are loaded once per word. int8 words are read the same way, four bytes per word, each byte's sign bit
flipped so that it lies in the mantissa as 2**23 + b + 128; fp8 words too, each e4m3 byte's bits placed where
an f16 keeps them (the float w · 2**-8, exactly). With `act_quant` (W8A8 INT8, FP8 dynamic) x is
first quantized per token by a one-pass kernel wherever the product runs on tensor cores: INT8 products on
int8 tensor cores with int32 sums; the FMA products of one or two rows (batch-1 and batch-2 decode) read x
unquantized, as their float32 sums gain nothing from a rounded x; FP8 prefill on Hopper goes to
`torch._scaled_mm` with per-token × per-channel scales, elsewhere to the Triton GEMM. On Hopper every kernel
is a programmatic dependent launch (`triton_ops.use_pdl`): it issues its first weight loads, then waits for the
kernel that wrote x. Configs are chosen per (layout, N, K, T bucket) from `QUANT_TABLE` (measured; per device)
and otherwise by `skinny_config` / `gemm_config`'s rules. The module imports without Triton
(`kernels/triton_support.py`), and the public functions then run the twins.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch

from r1serve.kernels import quant_reference, triton_ops
from r1serve.kernels.triton_linear import (
    SKINNY_MAX_M,
    SkinnyConfig,
    device_name,
    m_bucket,
    split_k_shares,
    split_k_workspace,
)
from r1serve.kernels.triton_support import HAS_TRITON, INTERPRET, require_triton, tl, triton
from r1serve.kernels.tuning import TuningTable

__all__ = [
    "HAS_TRITON", "QUANT_TABLE", "GemmConfig", "int4_linear", "int4_skinny", "int4_to_dense",
    "per_channel_gemm", "per_channel_linear", "per_channel_skinny", "per_channel_to_dense", "quantize_per_token",
    "skinny_config", "gemm_config",
]

INT4, INT8, FP8 = "int4", "int8", "fp8"  # the three layouts, as the tables key them
FMA_MAX_M = 2  # the FMA product form up to this many rows (bucket), tensor cores above
_NUM_SMS = 132  # H100 / H200 SXM; the rules scale split-K to this
_MAGIC = 0x4B000000  # the bits of 2**23, an int4 kernel argument (see `_plane`)
DENSE_BLOCK_N, DENSE_BLOCK_K = 32, 256  # the dequantizing kernels' tiles


@dataclass(frozen=True)
class GemmConfig:
    """Tiles of the tiled (prefill) product: [block_m tokens, block_n weight rows] per program, `block_k`
    columns per step, `group_m` row tiles swept together (L2 reuse of the weight tile)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    warps: int = 4
    stages: int = 3



def _parse_config(fields: dict[str, Any]) -> SkinnyConfig | GemmConfig:
    """A tuning entry's config: a GemmConfig if it names block_m, else a SkinnyConfig."""
    return GemmConfig(**fields) if "block_m" in fields else SkinnyConfig(**fields)


# Measured configs (`kernels/tuning/quant-*.json`, written by `benchmarks/quant_gpu.py --sweep`), keyed (layout,
# N, K, M bucket) with M bucket the power of two ≥ T for T ≤ 16 (a SkinnyConfig) or 0 for the tiled form (a
# GemmConfig). A key not listed takes the rule of `skinny_config` / `gemm_config`.
QUANT_TABLE: TuningTable[SkinnyConfig | GemmConfig] = TuningTable("quant", ("layout", "n", "k", "m"), _parse_config)


def config_fields(config: SkinnyConfig | GemmConfig) -> dict[str, Any]:
    """A config as a tuning entry's fields (the inverse of how QUANT_TABLE reads them)."""
    return dataclasses.asdict(config)


def _layout(qweight: torch.Tensor) -> str:
    return INT4 if qweight.dtype == torch.int32 else INT8 if qweight.dtype == torch.int8 else FP8


def _lookup(key: tuple[str, int, int, int], device: str) -> SkinnyConfig | GemmConfig | None:
    return QUANT_TABLE.lookup(device, key)[1]


def skinny_config(layout: str, m: int, n: int, k: int, device: str = "") -> SkinnyConfig:
    """The skinny product's tiles for T = m ≤ 16 rows: measured (`QUANT_TABLE`), else the rule. The rule: FMA up to
    FMA_MAX_M rows (every layout is read as words there): a short product whose K fits 2048 columns (qkv, o_proj)
    in 8 weight rows by all of K, one program per block and no split, as the H200's sweep chose for every layout;
    otherwise 512-column chunks of 32 weight rows for wide products, 16 rows on 2 warps else, so that each thread
    holds several rows of the same words; 16-row tensor-core tiles above; split-K until about 8 programs per SM."""
    bucket = m_bucket(m)
    tuned = _lookup((layout, n, k, bucket), device)
    if isinstance(tuned, SkinnyConfig):
        return tuned
    warps = 4
    if bucket <= FMA_MAX_M and n < 8192 and k <= 2048:  # one chunk of K: no split, no partial sums
        block_n, block_k, dot = 8, 2048, False
    elif bucket <= FMA_MAX_M:  # several weight rows per thread share each x plane
        block_n, block_k, dot = (32, 512, False) if n >= 8192 else (16, 512, False)
        warps = 4 if n >= 8192 else 2
    else:
        block_n, block_k, dot = 16, 512, True
    block_k = min(block_k, max(64, triton.next_power_of_2(k)) if triton is not None else block_k)
    chunks = -(-k // block_k)
    split = 1
    while -(-n // block_n) * split < 8 * _NUM_SMS and split * 2 <= chunks:
        split *= 2
    return SkinnyConfig(block_n=block_n, block_k=block_k, split_k=split, dot=dot, warps=warps)


def gemm_config(layout: str, m: int, n: int, k: int, device: str = "") -> GemmConfig:
    """The tiled product's tiles for T = m > 16 rows: measured (`QUANT_TABLE`, key M bucket 0), else up to 64 tokens
    by 128 weight rows by 128 columns, above 128 by 128 by 64, 3 stages."""
    tuned = _lookup((layout, n, k, 0), device)
    if isinstance(tuned, GemmConfig):
        return tuned
    if m <= 64:
        return GemmConfig(block_m=max(16, triton.next_power_of_2(m)), block_n=128, block_k=128, warps=4)
    return GemmConfig(block_m=128, block_n=128, block_k=64, warps=8)


if triton is not None:
    from r1serve.kernels.triton_linear import split_k_sum, store_out
    from r1serve.kernels.triton_ops import pdl_start

    NIBBLES, INT8_BYTES, FP8_BYTES = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # a word's weights

    @triton.jit
    def _int4_groups(q_ptr, s_ptr, z_ptr, offs_n, n_mask, kw, kw_mask, stride_qn, stride_sn, stride_zn,
                     GROUP_WORDS: tl.constexpr, HAS_ZEROS: tl.constexpr):
        """The packed words of rows offs_n [BLOCK_N] at word columns kw [BLOCK_KW], loaded whole, and each word's
        group: (words int32, scale float32, zero point float32), each [BLOCK_N, BLOCK_KW]; a uint8 zero becomes a
        float through the mantissa of 2**23 (no conversion)."""
        rows = offs_n.to(tl.int64)[:, None]
        mask = n_mask[:, None] & kw_mask[None, :]
        words = tl.load(q_ptr + rows * stride_qn + kw[None, :], mask=mask, other=0)
        group = (kw // GROUP_WORDS)[None, :]
        scale = tl.load(s_ptr + rows * stride_sn + group, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + rows * stride_zn + group, mask=mask, other=0).to(tl.int32)
            zero = (zero | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        else:
            zero = tl.zeros_like(scale) + 8.0  # symmetric: the zero point is 8
        return words, scale, zero

    @triton.jit
    def _nibble(words, j: tl.constexpr, zero_magic):
        """q - z of nibble j of every word [BLOCK_N, BLOCK_KW]: the nibble OR'd into the mantissa of 2**23 is the
        float 2**23 + q, and 2**23 + z is subtracted (exact; no integer-to-float conversion)."""
        return (((words >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zero_magic

    @triton.jit
    def _int4_dequantize(words, scale, zero_magic, BLOCK_K: tl.constexpr):
        """(q - z) * s of every nibble: float32 [BLOCK_N, BLOCK_K], column 8w + j from nibble j of word w. The
        eight nibbles are joined in registers (each thread keeps its whole words), bit by bit of j from the top."""
        even = tl.join(tl.join(_nibble(words, 0, zero_magic), _nibble(words, 4, zero_magic)),
                       tl.join(_nibble(words, 2, zero_magic), _nibble(words, 6, zero_magic)))
        odd = tl.join(tl.join(_nibble(words, 1, zero_magic), _nibble(words, 5, zero_magic)),
                      tl.join(_nibble(words, 3, zero_magic), _nibble(words, 7, zero_magic)))
        values = tl.join(even, odd) * scale[:, :, None, None, None]  # [BLOCK_N, BLOCK_KW, 2, 2, 2]: j's bits
        return tl.reshape(values, [words.shape[0], BLOCK_K])

    @triton.jit
    def _load_x(x_ptr, offs_m, m_mask, ks, k_mask, stride_xm):
        """Activation chunk [BLOCK_M, BLOCK_K] of columns ks (masked columns 0)."""
        return tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :], mask=m_mask[:, None] & k_mask[None, :],
                       other=0.0)

    @triton.jit
    def _multiply_add(acc, w, a, DOT: tl.constexpr, INT_DOT: tl.constexpr):
        """acc [BLOCK_N, BLOCK_M] += w [BLOCK_N, BLOCK_K] @ a.T. DOT: tensor cores on a's dtype (INT_DOT: int8 ×
        int8, int32 sums); else FMA in float32."""
        if DOT:
            if INT_DOT:
                acc = tl.dot(w, tl.trans(a), acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(w.to(a.dtype), tl.trans(a), acc)
        else:
            prod = w.to(tl.float32)[:, None, :] * a.to(tl.float32)[None, :, :]  # [BLOCK_N, BLOCK_M, BLOCK_K]
            acc += tl.sum(prod, axis=2)
        return acc

    @triton.jit
    def _finish(acc, y_ptr, b_ptr, ws_ptr, tickets_ptr, cs_ptr, xs_ptr, pid_n, pid_k, N, offs_n, offs_m, n_mask,
                m_mask, stride_ym, HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, ACT_QUANT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
        """The skinny epilogue: the split-K sum (last program of the column), the per-channel (SCALED) and
        per-token (ACT_QUANT) scales, bias, one rounding to y's dtype."""
        acc = acc.to(tl.float32)
        last = True
        if SPLIT_K > 1:
            last, acc = split_k_sum(ws_ptr, tickets_ptr, acc, pid_n, pid_k, N, offs_n, offs_m, n_mask,
                                     BLOCK_M, BLOCK_N, SPLIT_K)
        if last:
            _scale_store(y_ptr, b_ptr, cs_ptr, xs_ptr, acc, offs_n, offs_m, n_mask, m_mask, stride_ym, HAS_BIAS,
                         SCALED, ACT_QUANT)

    @triton.jit
    def _scale_store(y_ptr, b_ptr, cs_ptr, xs_ptr, acc, offs_n, offs_m, n_mask, m_mask, stride_ym,
                     HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, ACT_QUANT: tl.constexpr):
        """y[m, n] = acc[n, m] (float32) × the per-channel (SCALED) and per-token (ACT_QUANT) scales (+ bias),
        rounded once: both epilogues' last step."""
        if SCALED:
            acc *= tl.load(cs_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
        if ACT_QUANT:
            acc *= tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)[None, :]
        store_out(y_ptr, b_ptr, acc, offs_n, offs_m, n_mask, m_mask, stride_ym, HAS_BIAS)

    @triton.jit
    def _plane(words, words_hi, magic, j: tl.constexpr):
        """Nibble j of every word [BLOCK_N, BLOCK_KW] as the float q_j · 2**shift(j), exactly: masked where it lies
        (the top three from words >> 12; shift(j) = 4j or 4j - 12, at most 16), OR'd into the mantissa of
        magic = 2**23, minus 2**23. magic comes at run time: as a literal beside the mask ptxas would spend a
        second LOP3 on it."""
        if j < 5:
            bits = (words & (15 << (4 * j))) | magic
        else:
            bits = (words_hi & (15 << (4 * j - 12))) | magic
        return bits.to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _byte_plane(words, words_hi, magic, j: tl.constexpr):
        """Byte j of every word [BLOCK_N, BLOCK_KW] (sign bits flipped: u = b + 128) as the float u · 2**shift(j),
        exactly, as `_plane` does for nibbles: masked where it lies (bytes 2 and 3 from words >> 16; shift(j) =
        0 or 8, so that the byte stays inside the 23-bit mantissa), OR'd into the mantissa of magic = 2**23,
        minus 2**23. No integer-to-float conversion."""
        source = words if j < 2 else words_hi
        bits = (source & (255 << (8 * (j % 2)))) | magic
        return bits.to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _fp8_plane(words, j: tl.constexpr):
        """e4m3 byte j of every word [BLOCK_N, BLOCK_KW] as the float w · 2**-8, exactly, with no conversion
        instruction: the byte's sign and its seven exponent and mantissa bits placed where an f16 keeps them (one
        int32 holds the f16 pair of bytes 0 and 2, another of bytes 1 and 3), then widened to float32. An f16's
        exponent bias (15 against e4m3's 7) makes the 2**-8; e4m3's subnormals land on f16 subnormals."""
        if j % 2 == 0:  # -2147450880 = 0x80008000, the two halves' sign bits
            pairs = ((words & 0x007F007F) << 7) | ((words << 8) & -2147450880)
        else:
            pairs = ((words >> 1) & 0x3F803F80) | (words & -2147450880)
        half = (pairs >> 16) if j >= 2 else pairs
        return half.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _x_plane(x_ptr, row, kw, kw_mask, j: tl.constexpr, KIND: tl.constexpr):
        """Column plane j of x's row for words of KIND's weights: (x[row, w kw + j], the same times 2**-shift(j)),
        float32 [BLOCK_KW], by strided loads (x is a few KiB and stays cached; w = 8 nibbles or 4 bytes a word).
        shift(j) is where the weight plane leaves weight j: 4j or 4j - 12 for nibbles (`_plane`), 0 or 8 for int8
        bytes (`_byte_plane`), 0 for fp8 (`_fp8_plane`)."""
        SHIFT: tl.constexpr = (4 * j - 12 * (j // 5)) if KIND == NIBBLES else 8 * (j % 2) if KIND == INT8_BYTES else 0
        x = tl.load(x_ptr + row + kw * (8 if KIND == NIBBLES else 4) + j, mask=kw_mask, other=0.0).to(tl.float32)
        return x, x * (1.0 / (1 << SHIFT))

    @triton.jit
    def _plane_sums(acc0, acc1, words, words_hi, magic, x_ptr, M, kw, kw_mask, stride_xm, BLOCK_M: tl.constexpr,
                    KIND: tl.constexpr):
        """Per word, for x's rows m < BLOCK_M ≤ 2: (Σ_j p_j x_j [BLOCK_N, BLOCK_KW] for row 0 and row 1, Σ_j x_j
        [BLOCK_KW] for row 0 and row 1), the words' weight planes p_j (nibbles, int8 or fp8 bytes: KIND)
        multiplying x's column planes in the words' own layout; acc0 / acc1 give the shapes."""
        partial0 = tl.zeros_like(acc0)
        partial1 = tl.zeros_like(acc1)
        xsum0 = tl.zeros_like(kw).to(tl.float32)
        xsum1 = tl.zeros_like(xsum0)
        for j in tl.static_range(8 if KIND == NIBBLES else 4):
            if KIND == NIBBLES:
                plane = _plane(words, words_hi, magic, j)
            elif KIND == INT8_BYTES:
                plane = _byte_plane(words, words_hi, magic, j)
            else:
                plane = _fp8_plane(words, j)
            x, x_scaled = _x_plane(x_ptr, 0, kw, kw_mask, j, KIND)
            xsum0 += x
            partial0 += plane * x_scaled[None, :]
            if BLOCK_M > 1:
                x, x_scaled = _x_plane(x_ptr, stride_xm, kw, kw_mask & (M > 1), j, KIND)
                xsum1 += x
                partial1 += plane * x_scaled[None, :]
        return partial0, partial1, xsum0, xsum1

    @triton.jit
    def _int4_fma(acc0, acc1, words, scale, zero, magic, x_ptr, M, kw, kw_mask, stride_xm, BLOCK_M: tl.constexpr):
        """acc_m [BLOCK_N, BLOCK_KW] += s · (Σ_j q_j x_j − z · Σ_j x_j) for every word and x's rows m < BLOCK_M ≤ 2:
        the eight nibble planes multiply x's eight column planes in the words' own layout, and a word's group
        scale and zero are folded once, after its eight products. Words are summed across after the last chunk."""
        partial0, partial1, xsum0, xsum1 = _plane_sums(acc0, acc1, words, words >> 12, magic, x_ptr, M, kw, kw_mask,
                                                       stride_xm, BLOCK_M, NIBBLES)
        acc0 += scale * (partial0 - zero * xsum0[None, :])
        if BLOCK_M > 1:
            acc1 += scale * (partial1 - zero * xsum1[None, :])
        return acc0, acc1

    @triton.jit(do_not_specialize=["M"])
    def _int4_skinny_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, tickets_ptr, M, N, K, KW, split_words,
                            stride_xm, stride_qn, stride_sn, stride_zn, stride_ym, magic,
                            HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_WORDS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            SPLIT_K: tl.constexpr, DOT: tl.constexpr, USE_PDL: tl.constexpr):
        """Program (n block, k split): int4 rows [BLOCK_N] over words [kw_lo, kw_lo + split_words) of the KW = K / 8
        packed columns, for all M rows. Masks compare against KW and the split's end separately (never their
        minimum), so that the compiler can prove them constant over whole vectors and load 16 bytes at a time."""
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        BLOCK_KW: tl.constexpr = BLOCK_K // 8
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        kw_lo = pid_k * split_words
        kw_end = kw_lo + split_words
        kw = kw_lo + tl.arange(0, BLOCK_KW)
        nxt = _int4_groups(q_ptr, s_ptr, z_ptr, offs_n, n_mask, kw, (kw < KW) & (kw < kw_end), stride_qn,
                           stride_sn, stride_zn, GROUP_WORDS, HAS_ZEROS)  # depends on no earlier kernel
        pdl_start(USE_PDL)
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        acc0 = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)  # FMA: a partial sum per word column, x's rows 0 and 1
        acc1 = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)
        for w0 in range(kw_lo, tl.minimum(kw_end, KW), BLOCK_KW):
            words, scale, zero = nxt
            kw = w0 + tl.arange(0, BLOCK_KW)
            kw_mask = (kw < KW) & (kw < kw_end)
            kw_next = kw + BLOCK_KW  # the next chunk's loads fly meanwhile
            nxt = _int4_groups(q_ptr, s_ptr, z_ptr, offs_n, n_mask, kw_next, (kw_next < KW) & (kw_next < kw_end),
                               stride_qn, stride_sn, stride_zn, GROUP_WORDS, HAS_ZEROS)
            if not DOT:
                acc0, acc1 = _int4_fma(acc0, acc1, words, scale, zero, magic, x_ptr, M, kw, kw_mask, stride_xm,
                                       BLOCK_M)
            else:  # tensor cores: the interleaved tile (one dot per nibble plane compiled to more instructions)
                ks = w0 * 8 + tl.arange(0, BLOCK_K)
                a = _load_x(x_ptr, offs_m, m_mask, ks, (ks < K) & (ks < kw_end * 8), stride_xm)
                acc = _multiply_add(acc, _int4_dequantize(words, scale, zero + 8388608.0, BLOCK_K), a, True, False)
        if not DOT:
            if BLOCK_M > 1:
                acc = tl.join(tl.sum(acc0, axis=1), tl.sum(acc1, axis=1))  # [BLOCK_N, 2]
            else:
                acc = tl.sum(acc0, axis=1)[:, None]
        _finish(acc, y_ptr, b_ptr, ws_ptr, tickets_ptr, y_ptr, y_ptr, pid_n, pid_k, N, offs_n, offs_m, n_mask,
                m_mask, stride_ym, HAS_BIAS, False, False, BLOCK_M, BLOCK_N, SPLIT_K)

    @triton.jit
    def _load_rows(q_ptr, offs_n, n_mask, ks, k_mask, stride_qn):
        """int8 / fp8 weight rows offs_n over columns ks: [BLOCK_N, BLOCK_K] as stored."""
        return tl.load(q_ptr + offs_n.to(tl.int64)[:, None] * stride_qn + ks[None, :],
                       mask=n_mask[:, None] & k_mask[None, :], other=0.0)

    @triton.jit
    def _bytes_fma(acc0, acc1, words, magic, x_ptr, M, kw, kw_mask, stride_xm, BLOCK_M: tl.constexpr,
                   FP8: tl.constexpr):
        """acc_m [BLOCK_N, BLOCK_KW] += Σ_j b_j x_j over the four weights b_j of each word, for x's rows
        m < BLOCK_M ≤ 2, the byte planes multiplying x's four column planes in the words' own layout, as
        `_int4_fma` does with nibbles. int8: Σ_j u_j x_j − 128 · Σ_j x_j with u = b + 128 (the sign bits
        flipped); fp8: Σ_j (b_j · 2**-8) x_j (`_fp8_plane`; the caller scales by 2**8)."""
        if FP8:
            partial0, partial1, _, _ = _plane_sums(acc0, acc1, words, words, magic, x_ptr, M, kw, kw_mask, stride_xm,
                                                   BLOCK_M, FP8_BYTES)
            return acc0 + partial0, acc1 + partial1
        words = words ^ -2139062144  # 0x80808080: each byte's sign bit
        partial0, partial1, xsum0, xsum1 = _plane_sums(acc0, acc1, words, words >> 16, magic, x_ptr, M, kw, kw_mask,
                                                       stride_xm, BLOCK_M, INT8_BYTES)
        acc0 += partial0 - 128.0 * xsum0[None, :]
        if BLOCK_M > 1:
            acc1 += partial1 - 128.0 * xsum1[None, :]
        return acc0, acc1

    @triton.jit
    def _words_product(x_ptr, q_ptr, offs_n, n_mask, M, K, k_lo, k_end, stride_xm, stride_qn, magic,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
                       FP8: tl.constexpr):
        """The FMA product of the int8 or fp8 layout read as int32 words (q_ptr, stride_qn in words):
        [BLOCK_N, BLOCK_M] float32 sums over columns [k_lo, k_end) of K, before any scale."""
        BLOCK_KW: tl.constexpr = BLOCK_K // 4
        KW = K // 4
        kw_end = k_end // 4
        kw = k_lo // 4 + tl.arange(0, BLOCK_KW)
        nxt = _load_rows(q_ptr, offs_n, n_mask, kw, (kw < KW) & (kw < kw_end), stride_qn)  # needs no earlier kernel
        pdl_start(USE_PDL)
        acc0 = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)
        acc1 = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)
        for w0 in range(k_lo // 4, tl.minimum(kw_end, KW), BLOCK_KW):
            words = nxt
            kw = w0 + tl.arange(0, BLOCK_KW)
            kw_mask = (kw < KW) & (kw < kw_end)
            kw_next = kw + BLOCK_KW  # the next chunk's loads fly meanwhile
            nxt = _load_rows(q_ptr, offs_n, n_mask, kw_next, (kw_next < KW) & (kw_next < kw_end), stride_qn)
            acc0, acc1 = _bytes_fma(acc0, acc1, words, magic, x_ptr, M, kw, kw_mask, stride_xm, BLOCK_M, FP8)
        if BLOCK_M > 1:  # one return: Triton wants every return of a function to give one type
            acc = tl.join(tl.sum(acc0, axis=1), tl.sum(acc1, axis=1))  # [BLOCK_N, 2]
        else:
            acc = tl.sum(acc0, axis=1)[:, None]
        if FP8:
            acc = acc * 256.0  # the planes' 2**-8
        return acc

    @triton.jit(do_not_specialize=["M"])
    def _per_channel_skinny_kernel(x_ptr, xs_ptr, q_ptr, cs_ptr, b_ptr, y_ptr, ws_ptr, tickets_ptr, M, N, K,
                                   split_span, stride_xm, stride_qn, stride_ym,
                                   ACT_QUANT: tl.constexpr, INT_DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                   SPLIT_K: tl.constexpr, DOT: tl.constexpr, USE_PDL: tl.constexpr,
                                   WORDS: tl.constexpr = False, FP8: tl.constexpr = False, magic=0):
        """Program (n block, k split): int8 / fp8 rows [BLOCK_N] over a share of K for all M rows of x (ACT_QUANT:
        x is already quantized per token, xs its scales). WORDS (FMA): q_ptr is the layout read as int32 words
        (FP8: of e4m3 bytes), stride_qn in words, and the products run on byte planes (`_bytes_fma`)."""
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        k_lo = pid_k * split_span
        k_end = k_lo + split_span  # masks compare against K and k_end apart (see _int4_skinny_kernel)
        if WORDS:
            acc = _words_product(x_ptr, q_ptr, offs_n, n_mask, M, K, k_lo, k_end, stride_xm, stride_qn, magic,
                                 BLOCK_M, BLOCK_N, BLOCK_K, USE_PDL, FP8)
        else:
            ks = k_lo + tl.arange(0, BLOCK_K)
            w_next = _load_rows(q_ptr, offs_n, n_mask, ks, (ks < K) & (ks < k_end), stride_qn)  # no earlier kernel
            pdl_start(USE_PDL)
            if INT_DOT:
                acc = tl.zeros([BLOCK_N, BLOCK_M], tl.int32)
            else:
                acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for k0 in range(k_lo, tl.minimum(k_end, K), BLOCK_K):
                w = w_next
                ks = k0 + tl.arange(0, BLOCK_K)
                ks_next = ks + BLOCK_K  # the next chunk's loads fly meanwhile
                w_next = _load_rows(q_ptr, offs_n, n_mask, ks_next, (ks_next < K) & (ks_next < k_end), stride_qn)
                a = _load_x(x_ptr, offs_m, m_mask, ks, (ks < K) & (ks < k_end), stride_xm)
                acc = _multiply_add(acc, w, a, DOT, INT_DOT)
        _finish(acc, y_ptr, b_ptr, ws_ptr, tickets_ptr, cs_ptr, xs_ptr, pid_n, pid_k, N, offs_n, offs_m, n_mask,
                m_mask, stride_ym, HAS_BIAS, True, ACT_QUANT, BLOCK_M, BLOCK_N, SPLIT_K)

    @triton.jit
    def _gemm_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """This program's (token rows [BLOCK_M], weight rows [BLOCK_N]): GROUP_M token tiles sweep the same
        weight tiles one after another, so a weight tile is read from DRAM about once per group."""
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    @triton.jit
    def _store_tile(y_ptr, b_ptr, cs_ptr, xs_ptr, acc, offs_m, offs_n, M, N, stride_ym,
                    HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, ACT_QUANT: tl.constexpr):
        """y[m, n] = acc[n, m] × scales (+ bias), rounded once (the tiled epilogue)."""
        _scale_store(y_ptr, b_ptr, cs_ptr, xs_ptr, acc.to(tl.float32), offs_n, offs_m, offs_n < N, offs_m < M,
                     stride_ym, HAS_BIAS, SCALED, ACT_QUANT)

    @triton.jit
    def _per_channel_gemm_kernel(x_ptr, xs_ptr, q_ptr, cs_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_qn,
                                 stride_ym, ACT_QUANT: tl.constexpr, INT_DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 GROUP_M: tl.constexpr, USE_PDL: tl.constexpr):
        """Tile [BLOCK_M tokens, BLOCK_N weight rows] of x @ W.T with W int8 / fp8 (ACT_QUANT: x quantized)."""
        offs_m, offs_n = _gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        m_mask, n_mask = offs_m < M, offs_n < N
        pdl_start(USE_PDL)
        if INT_DOT:
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.int32)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            w = _load_rows(q_ptr, offs_n, n_mask, ks, ks < K, stride_qn)
            a = _load_x(x_ptr, offs_m, m_mask, ks, ks < K, stride_xm)
            acc = _multiply_add(acc, w, a, True, INT_DOT)
        _store_tile(y_ptr, b_ptr, cs_ptr, xs_ptr, acc, offs_m, offs_n, M, N, stride_ym, HAS_BIAS, True, ACT_QUANT)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, DIVISOR: tl.constexpr,
                              Q_MIN: tl.constexpr, Q_MAX: tl.constexpr, TO_INT8: tl.constexpr, BLOCK: tl.constexpr,
                              USE_PDL: tl.constexpr):
        """One row per program: scale = max|x| / DIVISOR (at least the smallest normal float), q = x / scale
        clamped to Q_MIN..Q_MAX, rounded half to even to int8 or to fp8 e4m3; writes q and scale."""
        row = tl.program_id(0).to(tl.int64)
        pdl_start(USE_PDL)
        amax = tl.zeros([BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            ks = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride_xm + ks, mask=ks < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), DIVISOR), 1.1754943508222875e-38)
        tl.store(s_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            ks = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride_xm + ks, mask=ks < K, other=0.0).to(tl.float32)
            scaled = tl.math.div_rn(x, tl.zeros_like(x) + scale)
            if TO_INT8:
                rounded = (scaled + 12582912.0) - 12582912.0  # 1.5 * 2**23: rounds half to even for |x| < 2**22
                q = tl.minimum(tl.maximum(rounded, Q_MIN), Q_MAX).to(tl.int8)
            else:
                q = tl.minimum(tl.maximum(scaled, Q_MIN), Q_MAX).to(q_ptr.dtype.element_ty)
            tl.store(q_ptr + row * stride_qm + ks, q, mask=ks < K)

    @triton.jit
    def _int4_to_dense_kernel(q_ptr, s_ptr, z_ptr, w_ptr, N, KW, stride_qn, stride_sn, stride_zn, stride_wn,
                              HAS_ZEROS: tl.constexpr, GROUP_WORDS: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr):
        """The int4 layout's tile [BLOCK_N, BLOCK_K] as dense values (q - z) * s in w's dtype."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        kw = tl.program_id(1) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
        words, scale, zero = _int4_groups(q_ptr, s_ptr, z_ptr, offs_n, offs_n < N, kw, kw < KW, stride_qn,
                                          stride_sn, stride_zn, GROUP_WORDS, HAS_ZEROS)
        values = _int4_dequantize(words, scale, zero + 8388608.0, BLOCK_K)
        ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        tl.store(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + ks[None, :], values.to(w_ptr.dtype.element_ty),
                 mask=(offs_n < N)[:, None] & (ks < KW * 8)[None, :])

    @triton.jit
    def _per_channel_to_dense_kernel(q_ptr, cs_ptr, w_ptr, N, K, stride_qn, stride_wn, BLOCK_N: tl.constexpr,
                                     BLOCK_K: tl.constexpr):
        """The int8 / fp8 layout's tile [BLOCK_N, BLOCK_K] as dense values q * s in w's dtype."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        q = _load_rows(q_ptr, offs_n, offs_n < N, ks, ks < K, stride_qn).to(tl.float32)
        scale = tl.load(cs_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        tl.store(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + ks[None, :],
                 (q * scale[:, None]).to(w_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (ks < K)[None, :])


# ---------------------------------------------------------------- host side: checks, launches, dispatch



def _runs_kernels(x: torch.Tensor) -> bool:
    """Whether this call runs the Triton kernels (a CUDA tensor, or any under the interpreter) or the twin."""
    return triton is not None and (x.is_cuda or INTERPRET)


def _check_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int) -> None:
    n, k = qweight.shape[0], x.shape[1]
    if qweight.dtype != torch.int32 or qweight.shape[1] * 8 != k or qweight.stride(-1) != 1:
        raise ValueError(f"int4: qweight must be contiguous int32 [N, K / 8] for K={k}, got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    if group_size % 8 or k % group_size:
        raise ValueError(f"int4: group size {group_size} must be a multiple of 8 that divides K={k}")
    groups = (n, k // group_size)
    if tuple(scales.shape) != groups or scales.stride(-1) != 1:
        raise ValueError(f"int4: scales must be [N, K / G] = {groups}, got {tuple(scales.shape)}")
    if zeros is not None and (tuple(zeros.shape) != groups or zeros.dtype != torch.uint8 or zeros.stride(-1) != 1):
        raise ValueError(f"int4: zeros must be uint8 {groups}, got {zeros.dtype} {tuple(zeros.shape)}")


def _check_per_channel(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> None:
    if qweight.dtype not in (torch.int8, torch.float8_e4m3fn) or qweight.shape[1] != x.shape[1]:
        raise ValueError(f"per_channel: qweight must be int8 or float8_e4m3fn [N, K={x.shape[1]}], got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    if qweight.stride(-1) != 1 or scales.dtype != torch.float32 or tuple(scales.shape) != (qweight.shape[0],):
        raise ValueError("per_channel: qweight rows must be contiguous and scales float32 [N]")


def _skinny_setup(x: torch.Tensor, n: int, config: SkinnyConfig) -> tuple[torch.Tensor, int, int, int, tuple]:
    """(y [M, N], block_m, split, split span, (workspace, tickets)) of a skinny launch, after its checks."""
    m, k = x.shape
    if not 1 <= m <= SKINNY_MAX_M:
        raise ValueError(f"skinny quantized product: M={m} rows is outside 1..{SKINNY_MAX_M}")
    if config.block_k % 16 or config.tiles != 1 or (config.dot and config.block_n < 16):
        raise ValueError(f"skinny quantized product: cannot run {config} (block_k a multiple of 16, one row tile, "
                         f"16 rows per block for tensor cores)")
    block_m = 16 if config.dot else m_bucket(m)
    split, span = split_k_shares(config, n, k, block_m)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    space = split_k_workspace(x.device) if split > 1 else (y, y)
    return y, block_m, split, span, space


def int4_skinny(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None = None, *, config: SkinnyConfig | None = None
                ) -> torch.Tensor:
    """x [M ≤ 16, K] @ int4 weight.T (+ bias) → [M, N] in one launch; `config` overrides the table / rule."""
    require_triton("r1serve.kernels.quant_reference")
    _check_int4(x, qweight, scales, zeros, group_size)
    n, (m, k) = qweight.shape[0], x.shape
    config = config or skinny_config(INT4, m, n, k, device_name(x.device))
    if not config.dot and m > FMA_MAX_M:
        raise ValueError(f"int4 skinny product: cannot run {config} at M={m} (FMA up to {FMA_MAX_M} rows)")
    y, block_m, split, span, (ws, tickets) = _skinny_setup(x, n, config)
    grid = (triton.cdiv(n, config.block_n), split)
    _int4_skinny_kernel[grid](
        x, qweight, scales, scales if zeros is None else zeros, y if bias is None else bias, y, ws, tickets,
        m, n, k, k // 8, span // 8, x.stride(0), qweight.stride(0), scales.stride(0),
        0 if zeros is None else zeros.stride(0), y.stride(0), _MAGIC, HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None, GROUP_WORDS=group_size // 8,
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=split, DOT=config.dot,
        USE_PDL=triton_ops.use_pdl(), num_warps=config.warps, num_stages=config.stages, **triton_ops.pdl_launch())
    return y


def quantize_per_token(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`quant_reference.quantize_per_token` in one launch: x [T, K] → (x_q [T, K] int8 or float8_e4m3fn,
    scales float32 [T, 1])."""
    require_triton("r1serve.kernels.quant_reference")
    t, k = x.shape
    to_int8 = fmt == INT8
    x_q = torch.empty((t, k), dtype=torch.int8 if to_int8 else torch.float8_e4m3fn, device=x.device)
    x_scales = torch.empty((t, 1), dtype=torch.float32, device=x.device)
    if t:
        block = min(4096, triton.next_power_of_2(k))
        divisor, q_min, q_max = ((quant_reference.INT8_SCALE_DIVISOR, quant_reference.INT8_MIN,
                                  quant_reference.INT8_MAX) if to_int8 else
                                 (quant_reference.FP8_MAX, -quant_reference.FP8_MAX, quant_reference.FP8_MAX))
        _quantize_rows_kernel[(t,)](x, x_q, x_scales, k, x.stride(0), x_q.stride(0), DIVISOR=divisor, Q_MIN=q_min,
                                    Q_MAX=q_max, TO_INT8=to_int8, BLOCK=block, USE_PDL=triton_ops.use_pdl(),
                                    num_warps=4 if block <= 2048 else 8, **triton_ops.pdl_launch())
    return x_q, x_scales


def _activation(x: torch.Tensor, qweight: torch.Tensor, act_quant: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The product's left operand and its per-token scales: x itself (scales unused), or x quantized per token to
    qweight's format."""
    if not act_quant:
        return x, x
    return quantize_per_token(x, INT8 if qweight.dtype == torch.int8 else FP8)


def per_channel_skinny(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       bias: torch.Tensor | None = None, act_quant: bool = False, *,
                       config: SkinnyConfig | None = None) -> torch.Tensor:
    """x [M ≤ 16, K] times the int8 / fp8 layout (+ bias) → [M, N]: one launch (two with act_quant, the first
    quantizing x per token)."""
    require_triton("r1serve.kernels.quant_reference")
    _check_per_channel(x, qweight, scales)
    n, (m, k) = qweight.shape[0], x.shape
    config = config or skinny_config(_layout(qweight), m, n, k, device_name(x.device))
    y, block_m, split, span, (ws, tickets) = _skinny_setup(x, n, config)
    a, a_scales = _activation(x, qweight, act_quant)
    words = not config.dot and k % 4 == 0 and qweight.stride(0) % 4 == 0 and config.block_k % 4 == 0
    q = qweight.view(torch.int32) if words else qweight
    grid = (triton.cdiv(n, config.block_n), split)
    _per_channel_skinny_kernel[grid](
        a, a_scales, q, scales, y if bias is None else bias, y, ws, tickets, m, n, k, span, a.stride(0),
        q.stride(0), y.stride(0), ACT_QUANT=act_quant, INT_DOT=act_quant and config.dot and a.dtype ==
        torch.int8, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT_K=split, DOT=config.dot, USE_PDL=triton_ops.use_pdl(), WORDS=words,
        FP8=qweight.dtype != torch.int8, magic=_MAGIC,
        num_warps=config.warps, num_stages=config.stages, **triton_ops.pdl_launch())
    return y


def per_channel_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     bias: torch.Tensor | None = None, act_quant: bool = False, *,
                     config: GemmConfig | None = None) -> torch.Tensor:
    """x [M, K] times the int8 / fp8 layout (+ bias) → [M, N], the tiled Triton form (any M; meant for M > 16)."""
    require_triton("r1serve.kernels.quant_reference")
    _check_per_channel(x, qweight, scales)
    n, (m, k) = qweight.shape[0], x.shape
    config = config or gemm_config(_layout(qweight), m, n, k, device_name(x.device))
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if not m:
        return y
    a, a_scales = _activation(x, qweight, act_quant)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _per_channel_gemm_kernel[grid](
        a, a_scales, qweight, scales, y if bias is None else bias, y, m, n, k, a.stride(0), qweight.stride(0),
        y.stride(0), ACT_QUANT=act_quant, INT_DOT=act_quant and a.dtype == torch.int8, HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        USE_PDL=triton_ops.use_pdl(), num_warps=config.warps, num_stages=config.stages, **triton_ops.pdl_launch())
    return y


def _scaled_mm_ok(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """Whether FP8 act_quant prefill goes to torch._scaled_mm: a CUDA device of compute capability ≥ 8.9 and
    dimensions that are multiples of 16."""
    return (x.is_cuda and qweight.dtype == torch.float8_e4m3fn
            and _capability(x.device) >= (8, 9) and x.shape[1] % 16 == 0 and qweight.shape[0] % 16 == 0)


@functools.lru_cache(maxsize=16)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _scaled_mm_fp8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """FP8 W8A8 through cuBLASLt: x quantized per token, rowwise (per-token × per-channel) scales, bf16 out."""
    x_q, x_scales = quantize_per_token(x, FP8)
    y = torch._scaled_mm(x_q, qweight.t(), scale_a=x_scales, scale_b=scales.view(1, -1), out_dtype=torch.bfloat16)
    if bias is not None:
        y = (y.float() + bias.float()).to(x.dtype)
    return y.to(x.dtype)


def int4_to_dense(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                  out: torch.Tensor) -> torch.Tensor:
    """`quant_reference.dequantize_int4` into `out` [N, K] in one launch (rounded to out's dtype); returns `out`."""
    require_triton("r1serve.kernels.quant_reference")
    n, kw = qweight.shape
    grid = (triton.cdiv(n, DENSE_BLOCK_N), triton.cdiv(kw * 8, DENSE_BLOCK_K))
    _int4_to_dense_kernel[grid](qweight, scales, scales if zeros is None else zeros, out, n, kw, qweight.stride(0),
                                scales.stride(0), 0 if zeros is None else zeros.stride(0), out.stride(0),
                                HAS_ZEROS=zeros is not None, GROUP_WORDS=group_size // 8, BLOCK_N=DENSE_BLOCK_N,
                                BLOCK_K=DENSE_BLOCK_K)
    return out


def per_channel_to_dense(qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`quant_reference.dequantize_per_channel` into `out` [N, K] in one launch; returns `out`."""
    require_triton("r1serve.kernels.quant_reference")
    n, k = qweight.shape
    grid = (triton.cdiv(n, DENSE_BLOCK_N), triton.cdiv(k, DENSE_BLOCK_K))
    _per_channel_to_dense_kernel[grid](qweight, scales, out, n, k, qweight.stride(0), out.stride(0),
                                       BLOCK_N=DENSE_BLOCK_N, BLOCK_K=DENSE_BLOCK_K)
    return out


_DENSE_BUFFERS: list[torch.Tensor] = []  # never freed: a captured decode graph keeps the address it wrote to


def _dense_buffer(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scratch [N, K] for a dequantized weight, shared by every projection (they run one after another on
    the stream); it grows to the largest, the smaller ones kept."""
    for buffer in reversed(_DENSE_BUFFERS):
        if buffer.dtype == dtype and buffer.device == device and buffer.numel() >= n * k:
            return buffer[: n * k].view(n, k)
    _DENSE_BUFFERS.append(torch.empty(n * k, dtype=dtype, device=device))
    return _DENSE_BUFFERS[-1].view(n, k)


def _dense_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    """`quant_reference.int4_linear`: x [T, K] → [T, N] by the skinny kernel up to 16 rows, and above by the weight
    dequantized into a scratch, then cuBLAS."""
    if not _runs_kernels(x):
        return quant_reference.int4_linear(x, qweight, scales, zeros, group_size, bias)
    x2 = triton_ops.as_rows(x)  # [T, K]
    if 1 <= x2.shape[0] <= SKINNY_MAX_M:
        y = int4_skinny(x2, qweight, scales, zeros, group_size, bias)
    else:
        weight = _dense_buffer(qweight.shape[0], x2.shape[1], x2.dtype, x2.device)
        y = _dense_product(x2, int4_to_dense(qweight, scales, zeros, group_size, weight), bias)
    return y.view(*x.shape[:-1], qweight.shape[0])


def per_channel_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                       act_quant: bool) -> torch.Tensor:
    """`quant_reference.per_channel_linear`: x [T, K] → [T, N] by the skinny kernel up to 16 rows; above, weight-only
    by the weight dequantized into a scratch, then cuBLAS, and W8A8 by the tiled kernel (FP8: torch._scaled_mm
    where it runs). With act_quant, a skinny product quantizes x only where it runs on tensor cores: an FMA one
    sums in float32 either way, so it reads x as it is (one launch fewer, no rounding of x)."""
    if not _runs_kernels(x):
        return quant_reference.per_channel_linear(x, qweight, scales, bias, act_quant)
    x2 = triton_ops.as_rows(x)  # [T, K]
    if 1 <= x2.shape[0] <= SKINNY_MAX_M:
        config = skinny_config(_layout(qweight), x2.shape[0], qweight.shape[0], x2.shape[1], device_name(x.device))
        y = per_channel_skinny(x2, qweight, scales, bias, act_quant and config.dot, config=config)
    elif act_quant and _scaled_mm_ok(x2, qweight):
        y = _scaled_mm_fp8(x2, qweight, scales, bias)
    elif not act_quant:
        weight = _dense_buffer(*qweight.shape, x2.dtype, x2.device)
        y = _dense_product(x2, per_channel_to_dense(qweight, scales, weight), bias)
    else:
        y = per_channel_gemm(x2, qweight, scales, bias, act_quant)
    return y.view(*x.shape[:-1], qweight.shape[0])
