"""Paged attention: the metadata one engine step hands to every attention layer, and the backends behind it.

The KV cache of a layer is two tensors `[num_blocks, block_size, num_kv_heads, head_dim]`, in the model's dtype
or in float8 e4m3 (`--kv-cache-dtype fp8`): then a store divides by the layer's per-tensor scale (`KVScales`),
clamps to ±448 and rounds, and attention multiplies the scale back. Each step, the new
tokens' K/V are first stored into their slots (`slot_mapping`), then every query attends over its sequence's
whole context read back through its block table: cached prefix blocks, earlier chunks and the new tokens alike.
So chunked prefill, prefix-cache hits and decode are one code path. `TorchAttention` is the plain-PyTorch
reference (it runs on CPU and CUDA); the Triton backend of `kernels/triton_attention.py` implements the same
`AttentionBackend` interface and is checked against this one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


class KVScales(NamedTuple):
    """Per-tensor scales of one layer's fp8 KV cache: stored = x / scale, read back = stored * scale (float32
    values as Python floats, fixed at start-up, so CUDA graphs capture them as kernel arguments). Unused by a
    cache in the model's dtype."""

    k: float = 1.0
    v: float = 1.0


UNIT_SCALES = KVScales()


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x [..., head_dim] → the cache's dtype: a cast, or for an fp8 cache x * (1 / scale) in float32 clamped
    to ±448 and rounded to e4m3 (the Triton stores compute the same product with the same reciprocal)."""
    if cache_dtype != FP8_KV_DTYPE:
        return x.to(cache_dtype)
    return (x.float() * (1.0 / scale)).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(cache_dtype)


def dequantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Cache values [..., head_dim] → dtype: a cast, or for fp8 values (x in float32 × scale) rounded to dtype."""
    if x.dtype != FP8_KV_DTYPE:
        return x.to(dtype)
    return (x.float() * scale).to(dtype)


def write_kv_slots(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """cache [num_blocks, block_size, kv_heads, head_dim], rows [n, kv_heads, head_dim] already in the cache's
    dtype → their slots [n] int64. fp8 rows are copied as bytes (CPU has no float8 `index_copy_`)."""
    flat = cache.view(-1, *cache.shape[2:])
    if cache.dtype == FP8_KV_DTYPE:
        flat, rows = flat.view(torch.uint8), rows.view(torch.uint8)
    flat.index_copy_(0, slots, rows)


@dataclass
class AttentionMetadata:
    """Where the new tokens of one step go and what each of them may attend to."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset); -1 = padding
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: new tokens of seq i are [start[i], start[i+1])
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step (cached + new)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]  # host copies, so that the reference path never syncs
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


def paged_layout(query_lens: list[int], seq_lens: list[int], block_tables: Sequence[Sequence[int]],
                 block_size: int) -> tuple[list[int], list[int], array[int], int]:
    """The host side of `AttentionMetadata`: the cache slot of every new token, the query start offsets, the block
    tables flattened row by row and padded with 0 to one width (an int64 C array: the engine's tables are
    `array("q")` too, so a row is one copy however long the context), and that width."""
    width = max(map(len, block_tables), default=1) or 1
    flat = array("q", bytes(8 * width * len(block_tables)))  # zeros, then each table copied into its row
    slots: list[int] = []
    starts = [0]
    row = 0
    for q, s, table in zip(query_lens, seq_lens, block_tables, strict=True):
        if q == 1:  # a decode: the common row, without a generator
            slots.append(table[(s - 1) // block_size] * block_size + (s - 1) % block_size)
        else:
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(s - q, s))
        starts.append(starts[-1] + q)
        flat[row:row + len(table)] = table if isinstance(table, array) else array("q", table)
        row += width
    return slots, starts, flat, width


def build_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for sequences whose last `query_lens[i]` tokens of `seq_lens[i]` are new this step."""
    slots, starts, flat, width = paged_layout(query_lens, seq_lens, block_tables, block_size)
    tables = torch.frombuffer(flat, dtype=torch.int64) if flat else torch.empty(0, dtype=torch.int64)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device=device, dtype=torch.int32).view(len(block_tables), width),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(seq_lens),
    )


class AttentionBackend(ABC):
    """Stores new K/V into the paged cache and computes causal attention over each sequence's context."""

    name: str = "abstract"

    @abstractmethod
    def store_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, kv_scales: KVScales = UNIT_SCALES) -> None:
        """key/value: [num_tokens, num_kv_heads, head_dim] → their slots; slot -1 is skipped. An fp8 cache
        stores `quantize_kv` of them with `kv_scales`."""

    @abstractmethod
    def attend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float, kv_scales: KVScales = UNIT_SCALES) -> torch.Tensor:
        """query: [num_tokens, num_heads, head_dim] → output of the same shape (GQA: heads share kv heads);
        an fp8 cache is read back times `kv_scales`."""


