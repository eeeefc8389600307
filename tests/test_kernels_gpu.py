"""GPU tests of the Triton kernels against their plain-torch twins (`TorchAttention`, `kernels/reference.py`).

Each test draws fresh random inputs, computes the twin in float32 on upcast copies and checks the bf16
kernel's relative error ‖out − ref‖ / ‖ref‖ (bf16 operands land between 1e-3 and 1e-2; NaN never passes).
Outputs are poisoned with NaN before each run (an `out=` buffer, or a freed NaN block that the allocator
hands back next, which the test checks), so an element the kernel forgot to write fails. Every test is
marked `gpu`: conftest skips them without CUDA, and this module imports on CPU without Triton.
"""
from __future__ import annotations

import random

import pytest
import torch

from r1serve.kernels import reference
from r1serve.kernels.attention import AttentionMetadata, TorchAttention, build_metadata

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPE = torch.bfloat16
BF16_TOL = 1e-2


def _triton_modules():  # imported inside the tests, so that collection works without Triton
    from r1serve.kernels import triton_attention, triton_ops

    return triton_attention, triton_ops


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in the output (an element was left unwritten?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def poison_next_allocations(*shapes: tuple[int, ...]) -> set[int]:
    """Fill blocks of these shapes with NaN and free them: the caching allocator hands them out next."""
    blocks = [torch.full(shape, float("nan"), dtype=DTYPE, device=DEVICE) for shape in shapes]
    pointers = {b.data_ptr() for b in blocks}
    del blocks
    return pointers


# ---------------------------------------------------------------- paged attention fixtures

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]


def make_batch(query_lens: list[int], seq_lens: list[int], num_heads: int = 12, num_kv_heads: int = 2,
               head_dim: int = 128, block_size: int = 16, seed: int | None = None) -> Batch:
    """Random query and new K/V, and a random, fully written cache whose blocks are handed out shuffled."""
    gen = torch.Generator().manual_seed(seed if seed is not None else random.randrange(1 << 30))
    needed = sum(-(-s // block_size) for s in seq_lens)
    num_blocks = needed + 5
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for s in seq_lens:
        n = -(-s // block_size)
        tables.append(order[used:used + n])
        used += n
    meta = build_metadata(query_lens, seq_lens, tables, block_size, device=DEVICE)
    num_tokens = sum(query_lens)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(DEVICE, DTYPE)

    k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    query = randn(num_tokens, num_heads, head_dim)  # [T, H, D]
    key, value = randn(num_tokens, num_kv_heads, head_dim), randn(num_tokens, num_kv_heads, head_dim)
    TorchAttention().store_kv(key, value, k_cache, v_cache, meta.slot_mapping)
    return query, key, value, k_cache, v_cache, meta


def reference_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata) -> torch.Tensor:
    scale = query.shape[-1] ** -0.5
    return TorchAttention().attend(query.float(), k_cache.float(), v_cache.float(), meta, scale)


def run_decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               num_splits: int | None = None, max_seq_len: int | None = None,
               fused_merge: bool | None = None) -> torch.Tensor:
    ta, _ = _triton_modules()
    out = torch.full_like(query, float("nan"))
    return ta.paged_decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                     query.shape[-1] ** -0.5, max_seq_len or meta.max_seq_len,
                                     num_splits=num_splits, out=out, fused_merge=fused_merge)


def run_prefill(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
    ta, _ = _triton_modules()
    out = torch.full_like(query, float("nan"))
    return ta.paged_prefill_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                      meta.query_start_loc, query.shape[-1] ** -0.5, meta.max_query_len,
                                      out=out)


BOUNDARY_LENS = [1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 1000, 1023, 1024, 1025]


# ---------------------------------------------------------------- KV store


