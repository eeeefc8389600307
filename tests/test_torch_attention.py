"""The torch attention backend's decode paths (for bf16, float32 products with the query heads grouped per kv head;
for float32, SDPA) and its prefill path (SDPA, grouped-query heads) against a float64 attention written out head
by head."""

from __future__ import annotations

import pytest
import torch

from r1serve.kernels.attention import TorchAttention, build_metadata

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 6, 2, 32, 4


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [heads, dim] of the last position, k/v [len, kv_heads, dim] → [heads, dim], in float64."""
    group = NUM_HEADS // NUM_KV_HEADS
    out = torch.empty(NUM_HEADS, HEAD_DIM, dtype=torch.float64)
    for head in range(NUM_HEADS):
        keys, values = k[:, head // group].double(), v[:, head // group].double()
        weights = (keys @ q[head].double() * scale).softmax(dim=0)  # [len]
        out[head] = weights @ values
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_and_prefill_attention_match_a_per_head_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    seq_lens = [1, 7, 13]  # different lengths: the shorter rows' padding must be masked
    tables = [[3, 0, 5, 2], [1, 4], [6, 7, 8, 9]]
    caches = [torch.randn(10, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=dtype) for _ in range(2)]
    backend, scale = TorchAttention(), HEAD_DIM ** -0.5
    query = torch.randn(len(seq_lens), NUM_HEADS, HEAD_DIM, dtype=dtype)
    decode = backend.attend(query, *caches, build_metadata([1] * 3, seq_lens, tables, BLOCK_SIZE), scale)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for i, (length, table) in enumerate(zip(seq_lens, tables, strict=True)):
        k, v = (c[table].flatten(0, 1)[:length] for c in caches)  # [len, kv_heads, dim]
        expected = naive_attention(query[i], k, v, scale)
        torch.testing.assert_close(decode[i].double(), expected, atol=tolerance, rtol=tolerance)
        prompt = torch.cat([torch.randn(length - 1, NUM_HEADS, HEAD_DIM, dtype=dtype), query[i:i + 1]])
        prefill = backend.attend(prompt, *caches, build_metadata([length], [length], [table], BLOCK_SIZE), scale)
        torch.testing.assert_close(prefill[-1].double(), expected, atol=tolerance, rtol=tolerance)
    assert decode.dtype == dtype and decode.shape == query.shape