class TorchAttention(AttentionBackend):
    """The reference: gathers each sequence's context from its blocks and runs SDPA. Runs on CPU and CUDA."""

    name = "torch"

    def store_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, kv_scales: KVScales = UNIT_SCALES) -> None:
        valid = slot_mapping >= 0
        if not bool(valid.all()):
            key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
        write_kv_slots(k_cache, slot_mapping, quantize_kv(key, k_cache.dtype, kv_scales.k))
        write_kv_slots(v_cache, slot_mapping, quantize_kv(value, v_cache.dtype, kv_scales.v))

    def attend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float, kv_scales: KVScales = UNIT_SCALES) -> torch.Tensor:
        if meta.is_decode_only:
            return self._decode(query, k_cache, v_cache, meta, scale, kv_scales)
        out = torch.empty_like(query)
        start = 0
        for i, (q_len, s_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
            k, v = _gather_context(k_cache, v_cache, meta.block_tables[i], s_len)  # [s_len, kv_heads, dim]
            q = query[start:start + q_len]  # [q_len, heads, dim]
            k, v = dequantize_kv(k, q.dtype, kv_scales.k), dequantize_kv(v, q.dtype, kv_scales.v)
            # query j sits at position s_len - q_len + j and sees keys 0..that position
            mask = torch.ones(q_len, s_len, dtype=torch.bool, device=query.device).tril(s_len - q_len)
            out[start:start + q_len] = _sdpa(q, k, v, mask, scale)
            start += q_len
        return out

    def _decode(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, kv_scales: KVScales) -> torch.Tensor:
        """All sequences have one new token: one batched gather of their contexts, then `_decode_products` for a
        16-bit query (on a CPU faster than SDPA at decode shapes: docs/performance.md) or SDPA for a float32
        one (transformers' rounding, which the float32 parity tests compare tokens with)."""
        num_seqs, max_len = meta.num_seqs, meta.max_seq_len
        block_size = k_cache.shape[1]
        num_blocks = (max_len + block_size - 1) // block_size
        tables = meta.block_tables[:num_seqs, :num_blocks].long()
        k = k_cache[tables].flatten(1, 2)[:, :max_len]  # [num_seqs, max_len, kv_heads, dim]
        v = v_cache[tables].flatten(1, 2)[:, :max_len]
        valid = torch.arange(max_len, device=query.device)[None, :] < meta.seq_lens[:num_seqs, None]
        attend = _decode_sdpa if query.dtype == torch.float32 else _decode_products
        out = attend(query[:num_seqs], k, v, valid, scale, kv_scales)  # [num_seqs, heads, dim]
        if query.shape[0] == num_seqs:
            return out
        result = query.clone()
        result[:num_seqs] = out
        return result


def _decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float,
                 kv_scales: KVScales) -> torch.Tensor:
    """q [seqs, heads, dim], gathered k/v [seqs, len, kv_heads, dim], valid [seqs, len] → [seqs, heads, dim]."""
    k = dequantize_kv(k, q.dtype, kv_scales.k).transpose(1, 2)  # [seqs, kv_heads, len, dim]
    v = dequantize_kv(v, q.dtype, kv_scales.v).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1]),
                                         attn_mask=valid[:, None, None, :], scale=scale)
    return out.squeeze(2)


def _decode_products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float,
                     kv_scales: KVScales) -> torch.Tensor:
    """As `_decode_sdpa`, as two float32 products: each kv head's query heads are one [group, dim] matrix (no
    copy of K/V per query head), and the float32 scores and softmax round only the output to q's dtype."""
    num_seqs, dim, dtype = q.shape[0], q.shape[-1], q.dtype
    k, v = _float32_heads(k, kv_scales.k), _float32_heads(v, kv_scales.v)  # [seqs, kv_heads, len, dim]
    q = q.float().view(num_seqs, k.shape[1], -1, dim)  # [seqs, kv_heads, group, dim]
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # [seqs, kv_heads, group, len]
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v).view(num_seqs, -1, dim).to(dtype)


def _float32_heads(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Gathered cache rows x [seqs, len, kv_heads, dim] → [seqs, kv_heads, len, dim] float32, contiguous (the
    products then read them without another copy), times `scale` for an fp8 cache (`dequantize_kv`'s values)."""
    out = torch.empty(x.shape[0], x.shape[2], x.shape[1], x.shape[3], dtype=torch.float32, device=x.device)
    out.copy_(x.transpose(1, 2))
    return out.mul_(scale) if x.dtype == FP8_KV_DTYPE else out


def _gather_context(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    block_size = k_cache.shape[1]
    blocks = block_table[: (seq_len + block_size - 1) // block_size].long()
    k = k_cache[blocks].flatten(0, 1)[:seq_len]
    v = v_cache[blocks].flatten(0, 1)[:seq_len]
    return k, v


def _expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[batch, kv_heads, len, dim] → [batch, num_heads, len, dim] for grouped-query attention."""
    group = num_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [q_len, heads, dim], k/v [s_len, kv_heads, dim], mask [q_len, s_len] → [q_len, heads, dim]; grouped-query
    heads share their kv head inside SDPA (`enable_gqa`), without a copy of K/V per query head."""
    qh = q.transpose(0, 1).unsqueeze(0)
    kh = k.transpose(0, 1).unsqueeze(0).to(q.dtype)
    vh = v.transpose(0, 1).unsqueeze(0).to(q.dtype)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)