@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_store_kv_matches_twin_and_skips_padding(block_size: int) -> None:
    ta, _ = _triton_modules()
    _, _, _, k_cache, v_cache, meta = make_batch([37, 1, 5], [37, 50, 300], block_size=block_size)
    qkv = torch.randn(43, (12 + 2 + 2) * 128, device=DEVICE, dtype=DTYPE)  # fused projection output
    key = qkv[:, 12 * 128:14 * 128].view(43, 2, 128)  # strided views, as the model hands them over
    value = qkv[:, 14 * 128:].view(43, 2, 128)
    slots = meta.slot_mapping.clone()
    slots[torch.tensor([0, 7, 42], device=DEVICE)] = -1  # padding tokens
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    TorchAttention().store_kv(key, value, k_ref, v_ref, slots)
    ta.store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("batch", [1, 2, 7, 33, 64])
@pytest.mark.parametrize("block_size", [16, 64])
def test_decode_matches_twin(batch: int, block_size: int) -> None:
    seq_lens = [random.choice(BOUNDARY_LENS) for _ in range(batch)]
    query, _, _, k_cache, v_cache, meta = make_batch([1] * batch, seq_lens, block_size=block_size)
    assert rel_err(run_decode(query, k_cache, v_cache, meta), reference_attention(query, k_cache, v_cache,
                                                                                  meta)) < BF16_TOL


@pytest.mark.parametrize("seq_lens", [[4100], [8191], [4096, 17, 6000, 1]])
def test_decode_long_context(seq_lens: list[int]) -> None:
    query, _, _, k_cache, v_cache, meta = make_batch([1] * len(seq_lens), seq_lens)
    ref = reference_attention(query, k_cache, v_cache, meta)
    assert rel_err(run_decode(query, k_cache, v_cache, meta), ref) < BF16_TOL


@pytest.mark.parametrize("num_splits", [1, 2, 5, 16, 64])
@pytest.mark.parametrize("fused_merge", [False, True])
def test_decode_any_split_count_gives_the_same_result(num_splits: int, fused_merge: bool) -> None:
    """Both merges (second kernel, or last split of each KV head) over shares that may be empty; twice, so
    that the fused merge's tickets are seen to reset between launches."""
    query, _, _, k_cache, v_cache, meta = make_batch([1] * 4, [3, 100, 777, 2049])
    ref = reference_attention(query, k_cache, v_cache, meta)
    first = run_decode(query, k_cache, v_cache, meta, num_splits=num_splits, fused_merge=fused_merge)
    assert rel_err(first, ref) < BF16_TOL
    again = run_decode(query, k_cache, v_cache, meta, num_splits=num_splits, fused_merge=fused_merge)
    assert torch.equal(first, again)


@pytest.mark.parametrize("heads", [(12, 2), (4, 4), (8, 1), (16, 2), (28, 4)])
def test_decode_gqa_groups(heads: tuple[int, int]) -> None:
    num_heads, num_kv_heads = heads
    query, _, _, k_cache, v_cache, meta = make_batch([1] * 5, [1, 16, 17, 300, 2000], num_heads=num_heads,
                                                     num_kv_heads=num_kv_heads, head_dim=64)
    ref = reference_attention(query, k_cache, v_cache, meta)
    assert rel_err(run_decode(query, k_cache, v_cache, meta), ref) < BF16_TOL


def test_decode_upper_bound_and_zero_length_padding() -> None:
    """Graph-style call: max_seq_len is a cap far above the real lengths, and padded rows have length 0."""
    query, _, _, k_cache, v_cache, meta = make_batch([1] * 6, [5, 16, 33, 900, 1, 70])
    ref = reference_attention(query, k_cache, v_cache, meta)
    seq_lens = meta.seq_lens.clone()
    seq_lens[[1, 4]] = 0  # rows 1 and 4 become padding
    padded = AttentionMetadata(meta.slot_mapping, meta.query_start_loc, seq_lens, meta.block_tables, 1, 900,
                               [1] * 6, seq_lens.tolist())
    out = run_decode(query, k_cache, v_cache, padded, max_seq_len=8192)
    real = [0, 2, 3, 5]
    assert rel_err(out[real], ref[real]) < BF16_TOL
    assert torch.equal(out[[1, 4]], torch.zeros_like(out[[1, 4]]))


