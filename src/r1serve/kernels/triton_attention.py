"""Triton paged attention: KV-cache store, split-K decode attention, varlen prefill attention over cached
prefix blocks, and `TritonAttention`, the `AttentionBackend` that runs them on CUDA.

The torch twin is `TorchAttention` in `kernels/attention.py`; this module computes the same function with the
same cache layout (`[num_blocks, block_size, num_kv_heads, head_dim]` per layer, `slot_mapping` -1 = skip).
Why these shapes: a decode step of the 1.5B model reads ~3 GB of weights, so each of its 28 attention calls
must cost a few microseconds. The decode kernel gives one program to all query heads of a KV head (each KV
block is read once for the 6 heads that share it) and splits a long context across programs (flash-decoding)
when the batch alone would leave the GPU idle; a second small kernel merges the splits (or, with
`DecodeTiles.merge_in_decode`, the last of a sequence's splits to finish, counted on a self-resetting ticket per
sequence and KV head). The number of splits
depends only on host integers the caller passes (batch size, an upper bound of the context length), and each
program works out its share from the device-side `seq_lens`, so a captured CUDA graph replays correctly for
any lengths up to that bound, including padded rows of length 0 and slot -1. The prefill kernel packs the
query heads of one KV head into the rows of one tile too (row = token * group + head), which serves long
prompts, chunked prefill, prefix-cache hits and mixed batches of decodes with one code path; a step of a
few long whole prompts (no cached prefix) goes to PyTorch's causal SDPA instead, measured faster there.
An fp8 KV cache (float8 e4m3, per-tensor `KVScales`) is the same kernels compiled with FP8 set: the stores
quantize x * (1 / scale), the attention kernels convert each loaded tile to the query's dtype, k_scale is
folded into the softmax scale and v_scale into the output; with FP8 off the kernels are unchanged.
The module imports without Triton (`kernels/triton_support.py`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from r1serve.kernels.attention import (
    FP8_KV_DTYPE,
    UNIT_SCALES,
    AttentionBackend,
    AttentionMetadata,
    KVScales,
    dequantize_kv,
)
from r1serve.kernels.triton_linear import split_k_workspace
from r1serve.kernels.triton_support import HAS_TRITON, require_triton, tl, triton

__all__ = [
    "DECODE_TILES", "HAS_TRITON", "DecodeRotary", "DecodeTiles", "TritonAttention", "decode_num_splits",
    "paged_decode_attention", "paged_prefill_attention", "rotary_store_attend", "rotary_store_kv",
    "sdpa_prefill_attention", "store_kv",
]

LOG2E = 1.4426950408889634
MAX_SPLITS = 64


@dataclass(frozen=True)
class DecodeTiles:
    """The decode kernel's tiles: keys per iteration (and the smallest share of a split) when a context is split
    (`block_n`) and when it is not (`block_n_whole`: one program per sequence and KV head, large batches), and
    its warps. Split contexts are faster with 32 keys at every batch and length measured, whole ones with 64 at
    batch ~256 (docs/kernels.md has the figures); benchmarks try others through `TritonAttention(tiles)`.
    `merge_in_decode`: the splits of one sequence and KV head count themselves in on a self-resetting ticket
    and the last one merges them, instead of `_merge_kernel`'s launch after the decode kernel (off until its
    step-graph timing decides: docs/kernels.md)."""

    block_n: int = 32
    block_n_whole: int = 64
    num_warps: int = 4
    merge_in_decode: bool = False  # a split context's last program to finish merges it (no merge kernel)


DECODE_TILES = DecodeTiles()
PREFILL_BLOCK_M = 128  # query rows (token, head) per prefill tile
PREFILL_BLOCK_N = 128  # keys per prefill iteration, and pipeline depth: the H100 sweep's best
PREFILL_NUM_STAGES = 3
# A few whole prompts with no cached prefix go to PyTorch's causal SDPA, which beats the paged kernel on long
# prompts but loses on short ones to its gather and per-prompt launches (docs/kernels.md), so only long ones.
SDPA_MIN_PROMPT = 4096
SDPA_MAX_SEQS = 4


if triton is not None:
    from r1serve.kernels import triton_ops
    from r1serve.kernels.triton_ops import kv_quantize, pdl_start, rotate_heads

    @triton.jit
    def _store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                         stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                         num_kv_heads, k_inv_scale, v_inv_scale, PAGE: tl.constexpr, HEADS_PAD: tl.constexpr,
                         HEAD_DIM: tl.constexpr, FP8: tl.constexpr):
        """One token per program: copies its K and V rows (all KV heads) into its slot; slot -1 is skipped.
        FP8: quantized with the inverse scales."""
        token = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:
            block = slot // PAGE
            offset = slot % PAGE
            heads = tl.arange(0, HEADS_PAD)[:, None]
            dims = tl.arange(0, HEAD_DIM)[None, :]
            mask = heads < num_kv_heads
            k = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
            v = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
            k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + heads * stride_kch + dims
            v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + heads * stride_vch + dims
            k = kv_quantize(k, k_inv_scale, k_cache_ptr, FP8)
            v = kv_quantize(v, v_inv_scale, v_cache_ptr, FP8)
            tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_store_kernel(q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                             stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cache,
                             stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                             num_heads, num_kv_heads, k_inv_scale, v_inv_scale, PAGE: tl.constexpr,
                             Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr, HALF: tl.constexpr,
                             USE_PDL: tl.constexpr, FP8: tl.constexpr):
        """One token per program: rotates its q heads in place, and writes its rotated k heads and its v
        heads into its cache slot (slot -1: q only; FP8: quantized). One read of the token's cos/sin row."""
        token = tl.program_id(0).to(tl.int64)
        pdl_start(USE_PDL)
        pos = tl.load(positions_ptr + token).to(tl.int64)
        dims = tl.arange(0, HALF)
        cos = tl.load(cos_sin_ptr + pos * stride_cache + dims)  # [HALF] float32
        sin = tl.load(cos_sin_ptr + pos * stride_cache + HALF + dims)
        rotate_heads(q_ptr, q_ptr, token, stride_qt, stride_qh, stride_qt, stride_qh, cos, sin, num_heads,
                      1.0, Q_HEADS_PAD, HALF, False)
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:
            k_dst = k_cache_ptr + (slot // PAGE) * stride_kcb + (slot % PAGE) * stride_kcs
            rotate_heads(k_ptr, k_dst, token, stride_kt, stride_kh, 0, stride_kch, cos, sin, num_kv_heads,
                          k_inv_scale, K_HEADS_PAD, HALF, FP8)
            heads = tl.arange(0, K_HEADS_PAD)[:, None]
            cols = tl.arange(0, 2 * HALF)[None, :]
            mask = heads < num_kv_heads
            v = kv_quantize(tl.load(v_ptr + token * stride_vt + heads * stride_vh + cols, mask=mask), v_inv_scale,
                             v_cache_ptr, FP8)
            v_dst = v_cache_ptr + (slot // PAGE) * stride_vcb + (slot % PAGE) * stride_vcs + heads * stride_vch
            tl.store(v_dst + cols, v.to(v_cache_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotate_loaded(x, partner, cos, sin, dims, HALF: tl.constexpr):
        """Neox rotary of rows x [..., D] given `partner`, the same rows with their halves swapped:
        x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); cos/sin [D] float32 (each half repeated),
        cast to x's dtype first like the twin, computed in float32 and rounded once."""
        dt = x.dtype
        sign = tl.where(dims < HALF, -1.0, 1.0)
        c = cos.to(dt).to(tl.float32)
        s = sin.to(dt).to(tl.float32)
        return (x.to(tl.float32) * c + sign * partner.to(tl.float32) * s).to(dt)

    @triton.jit
    def _new_kv(k_row, v_row, cos, sin, dims, k_inv_scale, v_inv_scale, k_cache_ptr, v_cache_ptr,
                HEAD_DIM: tl.constexpr, FP8: tl.constexpr):
        """The decode token's rotated key and its value ([HEAD_DIM] each, one KV head, read at k_row and
        v_row) as the cache stores them: in its dtype, quantized with the inverse scales if FP8."""
        half: tl.constexpr = HEAD_DIM // 2
        k = _rotate_loaded(tl.load(k_row + dims), tl.load(k_row + (dims + half) % HEAD_DIM), cos, sin, dims, half)
        k = kv_quantize(k, k_inv_scale, k_cache_ptr, FP8).to(k_cache_ptr.dtype.element_ty)
        v = kv_quantize(tl.load(v_row + dims), v_inv_scale, v_cache_ptr, FP8).to(k.dtype)
        return k, v

    @triton.jit
    def _store_new_kv(k, v, k_cache_ptr, v_cache_ptr, slot, kv_head, dims,
                      stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGE: tl.constexpr):
        """The decode token's rotated key and its value ([HEAD_DIM] each, one KV head) into its slot."""
        page = slot // PAGE
        offset = slot % PAGE
        tl.store(k_cache_ptr + page * stride_kb + offset * stride_ks + kv_head * stride_kh + dims, k)
        tl.store(v_cache_ptr + page * stride_vb + offset * stride_vs + kv_head * stride_vh + dims, v)

    @triton.jit
    def _load_kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, offs_n, n_mask, kv_head, stride_kb, stride_ks,
                      stride_kh, stride_vb, stride_vs, stride_vh, dims,
                      PAGE: tl.constexpr, MASKED: tl.constexpr):
        """K and V of keys offs_n [N] of one sequence through one read of its block table: two [N, HEAD_DIM],
        both loads issued before either is used."""
        if MASKED:
            pages = tl.load(table_ptr + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        else:
            pages = tl.load(table_ptr + offs_n // PAGE).to(tl.int64)
        in_page = offs_n % PAGE
        k_rows = pages * stride_kb + in_page * stride_ks + kv_head * stride_kh  # [N]
        v_rows = pages * stride_vb + in_page * stride_vs + kv_head * stride_vh
        if MASKED:
            k = tl.load(k_cache_ptr + k_rows[:, None] + dims[None, :], mask=n_mask[:, None], other=0.0)
            v = tl.load(v_cache_ptr + v_rows[:, None] + dims[None, :], mask=n_mask[:, None], other=0.0)
        else:
            k = tl.load(k_cache_ptr + k_rows[:, None] + dims[None, :])
            v = tl.load(v_cache_ptr + v_rows[:, None] + dims[None, :])
        return k, v

    @triton.jit
    def _online_softmax_step(acc, l_i, m_i, qk, v):
        """Fold scores qk [M, N] (log2 domain, -inf = masked) and values v [N, D] into the running state."""
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, l_i, m_new

    @triton.jit
    def _split_share(seq_len, num_splits, BLOCK_N: tl.constexpr):
        """Keys per split of a seq_len context (whole BLOCK_N tiles), and how many splits get any."""
        share = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        return share, tl.where(share > 0, tl.cdiv(seq_len, tl.maximum(share, 1)), 0)

    @triton.jit
    def _decode_tile(acc, l_i, m_i, q, k, v, offs_n, n_mask, newest, new_k, new_v, scale_log2e,
                     FP8: tl.constexpr):
        """One tile of keys offs_n [N] (k, v [N, HEAD_DIM] as loaded) folded into the running state; the key at
        position `newest` (-1: none) is the decode token's own, taken from registers (new_k, new_v [HEAD_DIM],
        as stored) rather than from the cache slot this kernel writes. FP8: all of them are converted to q's
        dtype first (exact: e4m3 values are bfloat16 values), their scales applied by the caller."""
        if FP8:
            k, v, new_k, new_v = k.to(q.dtype), v.to(q.dtype), new_k.to(q.dtype), new_v.to(q.dtype)
        is_new = (offs_n == newest)[:, None]
        k = tl.where(is_new, new_k[None, :], k)
        v = tl.where(is_new, new_v[None, :], v)
        qk = tl.dot(q, tl.trans(k)) * scale_log2e  # [GROUP_PAD, BLOCK_N]
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        return _online_softmax_step(acc, l_i, m_i, qk, v)

    @triton.jit
    def _decode_rest(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, table, start, end, newest, new_k, new_v, kv_head,
                     scale_log2e, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, dims,
                     PAGE: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr):
        """The tiles of a decode program's share [start, end) after its first, folded into the running state."""
        for n0 in range(start + BLOCK_N, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, table, offs_n, n_mask & (offs_n != newest), kv_head,
                                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, dims, PAGE, True)
            acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, k, v, offs_n, n_mask, newest, new_k, new_v,
                                         scale_log2e, FP8)
        return acc, l_i, m_i

    @triton.jit(do_not_specialize=["stride_bt"])  # eager steps: a variant per table width % 16 otherwise
    def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr,
                       part_lse_ptr, tickets_ptr, new_k_ptr, new_v_ptr, positions_ptr, cos_sin_ptr, slots_ptr,
                       scale_log2e, num_splits, v_scale, k_inv_scale, v_inv_scale,
                       stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                       stride_bt, stride_ot, stride_oh, stride_nkt, stride_nkh, stride_nvt, stride_nvh, stride_cs,
                       PAGE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                       MERGE: tl.constexpr, MERGE_HEADS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                       ROTARY: tl.constexpr, USE_PDL: tl.constexpr, FP8: tl.constexpr):
        """Program (seq, kv_head, split): the GROUP query heads of one KV head over one share of the
        context. SPLIT: write the normalised partial output and its log2-sum-exp, which `_merge_kernel` merges,
        or with MERGE the last of the splits that saw keys to finish (`_merge_if_last`).
        ROTARY: q is not rotated yet, and the decode token's key and value are not in the cache yet: the
        program rotates its q heads and the new key in registers, the split holding the newest key writes it
        (and the value) into the slot, and attends to it from registers. Everything but q and the new key/value
        comes then from the step's inputs or earlier steps, so the metadata, cos/sin and the share's first K/V
        tile are loaded before waiting for the kernel that writes q (PDL), which hides that chain of dependent
        loads. FP8: the cache is e4m3, k_scale is in scale_log2e, the output is multiplied by v_scale, and the
        new key and value are quantized with the inverse scales before they are stored and attended to."""
        seq = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + seq)  # a step input: written before the graph, not by a kernel
        share, active = _split_share(seq_len, num_splits, BLOCK_N)
        start = split * share
        end = tl.minimum(start + share, seq_len)
        group = tl.arange(0, GROUP_PAD)
        heads = kv_head * GROUP + group  # [GROUP_PAD]
        dims = tl.arange(0, HEAD_DIM)
        q_mask = group[:, None] < GROUP
        table = tables_ptr + seq * stride_bt
        offs_n = start + tl.arange(0, BLOCK_N)  # the share's first tile
        half: tl.constexpr = HEAD_DIM // 2
        newest = -1  # the position whose key comes from registers
        if ROTARY:
            cs_row = cos_sin_ptr + tl.load(positions_ptr + seq) * stride_cs
            cos = tl.load(cs_row + dims % half)  # [HEAD_DIM]: each half's angles twice
            sin = tl.load(cs_row + half + dims % half)
            slot = tl.load(slots_ptr + seq)
            newest = tl.where(slot >= 0, seq_len - 1, -1)  # slot -1 stores nothing: the cache is read as is
        first_mask = (offs_n < end) & (offs_n != newest)  # the newest key's slot is not written yet
        if ROTARY:  # no earlier kernel of this step writes what the first tile reads: load it before the wait
            k0, v0 = _load_kv_tile(k_cache_ptr, v_cache_ptr, table, offs_n, first_mask, kv_head, stride_kb,
                                   stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, dims, PAGE, True)
        pdl_start(USE_PDL)
        q_rows = q_ptr + seq * stride_qt + heads[:, None] * stride_qh
        q = tl.load(q_rows + dims[None, :], mask=q_mask, other=0.0)  # [GROUP_PAD, HEAD_DIM]
        new_k = tl.zeros([HEAD_DIM], k_cache_ptr.dtype.element_ty)
        new_v = new_k
        if ROTARY:
            partner = tl.load(q_rows + ((dims + half) % HEAD_DIM)[None, :], mask=q_mask, other=0.0)
            q = _rotate_loaded(q, partner, cos, sin, dims, half)
            new_k, new_v = _new_kv(new_k_ptr + seq * stride_nkt + kv_head * stride_nkh,
                                   new_v_ptr + seq * stride_nvt + kv_head * stride_nvh, cos, sin, dims,
                                   k_inv_scale, v_inv_scale, k_cache_ptr, v_cache_ptr, HEAD_DIM, FP8)
            holds_newest = (end > start) & (end == seq_len)
            if (holds_newest | ((seq_len == 0) & (split == 0))) & (slot >= 0):  # (no keys: still stores)
                _store_new_kv(new_k, new_v, k_cache_ptr, v_cache_ptr, slot.to(tl.int64), kv_head, dims,
                              stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGE)
        else:  # the store kernel before this one wrote the newest key
            k0, v0 = _load_kv_tile(k_cache_ptr, v_cache_ptr, table, offs_n, first_mask, kv_head, stride_kb,
                                   stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, dims, PAGE, True)
        if not FP8:
            q = q.to(k_cache_ptr.dtype.element_ty)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, k0, v0, offs_n, offs_n < end, newest, new_k, new_v,
                                     scale_log2e, FP8)
        acc, l_i, m_i = _decode_rest(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, table, start, end, newest, new_k,
                                     new_v, kv_head, scale_log2e, stride_kb, stride_ks, stride_kh, stride_vb,
                                     stride_vs, stride_vh, dims, PAGE, BLOCK_N, FP8)
        _decode_result(acc, l_i, m_i, out_ptr, part_out_ptr, part_lse_ptr, tickets_ptr, seq, kv_head, split,
                       active, num_splits, heads, group, dims, v_scale, stride_ot, stride_oh, GROUP, HEAD_DIM,
                       SPLIT, MERGE, MERGE_HEADS, SPLITS_PAD, FP8)

    @triton.jit
    def _decode_result(acc, l_i, m_i, out_ptr, part_out_ptr, part_lse_ptr, tickets_ptr, seq, kv_head, split,
                       active, num_splits, heads, group, dims, v_scale, stride_ot, stride_oh, GROUP: tl.constexpr,
                       HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, MERGE: tl.constexpr, MERGE_HEADS: tl.constexpr,
                       SPLITS_PAD: tl.constexpr, FP8: tl.constexpr):
        """What a decode program leaves: its output, or its partial (SPLIT); with MERGE only the splits that saw
        keys leave one (split 0 of a sequence with none: an empty partial, which merges to zeros), and the last
        of them to finish merges them."""
        if not MERGE:
            _store_decode_out(acc, l_i, m_i, out_ptr, part_out_ptr, part_lse_ptr, seq, split, num_splits, heads,
                              group, dims, v_scale, stride_ot, stride_oh, GROUP, HEAD_DIM, SPLIT, FP8)
        elif split < tl.maximum(active, 1):
            _store_decode_out(acc, l_i, m_i, out_ptr, part_out_ptr, part_lse_ptr, seq, split, num_splits, heads,
                              group, dims, v_scale, stride_ot, stride_oh, GROUP, HEAD_DIM, SPLIT, FP8)
            _merge_if_last(part_out_ptr, part_lse_ptr, out_ptr, tickets_ptr, seq, kv_head, tl.maximum(active, 1),
                           num_splits, stride_ot, stride_oh, GROUP, MERGE_HEADS, SPLITS_PAD, HEAD_DIM)

    @triton.jit
    def _store_decode_out(acc, l_i, m_i, out_ptr, part_out_ptr, part_lse_ptr, seq, split, num_splits, heads,
                          group, dims, v_scale, stride_ot, stride_oh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                          SPLIT: tl.constexpr, FP8: tl.constexpr):
        """The decode program's result for its GROUP heads [GROUP_PAD]: the normalised output (SPLIT: the
        partial and its log2-sum-exp, for `_merge_kernel`)."""
        q_mask = group[:, None] < GROUP
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]  # a share (or sequence) with no keys gives 0
        if FP8:
            o = o * v_scale
        if SPLIT:
            num_heads = tl.num_programs(1) * GROUP
            row = (seq * num_heads + heads) * num_splits + split  # [GROUP_PAD] into [B, H, S]
            lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
            tl.store(part_lse_ptr + row, lse, mask=group < GROUP)
            tl.store(part_out_ptr + row[:, None] * HEAD_DIM + dims[None, :], o, mask=q_mask)
        else:
            dst = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :]
            tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _merge_if_last(part_out_ptr, part_lse_ptr, out_ptr, tickets_ptr, seq, kv_head, active, num_splits,
                       stride_ot, stride_oh, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, SPLITS_PAD: tl.constexpr,
                       HEAD_DIM: tl.constexpr):
        """After a split has published its partials: the last of the `active` splits of (seq, kv_head) to
        arrive on their ticket merges the GROUP heads and resets the ticket for the next launch."""
        tl.debug_barrier()  # every thread's partial precedes the release below
        ticket_ptr = tickets_ptr + seq * tl.num_programs(1) + kv_head
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == active - 1:  # the other splits have all published theirs
            tl.atomic_xchg(ticket_ptr, 0, sem="relaxed", scope="gpu")
            _merge_group(part_out_ptr, part_lse_ptr, out_ptr, seq, kv_head, active, num_splits, stride_ot,
                         stride_oh, GROUP, GROUP_P2, SPLITS_PAD, HEAD_DIM)

    @triton.jit
    def _merge_group(part_out_ptr, part_lse_ptr, out_ptr, seq, kv_head, active, num_splits, stride_ot, stride_oh,
                     GROUP: tl.constexpr, GROUP_P2: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
        """The GROUP heads of one KV head merged from their `active` split partials at once (read past L1: other
        programs of this launch wrote them): the log-sum-exps first, then the partials in chunks of 8 splits, so
        the program holds a [GROUP_P2, 8, HEAD_DIM] tile rather than every split of every head."""
        chunk: tl.constexpr = 8
        g = tl.arange(0, GROUP_P2)
        heads = kv_head * GROUP + g
        rows = (seq * tl.num_programs(1) * GROUP + heads) * num_splits  # [GROUP_P2]: each head's first split
        splits = tl.arange(0, SPLITS_PAD)
        lse = tl.load(part_lse_ptr + rows[:, None] + splits[None, :], mask=(g < GROUP)[:, None] &
                      (splits < active)[None, :], other=float("-inf"), cache_modifier=".cg")  # [G, SPLITS_PAD]
        m = tl.max(lse, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        total = tl.sum(tl.where(lse > float("-inf"), tl.exp2(lse - m[:, None]), 0.0), 1)  # [G]
        dims = tl.arange(0, HEAD_DIM)
        acc = tl.zeros([GROUP_P2, HEAD_DIM], tl.float32)
        for s0 in range(0, active, chunk):
            s = s0 + tl.arange(0, chunk)
            mask = (g < GROUP)[:, None] & (s < active)[None, :]  # [G, chunk]
            lse_s = tl.load(part_lse_ptr + rows[:, None] + s[None, :], mask=mask, other=float("-inf"),
                            cache_modifier=".cg")
            w = tl.where(lse_s > float("-inf"), tl.exp2(lse_s - m[:, None]), 0.0)
            offsets = ((rows[:, None] + s[None, :]) * HEAD_DIM)[:, :, None] + dims[None, None, :]
            part = tl.load(part_out_ptr + offsets, mask=mask[:, :, None], other=0.0, cache_modifier=".cg")
            acc += tl.sum(part * w[:, :, None], 1)
        o = acc / tl.where(total > 0, total, 1.0)[:, None]
        dst = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])

    @triton.jit
    def _merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, seq_lens_ptr, num_splits, stride_ot, stride_oh,
                      SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                      USE_PDL: tl.constexpr):
        """Program (seq, head): the split outputs weighted by exp2(lse - max); 0 if no split saw a key. Which
        splits saw keys follows from seq_len (a step input, read before the wait), so the partials and their
        log-sum-exps are loaded together: one round trip to memory after the decode kernel, not two."""
        seq = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        _, active = _split_share(tl.load(seq_lens_ptr + seq), num_splits, BLOCK_N)  # the decode kernel's split
        row = (seq * tl.num_programs(1) + head) * num_splits
        splits = tl.arange(0, SPLITS_PAD)
        dims = tl.arange(0, HEAD_DIM)
        s_mask = splits < active
        pdl_start(USE_PDL)
        lse = tl.load(part_lse_ptr + row + splits, mask=s_mask, other=float("-inf"))  # [SPLITS_PAD]
        part = tl.load(part_out_ptr + (row + splits)[:, None] * HEAD_DIM + dims[None, :], mask=s_mask[:, None],
                       other=0.0)  # [SPLITS_PAD, HEAD_DIM]
        m = tl.max(lse, 0)
        w = tl.where(lse > float("-inf"), tl.exp2(lse - m), 0.0)
        total = tl.sum(w, 0)
        o = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + seq * stride_ot + head * stride_oh + dims, o.to(out_ptr.dtype.element_ty))

    @triton.jit(do_not_specialize=["stride_bt"])  # a variant per step's table width % 16 otherwise
    def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, seq_lens_ptr, starts_ptr, out_ptr,
                        scale_log2e, v_scale,
                        stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                        stride_vh, stride_bt, stride_ot, stride_oh,
                        PAGE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr):
        """Program (seq, tile, kv_head): rows = (token, head of the group) of TOKENS new tokens, causal over
        the whole context (cached prefix + new tokens). Keys before the tile's first position need no mask.
        FP8: an e4m3 cache, tiles converted to q's dtype, k_scale in scale_log2e, v_scale on the output."""
        TOKENS = BLOCK_M // GROUP  # new tokens per tile
        seq = tl.program_id(0).to(tl.int64)
        tok0 = tl.program_id(1) * TOKENS
        kv_head = tl.program_id(2)
        q_start = tl.load(starts_ptr + seq).to(tl.int64)
        q_len = (tl.load(starts_ptr + seq + 1) - q_start).to(tl.int32)
        if tok0 < q_len:
            seq_len = tl.load(seq_lens_ptr + seq)
            ctx = seq_len - q_len  # tokens already in the cache before this step's
            rows = tl.arange(0, BLOCK_M)
            tok = tok0 + rows // GROUP  # [BLOCK_M]
            heads = kv_head * GROUP + rows % GROUP
            row_mask = (rows < TOKENS * GROUP) & (tok < q_len)
            dims = tl.arange(0, HEAD_DIM)
            io_mask = row_mask[:, None]
            q_rows = q_ptr + (q_start + tok)[:, None] * stride_qt + heads[:, None] * stride_qh
            q = tl.load(q_rows + dims[None, :], mask=io_mask, other=0.0)
            if not FP8:
                q = q.to(k_cache_ptr.dtype.element_ty)
            # q: [BLOCK_M, HEAD_DIM]
            table = tables_ptr + seq * stride_bt
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
            full_end = (ctx + tok0) // BLOCK_N * BLOCK_N
            kv_end = tl.minimum(seq_len, ctx + tok0 + TOKENS)
            for n0 in range(0, full_end, BLOCK_N):  # keys every row sees
                offs_n = n0 + tl.arange(0, BLOCK_N)
                k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, table, offs_n, offs_n, kv_head, stride_kb,
                                     stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, dims, PAGE, False)
                if FP8:
                    k, v = k.to(q.dtype), v.to(q.dtype)
                qk = tl.dot(q, tl.trans(k)) * scale_log2e  # [BLOCK_M, BLOCK_N]
                acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, qk, v)
            q_pos = ctx + tok  # [BLOCK_M]
            for n0 in range(full_end, kv_end, BLOCK_N):  # the diagonal: causal mask
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_mask = offs_n < kv_end
                k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, table, offs_n, n_mask, kv_head, stride_kb,
                                     stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, dims, PAGE, True)
                if FP8:
                    k, v = k.to(q.dtype), v.to(q.dtype)
                qk = tl.dot(q, tl.trans(k)) * scale_log2e
                visible = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
                qk = tl.where(visible, qk, float("-inf"))
                acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, qk, v)
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            if FP8:
                o = o * v_scale
            dst = out_ptr + (q_start + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :]
            tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=io_mask)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """Validates the paged layout [num_blocks, block_size, num_kv_heads, head_dim]; returns block_size."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"KV cache must be two equal [blocks, block_size, kv_heads, head_dim] tensors, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV cache: head_dim must be the contiguous dimension")
    head_dim, block_size = k_cache.shape[3], k_cache.shape[1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"Triton attention needs a power-of-two head_dim >= 16, got {head_dim}")
    if block_size & (block_size - 1):
        raise ValueError(f"Triton attention needs a power-of-two block_size, got {block_size}")
    return block_size


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _merge_tickets(device: torch.device, needed: int) -> torch.Tensor | None:
    """Tickets for the decode kernel's merge, one per (sequence, KV head): the skinny products' self-resetting
    int32 tickets (`triton_linear.split_k_workspace`; every launch leaves them at zero, and the kernels of a
    stream use them one after another), or None when a batch needs more than there are (then the merge kernel
    runs)."""
    tickets = split_k_workspace(device)[1]
    return tickets if needed <= tickets.numel() else None


def _is_fp8(k_cache: torch.Tensor) -> bool:
    return k_cache.dtype == FP8_KV_DTYPE


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, kv_scales: KVScales = UNIT_SCALES) -> None:
    """key/value [num_tokens, num_kv_heads, head_dim] (strided views allowed) → cache slots; -1 skipped; an fp8
    cache gets them quantized with `kv_scales`."""
    require_triton("r1serve.kernels.attention.TorchAttention")
    block_size = _check_cache(k_cache, v_cache)
    num_tokens, num_kv_heads, head_dim = key.shape
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("store_kv: head_dim of key and value must be contiguous")
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), num_kv_heads, 1.0 / kv_scales.k, 1.0 / kv_scales.v, PAGE=block_size,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim, FP8=_is_fp8(k_cache),
        num_warps=1 if num_kv_heads * head_dim <= 512 else 4)


def rotary_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, kv_scales: KVScales = UNIT_SCALES) -> torch.Tensor:
    """`reference.rotary_store_kv` in one launch: q [T, heads, D] is rotated in place and returned; the
    rotated k and v [T, kv_heads, D] (strided views of the fused qkv output allowed) go to their slots
    (quantized with `kv_scales` in an fp8 cache)."""
    require_triton("r1serve.kernels.attention.TorchAttention")
    block_size = _check_cache(k_cache, v_cache)
    head_dim = q.shape[-1]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("rotary_store_kv: the last dimension of q, k, v and the cache must be contiguous")
    if k_cache.dtype not in (q.dtype, FP8_KV_DTYPE):
        raise ValueError(f"rotary_store_kv: the cache holds {k_cache.dtype}, q is {q.dtype}")
    if q.shape[0]:
        _rotary_store_kernel[(q.shape[0],)](
            q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2), q.shape[1], k.shape[1], 1.0 / kv_scales.k, 1.0 / kv_scales.v, PAGE=block_size,
            Q_HEADS_PAD=triton.next_power_of_2(q.shape[1]), K_HEADS_PAD=triton.next_power_of_2(k.shape[1]),
            HALF=head_dim // 2, USE_PDL=triton_ops.use_pdl(), FP8=_is_fp8(k_cache), num_warps=4,
            **triton_ops.pdl_launch())
    return q


def rotary_store_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float, backend: AttentionBackend,
                        kv_scales: KVScales = UNIT_SCALES) -> torch.Tensor:
    """`KernelOps.rotary_store_attend`: rotary, KV store and attention of one layer. A decode-only step on this
    backend is one decode kernel (plus its merge) with the rotary and store folded in; anything else runs
    `rotary_store_kv`, then the backend's attention."""
    if meta.is_decode_only and isinstance(backend, TritonAttention):
        rotary = DecodeRotary(k, v, positions, cos_sin_cache, meta.slot_mapping)
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                      meta.max_seq_len, rotary=rotary, kv_scales=kv_scales,
                                      tiles=backend.decode_tiles)
    q = rotary_store_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, meta.slot_mapping, kv_scales)
    return backend.attend(q, k_cache, v_cache, meta, scale, kv_scales)


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                      block_n: int = DECODE_TILES.block_n) -> int:
    """How many programs share one sequence's context: enough to give every SM about two programs, never a
    share under `block_n` keys of `max_seq_len` (an upper bound, so that graphs may pass their cap)."""
    useful = triton.cdiv(max(max_seq_len, 1), block_n) if triton else 1
    wanted = -(-2 * num_sms // max(num_seqs * num_kv_heads, 1))
    return max(1, min(wanted, useful, MAX_SPLITS))


class DecodeRotary(NamedTuple):
    """What a decode step still has to do before attending, done inside the decode kernel: rotate q and the new
    key by `positions`, and store key and value [num_seqs, kv_heads, head_dim] in their slots (-1: none)."""

    key: torch.Tensor
    value: torch.Tensor
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    slot_mapping: torch.Tensor


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_seq_len: int,
                           num_splits: int | None = None, out: torch.Tensor | None = None,
                           rotary: DecodeRotary | None = None, kv_scales: KVScales = UNIT_SCALES,
                           tiles: DecodeTiles = DECODE_TILES) -> torch.Tensor:
    """One new token per sequence: query [num_seqs(+pad), num_heads, head_dim] → output of the same shape.

    seq_lens [num_seqs] int32 (device) may hold anything in 0..max_seq_len; a row of length 0 gives zeros.
    Rows of query past num_seqs are copied through (as TorchAttention does). No host sync: graph-safe.
    With `rotary`, query is not rotated yet and the new key/value are not stored yet: the kernel does both
    (the same function as `rotary_store_kv` followed by this call without it). An fp8 cache is read (and,
    with `rotary`, written) with `kv_scales`."""
    require_triton("r1serve.kernels.attention.TorchAttention")
    block_size = _check_cache(k_cache, v_cache)
    num_seqs, num_heads, head_dim = seq_lens.shape[0], query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(query) if out is None else out
    if query.shape[0] > num_seqs:
        out[num_seqs:] = query[num_seqs:]
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, num_kv_heads, max_seq_len, _device_sms(query.device), tiles.block_n)
    split = num_splits > 1
    block_n = tiles.block_n if split else tiles.block_n_whole
    tickets = _merge_tickets(query.device, num_seqs * num_kv_heads) if split and tiles.merge_in_decode else None
    f32 = {"dtype": torch.float32, "device": query.device}
    part_out = torch.empty((num_seqs, num_heads, num_splits, head_dim) if split else (1,), **f32)  # [B,H,S,D]
    part_lse = torch.empty((num_seqs, num_heads, num_splits) if split else (1,), **f32)  # [B, H, S]
    splits_pad = triton.next_power_of_2(num_splits)
    rot = rotary or DecodeRotary(query, query, seq_lens, part_lse, seq_lens)  # unused pointers without rotary
    fp8 = _is_fp8(k_cache)
    if rotary is not None and (rot.key.stride(-1) != 1 or rot.value.stride(-1) != 1
                               or k_cache.dtype not in (query.dtype, FP8_KV_DTYPE)):
        raise ValueError("paged_decode_attention: rotary key/value need a contiguous head_dim and the cache's dtype")
    scale_log2e = scale * (kv_scales.k if fp8 else 1.0) * LOG2E  # k_scale folded into the softmax scale
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse,
        tickets if tickets is not None else part_lse, rot.key, rot.value,
        rot.positions, rot.cos_sin_cache, rot.slot_mapping, scale_log2e, num_splits, kv_scales.v,
        1.0 / kv_scales.k, 1.0 / kv_scales.v, query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0),
        out.stride(1), rot.key.stride(0), rot.key.stride(1), rot.value.stride(0), rot.value.stride(1),
        rot.cos_sin_cache.stride(0), PAGE=block_size, GROUP=num_heads // num_kv_heads,
        GROUP_PAD=max(16, triton.next_power_of_2(num_heads // num_kv_heads)), HEAD_DIM=head_dim,
        BLOCK_N=block_n, SPLIT=split, MERGE=tickets is not None,
        MERGE_HEADS=triton.next_power_of_2(num_heads // num_kv_heads), SPLITS_PAD=splits_pad, ROTARY=rotary is not None,
        USE_PDL=triton_ops.use_pdl(), FP8=fp8, num_warps=tiles.num_warps, num_stages=2, **triton_ops.pdl_launch())
    if split and tickets is None:
        _merge_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, seq_lens, num_splits, out.stride(0), out.stride(1),
            SPLITS_PAD=splits_pad, HEAD_DIM=head_dim, BLOCK_N=block_n, USE_PDL=triton_ops.use_pdl(),
            num_warps=4, **triton_ops.pdl_launch())
    return out


def _prefill_tile(group: int, num_seqs: int, max_query_len: int, num_kv_heads: int, num_sms: int) -> int:
    """Rows (token, head) per prefill tile: 128, or 64 when 128-row tiles would leave SMs idle."""
    if group > PREFILL_BLOCK_M // 4:
        return triton.next_power_of_2(group) * 16
    tiles = num_seqs * triton.cdiv(max_query_len, PREFILL_BLOCK_M // group) * num_kv_heads
    return PREFILL_BLOCK_M if tiles >= 2 * num_sms or group > 16 else PREFILL_BLOCK_M // 2


def paged_prefill_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                            scale: float, max_query_len: int, out: torch.Tensor | None = None,
                            kv_scales: KVScales = UNIT_SCALES) -> torch.Tensor:
    """Varlen causal attention: the new tokens of sequence i are query[start[i]:start[i+1]], the last
    positions of its seq_lens[i]; keys come through its block table (prefix hits, earlier chunks, new tokens).
    query [num_tokens, num_heads, head_dim] → output of the same shape (rows of no sequence left as is). An
    fp8 cache is read back times `kv_scales`."""
    require_triton("r1serve.kernels.attention.TorchAttention")
    block_size = _check_cache(k_cache, v_cache)
    num_seqs = seq_lens.shape[0]
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query) if out is None else out
    if num_seqs == 0 or max_query_len == 0:
        return out
    block_m = _prefill_tile(group, num_seqs, max_query_len, num_kv_heads, _device_sms(query.device))
    block_n, num_stages = PREFILL_BLOCK_N, PREFILL_NUM_STAGES
    if query.element_size() > 2:  # fp32 tiles take twice the shared memory: smaller tiles, shallower pipeline
        block_m, block_n, num_stages = min(block_m, max(64, triton.next_power_of_2(group) * 16)), 64, 2
    grid = (num_seqs, triton.cdiv(max_query_len, block_m // group), num_kv_heads)
    fp8 = _is_fp8(k_cache)
    scale_log2e = scale * (kv_scales.k if fp8 else 1.0) * LOG2E  # k_scale folded into the softmax scale
    _prefill_kernel[grid](
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, scale_log2e, kv_scales.v,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0),
        out.stride(1), PAGE=block_size, GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m,
        BLOCK_N=block_n, FP8=fp8, num_warps=8 if block_m >= 128 else 4, num_stages=num_stages)
    return out


def sdpa_fits(meta: AttentionMetadata) -> bool:
    """Whether this step is only a few whole prompts with no cached prefix (host lists: no sync)."""
    return (0 < meta.num_seqs <= SDPA_MAX_SEQS and meta.query_lens_cpu == meta.seq_lens_cpu
            and min(meta.query_lens_cpu) >= SDPA_MIN_PROMPT)


def sdpa_prefill_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float, kv_scales: KVScales = UNIT_SCALES) -> torch.Tensor:
    """Whole prompts (query_len == seq_len): gathers each prompt's K/V from its blocks (an fp8 cache read back
    times `kv_scales`) and runs PyTorch's causal SDPA with grouped-query heads. query [num_tokens, num_heads,
    head_dim] → output, same shape."""
    out = torch.empty_like(query)
    block_size, start = k_cache.shape[1], 0
    for i, length in enumerate(meta.seq_lens_cpu):
        blocks = meta.block_tables[i, : -(-length // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:length].transpose(0, 1)  # [kv_heads, length, head_dim]
        v = v_cache[blocks].flatten(0, 1)[:length].transpose(0, 1)
        q = query[start:start + length].transpose(0, 1)  # [num_heads, length, head_dim]
        k, v = dequantize_kv(k, q.dtype, kv_scales.k), dequantize_kv(v, q.dtype, kv_scales.v)
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale, enable_gqa=True)
        out[start:start + length] = o[0].transpose(0, 1)
        start += length
    return out


class TritonAttention(AttentionBackend):
    """The CUDA backend: Triton store, split-K decode and varlen prefill kernels (see the module docstring);
    a step of only a few long whole prompts goes to PyTorch's causal SDPA instead (measured faster).

    For CUDA graphs, pass `meta.max_seq_len` as the captured upper bound (e.g. max_model_len): the number of
    decode splits is fixed by it and the batch size, and the kernels read the real lengths on the device."""

    name = "triton"

    def __init__(self, decode_tiles: DecodeTiles = DECODE_TILES) -> None:
        require_triton("r1serve.kernels.attention.TorchAttention")
        self.decode_tiles = decode_tiles

    def store_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, kv_scales: KVScales = UNIT_SCALES) -> None:
        store_kv(key, value, k_cache, v_cache, slot_mapping, kv_scales)

    def attend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float, kv_scales: KVScales = UNIT_SCALES) -> torch.Tensor:
        if meta.is_decode_only:
            return paged_decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                          meta.max_seq_len, kv_scales=kv_scales, tiles=self.decode_tiles)
        if sdpa_fits(meta):
            return sdpa_prefill_attention(query, k_cache, v_cache, meta, scale, kv_scales)
        return paged_prefill_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                       meta.query_start_loc, scale, meta.max_query_len, kv_scales=kv_scales)