def test_decode_cuda_graph_replay_follows_new_inputs() -> None:
    """Capture store + attend once for a padded batch of 8, then write other lengths, tables, queries and
    cache contents into the captured buffers and replay: 5 real rows, 3 padded rows (length 0, slot -1)."""
    ta, _ = _triton_modules()
    backend = ta.TritonAttention()
    batch, cap, scale = 8, 4096, 128 ** -0.5
    q2, k2, v2, k_cache2, v_cache2, meta2 = make_batch([1] * 5, [17, 1, 3000, 16, 255])
    k_cache, v_cache = torch.randn_like(k_cache2), torch.randn_like(v_cache2)
    static_q = torch.randn(batch, 12, 128, device=DEVICE, dtype=DTYPE)  # [B, H, D]
    static_k = torch.randn(batch, 2, 128, device=DEVICE, dtype=DTYPE)
    static_v = torch.randn(batch, 2, 128, device=DEVICE, dtype=DTYPE)
    tables = torch.zeros(batch, cap // 16, dtype=torch.int32, device=DEVICE)
    tables[:, :3] = torch.arange(3, dtype=torch.int32, device=DEVICE)
    static = AttentionMetadata(torch.arange(batch, device=DEVICE) + 8, torch.arange(batch + 1, device=DEVICE,
                               dtype=torch.int32), torch.full((batch,), 40, dtype=torch.int32, device=DEVICE),
                               tables, 1, cap, [1] * batch, [40] * batch)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile the kernels outside the capture
        backend.store_kv(static_k, static_v, k_cache, v_cache, static.slot_mapping)
        backend.attend(static_q, k_cache, v_cache, static, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.store_kv(static_k, static_v, k_cache, v_cache, static.slot_mapping)
        static_out = backend.attend(static_q, k_cache, v_cache, static, scale)

    static_q[:5], static_k[:5], static_v[:5] = q2, k2, v2
    static.slot_mapping[:5], static.slot_mapping[5:] = meta2.slot_mapping, -1
    static.seq_lens[:5], static.seq_lens[5:] = meta2.seq_lens, 0
    static.block_tables.zero_()
    static.block_tables[:5, : meta2.block_tables.shape[1]] = meta2.block_tables
    k_cache.copy_(k_cache2)
    v_cache.copy_(v_cache2)
    flat_k = k_cache.view(-1, 2, 128)
    flat_k[meta2.slot_mapping] = float("nan")  # the replayed store must write these slots again
    graph.replay()
    torch.cuda.synchronize()
    first = static_out.clone()
    graph.replay()  # a second replay gives the same result (the merge tickets reset themselves)
    assert torch.equal(static_out, first)
    assert torch.equal(k_cache, k_cache2) and torch.equal(v_cache, v_cache2)
    assert rel_err(static_out[:5], reference_attention(q2, k_cache2, v_cache2, meta2)) < BF16_TOL
    assert torch.equal(static_out[5:], torch.zeros_like(static_out[5:]))
    eager = run_decode(static_q, k_cache, v_cache, static, max_seq_len=cap)
    assert torch.equal(static_out[:5], eager[:5]), "graph replay differs from the eager call"


# ---------------------------------------------------------------- prefill (varlen, over cached prefix blocks)

PREFILL_CASES = {
    "one_odd_prompt": ([37], [37]),
    "block_boundaries": ([15, 16, 17, 1, 31, 32, 33], [15, 16, 17, 1, 31, 32, 33]),
    "prefix_hits": ([3, 17, 64, 1], [35, 65, 1064, 16]),  # only the tail is new, the rest is cached
    "chunked_with_decodes": ([128, 1, 1, 33, 1], [4224, 50, 4100, 33, 17]),
    "long_prompt": ([4100], [4100]),
    "long_prefix_short_tail": ([200], [5000]),
}


@pytest.mark.parametrize("case", sorted(PREFILL_CASES))
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_prefill_matches_twin(case: str, block_size: int) -> None:
    query_lens, seq_lens = PREFILL_CASES[case]
    query, _, _, k_cache, v_cache, meta = make_batch(query_lens, seq_lens, block_size=block_size)
    ref = reference_attention(query, k_cache, v_cache, meta)
    assert rel_err(run_prefill(query, k_cache, v_cache, meta), ref) < BF16_TOL


@pytest.mark.parametrize("heads", [(12, 2), (4, 4), (8, 1), (16, 2), (28, 4), (40, 8)])
def test_prefill_gqa_groups(heads: tuple[int, int]) -> None:
    num_heads, num_kv_heads = heads
    query, _, _, k_cache, v_cache, meta = make_batch([50, 7, 1, 130], [50, 100, 33, 400], num_heads=num_heads,
                                                     num_kv_heads=num_kv_heads, head_dim=64)
    ref = reference_attention(query, k_cache, v_cache, meta)
    assert rel_err(run_prefill(query, k_cache, v_cache, meta), ref) < BF16_TOL


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_prefill_random_mixes(batch: int) -> None:
    """Random prompt and cached-prefix lengths, as a chunked-prefill scheduler would mix them."""
    seq_lens = [random.randint(1, 1500) for _ in range(batch)]
    query_lens = [random.choice([1, s, random.randint(1, s)]) for s in seq_lens]
    query, _, _, k_cache, v_cache, meta = make_batch(query_lens, seq_lens)
    ref = reference_attention(query, k_cache, v_cache, meta)
    assert rel_err(run_prefill(query, k_cache, v_cache, meta), ref) < BF16_TOL


def test_backend_store_then_attend_matches_twin() -> None:
    """TritonAttention end to end: store the new tokens, then attend; decode-only and mixed steps."""
    ta, _ = _triton_modules()
    for query_lens, seq_lens in (([1, 1, 1], [19, 1, 700]), ([12, 1, 40], [12, 90, 1000])):
        query, key, value, k_cache, v_cache, meta = make_batch(query_lens, seq_lens)
        k_mine, v_mine = torch.randn_like(k_cache), torch.randn_like(v_cache)
        old = torch.ones(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool, device=DEVICE)
        old[meta.slot_mapping] = False  # slots the store must fill; the rest already hold the cached context
        k_mine.view(-1, 2, 128)[old] = k_cache.view(-1, 2, 128)[old]
        v_mine.view(-1, 2, 128)[old] = v_cache.view(-1, 2, 128)[old]
        backend = ta.TritonAttention()
        backend.store_kv(key, value, k_mine, v_mine, meta.slot_mapping)
        out = backend.attend(query, k_mine, v_mine, meta, 128 ** -0.5)
        assert torch.equal(k_mine, k_cache) and torch.equal(v_mine, v_cache)
        assert rel_err(out, reference_attention(query, k_cache, v_cache, meta)) < BF16_TOL


def test_backend_sends_few_long_whole_prompts_to_sdpa() -> None:
    """Two whole prompts with no cached prefix take the SDPA path; the result still matches the twin."""
    ta, _ = _triton_modules()
    lengths = [ta.SDPA_MIN_PROMPT, ta.SDPA_MIN_PROMPT + 333]
    query, _, _, k_cache, v_cache, meta = make_batch(lengths, lengths)
    assert ta._sdpa_fits(meta)
    out = ta.TritonAttention().attend(query, k_cache, v_cache, meta, 128 ** -0.5)
    assert rel_err(out, reference_attention(query, k_cache, v_cache, meta)) < BF16_TOL
    _, _, _, _, _, with_prefix = make_batch(lengths, [lengths[0], lengths[1] + 20])
    assert not ta._sdpa_fits(with_prefix)


# ---------------------------------------------------------------- element-wise ops


@pytest.mark.parametrize("tokens", [1, 7, 257])
@pytest.mark.parametrize("hidden", [1536, 1000])
def test_rms_norm_and_fused_add(tokens: int, hidden: int) -> None:
    _, ops = _triton_modules()
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=DTYPE) * 3
    residual = torch.randn(tokens, hidden, device=DEVICE, dtype=DTYPE)
    weight = torch.rand(hidden, device=DEVICE, dtype=DTYPE) + 0.5
    poisoned = poison_next_allocations((tokens, hidden))
    out = ops.rms_norm(x, weight, 1e-6)
    assert out.data_ptr() in poisoned
    assert rel_err(out, reference.rms_norm(x.float(), weight.float(), 1e-6)) < BF16_TOL
    assert rel_err(out, reference.rms_norm(x, weight, 1e-6)) < 1e-3  # same rounding as the bf16 twin

    poisoned = poison_next_allocations((tokens, hidden), (tokens, hidden))
    normed, new_residual = ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert {normed.data_ptr(), new_residual.data_ptr()} == poisoned
    ref_normed, ref_residual = reference.fused_add_rms_norm(x.float(), residual.float(), weight.float(), 1e-6)
    assert rel_err(normed, ref_normed) < BF16_TOL
    assert torch.equal(new_residual, x + residual)  # the bf16 sum, rounded once
    assert rel_err(new_residual, ref_residual) < BF16_TOL


@pytest.mark.parametrize("tokens", [1, 5, 300])
@pytest.mark.parametrize("inter", [8960, 100])
def test_silu_and_mul(tokens: int, inter: int) -> None:
    _, ops = _triton_modules()
    x = torch.randn(tokens, 2 * inter, device=DEVICE, dtype=DTYPE) * 2
    poisoned = poison_next_allocations((tokens, inter))
    out = ops.silu_and_mul(x)
    assert out.data_ptr() in poisoned and out.shape == (tokens, inter)
    assert rel_err(out, reference.silu_and_mul(x.float())) < BF16_TOL
    assert rel_err(out, reference.silu_and_mul(x)) < 1e-3


@pytest.mark.parametrize("tokens", [1, 9, 300])
@pytest.mark.parametrize("inplace", [False, True])
def test_apply_rotary_on_qkv_views(tokens: int, inplace: bool) -> None:
    _, ops = _triton_modules()
    cache = reference.rotary_cos_sin_cache(128, 8192, 10000.0).to(DEVICE)  # [max_pos, D] float32
    qkv = torch.randn(tokens, (12 + 2 + 2) * 128, device=DEVICE, dtype=DTYPE)
    q = qkv[:, : 12 * 128].view(tokens, 12, 128)  # strided views of the fused projection
    k = qkv[:, 12 * 128: 14 * 128].view(tokens, 2, 128)
    positions = torch.randint(0, 8192, (tokens,), device=DEVICE)
    ref_q, ref_k = reference.apply_rotary(q.float(), k.float(), positions, cache)
    bf_q, bf_k = reference.apply_rotary(q, k, positions, cache)
    value_before = qkv[:, 14 * 128:].clone()
    poisoned = poison_next_allocations((tokens, 12, 128), (tokens, 2, 128))
    out_q, out_k = ops.apply_rotary(q, k, positions, cache, inplace=inplace)
    if inplace:
        assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    else:
        assert {out_q.data_ptr(), out_k.data_ptr()} == poisoned
    assert rel_err(out_q, ref_q) < BF16_TOL and rel_err(out_k, ref_k) < BF16_TOL
    assert rel_err(out_q, bf_q) < 5e-3 and rel_err(out_k, bf_k) < 5e-3  # the twin rounds 3 times, we once
    assert torch.equal(qkv[:, 14 * 128:], value_before)  # v is never touched
