"""GPU tests of the Triton kernels against their plain-torch twins (`TorchAttention`, `kernels/reference.py`).

Each test draws fresh random inputs, computes the twin in float32 on upcast copies and checks the bf16
kernel's relative error ‖out − ref‖ / ‖ref‖ (bf16 operands land between 1e-3 and 1e-2; NaN never passes).
Outputs are poisoned with NaN before each run (an `out=` buffer, or a freed NaN block that the allocator
hands back next, which the test checks), so an element the kernel forgot to write fails. Every test is
marked `gpu`: conftest skips them without CUDA, and this module imports on CPU without Triton.
"""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from r1serve.kernels import reference
from r1serve.kernels.attention import (
    FP8_KV_DTYPE,
    AttentionMetadata,
    KVScales,
    TorchAttention,
    build_metadata,
    dequantize_kv,
    quantize_kv,
)

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
               num_splits: int | None = None, max_seq_len: int | None = None, tiles=None) -> torch.Tensor:
    ta, _ = _triton_modules()
    out = torch.full_like(query, float("nan"))
    return ta.paged_decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                     query.shape[-1] ** -0.5, max_seq_len or meta.max_seq_len,
                                     num_splits=num_splits, out=out, tiles=tiles or ta.DECODE_TILES)


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
def test_decode_any_split_count_gives_the_same_result(num_splits: int) -> None:
    """The merge over shares that may be empty; twice, and the same to the bit."""
    query, _, _, k_cache, v_cache, meta = make_batch([1] * 4, [3, 100, 777, 2049])
    ref = reference_attention(query, k_cache, v_cache, meta)
    first = run_decode(query, k_cache, v_cache, meta, num_splits=num_splits)
    assert rel_err(first, ref) < BF16_TOL
    again = run_decode(query, k_cache, v_cache, meta, num_splits=num_splits)
    assert torch.equal(first, again)


@pytest.mark.parametrize("num_splits", [2, 5, 64])
def test_decode_merge_in_kernel_equals_the_merge_kernel(num_splits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The splits merged by the last of them to finish, by the merge kernel, and by the merge kernel again
    when the batch needs more tickets than there are: the same up to the order of the float32 sums (the merge
    kernel's result to the bit), a length-0 row included, and the tickets back at zero after every launch."""
    ta, _ = _triton_modules()
    skinny = _linear_module()  # whose split-K tickets the merge takes
    query, _, _, k_cache, v_cache, meta = make_batch([1] * 5, [3, 100, 777, 2049, 40])
    seq_lens = meta.seq_lens.clone()
    seq_lens[4] = 0
    meta = AttentionMetadata(meta.slot_mapping, meta.query_start_loc, seq_lens, meta.block_tables, 1, 2049,
                             [1] * 5, seq_lens.tolist())
    merging = replace(ta.DECODE_TILES, merge_in_decode=True)
    fused = run_decode(query, k_cache, v_cache, meta, num_splits=num_splits, tiles=merging)
    workspace, tickets = skinny.split_k_workspace(fused.device)
    assert not tickets.any()
    kernel = run_decode(query, k_cache, v_cache, meta, num_splits=num_splits,
                        tiles=replace(ta.DECODE_TILES, merge_in_decode=False))
    assert rel_err(fused, kernel) < 1e-3
    assert torch.equal(fused[4], torch.zeros_like(fused[4]))
    monkeypatch.setitem(skinny._WORKSPACES, fused.device, (workspace, tickets[:9]))  # 5 × 2 KV heads need 10
    assert torch.equal(run_decode(query, k_cache, v_cache, meta, num_splits=num_splits, tiles=merging), kernel)
    assert rel_err(fused[:4], reference_attention(query, k_cache, v_cache, meta)[:4]) < BF16_TOL


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
    assert ta.sdpa_fits(meta)
    out = ta.TritonAttention().attend(query, k_cache, v_cache, meta, 128 ** -0.5)
    assert rel_err(out, reference_attention(query, k_cache, v_cache, meta)) < BF16_TOL
    _, _, _, _, _, with_prefix = make_batch(lengths, [lengths[0], lengths[1] + 20])
    assert not ta.sdpa_fits(with_prefix)


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


# ---------------------------------------------------------------- skinny products (kernels/triton_linear.py)

ACTS = ("plain", "rms_norm", "add_rms_norm", "silu")  # the skinny kernel's activations (silu: x = [gate, up])


def _linear_module():
    from r1serve.kernels import triton_linear

    return triton_linear


def skinny_case(act: str, m: int, n: int, k: int, bias: bool) -> dict[str, torch.Tensor | None]:
    """Fresh random inputs of one fused product: x, weight [n, k], bias, residual, norm weight (for silu, x is
    [gate, up], [m, 2k])."""
    x = torch.randn(m, 2 * k if act == "silu" else k, device=DEVICE, dtype=DTYPE) * 2
    return {
        "x": x, "weight": torch.randn(n, k, device=DEVICE, dtype=DTYPE) * k ** -0.5,
        "bias": torch.randn(n, device=DEVICE, dtype=DTYPE) if bias else None,
        "residual": torch.randn(m, k, device=DEVICE, dtype=DTYPE) if act == "add_rms_norm" else None,
        "norm_weight": torch.rand(k, device=DEVICE, dtype=DTYPE) + 0.5,
    }


def skinny_activation(act: str, case: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """The twin's bf16 activation: what the kernel must feed its product."""
    x, residual, norm_weight = case["x"], case["residual"], case["norm_weight"]
    if act == "rms_norm":
        return reference.rms_norm(x, norm_weight, 1e-6)
    if act == "add_rms_norm":
        return reference.fused_add_rms_norm(x, residual, norm_weight, 1e-6)[0]
    if act == "silu":
        return reference.silu_and_mul(x)
    return x


def skinny_reference(act: str, case: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """The fused op's twin in float32 on upcast inputs."""
    up = {key: None if t is None else t.float() for key, t in case.items()}
    return reference.linear(skinny_activation(act, up), up["weight"], up["bias"])


def run_skinny(act: str, case: dict[str, torch.Tensor | None], config=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    tl_ = _linear_module()
    code = {"plain": tl_.ACT_PLAIN, "rms_norm": tl_.ACT_RMS_NORM, "add_rms_norm": tl_.ACT_ADD_RMS_NORM,
            "silu": tl_.ACT_SILU_MUL}[act]
    return tl_.skinny_linear(case["x"], case["weight"], case["bias"], act=code, residual=case["residual"],
                             norm_weight=case["norm_weight"], eps=1e-6, config=config)


def check_skinny(act: str, case: dict[str, torch.Tensor | None], config=None) -> None:
    m, n = case["x"].shape[0], case["weight"].shape[0]
    poisoned = poison_next_allocations((m, n))
    y, new_res = run_skinny(act, case, config)
    assert y.data_ptr() in poisoned and y.shape == (m, n)
    assert rel_err(y, skinny_reference(act, case)) < BF16_TOL
    up_w = case["weight"].float()
    same_act = reference.linear(skinny_activation(act, case).float(), up_w,
                                None if case["bias"] is None else case["bias"].float())
    assert rel_err(y, same_act) < 4e-3  # the same bf16 activation: only the output's rounding differs
    if act == "add_rms_norm":
        assert torch.equal(new_res, case["x"] + case["residual"])


def run_op(act: str, case: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """The op as the model calls it: the measured skinny config, or the unfused fallback."""
    tl_ = _linear_module()
    if act == "plain":
        return tl_.linear(case["x"], case["weight"], case["bias"])
    if act == "silu":
        return tl_.silu_linear(case["x"], case["weight"])
    residual = case["residual"] if act == "add_rms_norm" else None
    out, _ = tl_.rms_norm_linear(case["x"], residual, case["norm_weight"], 1e-6, case["weight"], case["bias"])
    return out


MODEL_SHAPES = {"plain": [(1536, 1536, False), (1536, 8960, False)], "rms_norm": [(2048, 1536, True)],
                "add_rms_norm": [(17920, 1536, False), (2048, 1536, True)], "silu": [(1536, 8960, False)]}


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16])
def test_fused_ops_match_twin_at_model_shapes(act: str, m: int) -> None:
    """The 1.5B model's projections at every M the graphs run: the op (whatever it chose) against the twin, and
    the chosen kernel itself (poisoned output, the same-activation bound) where a config serves this M."""
    tl_ = _linear_module()
    for n, k, bias in MODEL_SHAPES[act]:
        case = skinny_case(act, m, n, k, bias)
        assert rel_err(run_op(act, case), skinny_reference(act, case)) < BF16_TOL
        for device in ("", tl_.device_name(case["weight"].device)):  # the H100's table, and this device's
            config = tl_.skinny_config(m, case["weight"].shape[0], k, fused=act != "plain", device=device)
            if config is not None:
                check_skinny(act, case, config)


def _explicit_configs(m: int) -> list:
    """Configs of every form the sweep may pick for m rows: FMA up to 4 rows (several chunks, split-K, one
    whole-K chunk, one row per program, several row blocks per program), tensor cores from 4."""
    cfg = _linear_module().SkinnyConfig
    if m <= 4:
        return [cfg(8, 64), cfg(4, 128, split_k=3), cfg(2, 2048), cfg(1, 1024), cfg(16, 32, split_k=5, warps=8),
                cfg(4, 1024, tiles=3), cfg(2, 2048, tiles=8, warps=8)]
    return [cfg(16, 64, dot=True), cfg(32, 64, split_k=4, dot=True, stages=3), cfg(32, 1024, dot=True, tiles=3)]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("m", [1, 3, 4, 7, 16])
@pytest.mark.parametrize("shape", [(37, 200, True), (129, 1000, False)])
def test_skinny_any_config_odd_sizes(act: str, m: int, shape: tuple[int, int, bool]) -> None:
    """Odd N and K (partial row blocks, partial column chunks, splits of unequal work), every product form."""
    n, k, bias = shape
    case = skinny_case(act, m, n, k, bias)
    for config in _explicit_configs(m):
        check_skinny(act, case, config)


def test_skinny_rejects_configs_it_cannot_run() -> None:
    tl_ = _linear_module()
    with pytest.raises(ValueError, match="tensor cores need 16 rows"):
        run_skinny("plain", skinny_case("plain", 5, 64, 200, False), tl_.SkinnyConfig(8, 256, dot=True))


def test_skinny_row_tiles_need_one_whole_k_chunk() -> None:
    tl_ = _linear_module()
    case = skinny_case("plain", 2, 64, 1000, False)
    with pytest.raises(ValueError, match="tiles=2 needs one chunk"):
        run_skinny("plain", case, tl_.SkinnyConfig(2, 256, tiles=2))


def test_skinny_split_k_is_deterministic_and_tickets_reset() -> None:
    tl_ = _linear_module()
    case = skinny_case("plain", 3, 1536, 8960, False)
    config = tl_.SkinnyConfig(4, 256, split_k=8)
    first, _ = run_skinny("plain", case, config)
    for _ in range(3):
        again, _ = run_skinny("plain", case, config)
        assert torch.equal(again, first)
    _, tickets = tl_.split_k_workspace(torch.device(DEVICE, torch.cuda.current_device()))
    assert tickets.count_nonzero() == 0


def test_fused_ops_fall_back_past_the_skinny_range() -> None:
    """Many rows, or float32: the ops run the unfused composition (Triton norm / SiLU, cuBLAS)."""
    tl_ = _linear_module()
    _, ops = _triton_modules()
    for dtype, m in ((DTYPE, tl_.SKINNY_MAX_M + 1), (torch.float32, 2)):
        x = torch.randn(m, 256, device=DEVICE, dtype=dtype)
        residual = torch.randn_like(x)
        w, nw = torch.randn(96, 256, device=DEVICE, dtype=dtype), torch.rand(256, device=DEVICE, dtype=dtype) + 0.5
        out, new_res = tl_.rms_norm_linear(x, residual, nw, 1e-6, w, None)
        normed, expected_res = ops.fused_add_rms_norm(x, residual, nw, 1e-6)
        assert torch.equal(new_res, expected_res) and torch.equal(out, torch.nn.functional.linear(normed, w))
        down_w = w[:, :128].contiguous()  # x as [gate, up] halves of 128
        expected = torch.nn.functional.linear(ops.silu_and_mul(x), down_w)
        assert torch.equal(tl_.silu_linear(x, down_w), expected)
        assert torch.equal(tl_.linear(x, w), torch.nn.functional.linear(x, w))


def test_fused_ops_first_layer_norm_without_residual() -> None:
    tl_ = _linear_module()
    case = skinny_case("rms_norm", 1, 2048, 1536, True)
    out, residual = tl_.rms_norm_linear(case["x"], None, case["norm_weight"], 1e-6, case["weight"], case["bias"])
    assert residual is case["x"]
    assert rel_err(out, skinny_reference("rms_norm", case)) < BF16_TOL


def test_skinny_cuda_graph_replay_equals_eager() -> None:
    """All four fused forms captured once (split-K and tickets included), replayed on new inputs."""
    tl_ = _linear_module()
    cases = {act: skinny_case(act, 5, 1536, 8960 if act == "plain" else 1536, act != "plain") for act in ACTS}
    configs = {"plain": tl_.SkinnyConfig(8, 256, split_k=4), "silu": tl_.SkinnyConfig(8, 512, split_k=2),
               "rms_norm": tl_.SkinnyConfig(32, 64, split_k=3, dot=True),
               "add_rms_norm": tl_.SkinnyConfig(64, 128, dot=True, stages=3)}
    for act in ACTS:
        run_skinny(act, cases[act], configs[act])  # compile and allocate outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = {act: run_skinny(act, cases[act], configs[act]) for act in ACTS}
    for act in ACTS:  # new inputs in the captured buffers
        for t in cases[act].values():
            if t is not None:
                t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    for act in ACTS:
        eager, eager_res = run_skinny(act, cases[act], configs[act])
        assert torch.equal(outs[act][0], eager)
        if act == "add_rms_norm":
            assert torch.equal(outs[act][1], eager_res)


# ---------------------------------------------------------------- fused rotary + KV store


@pytest.mark.parametrize("tokens", [1, 6, 300])
@pytest.mark.parametrize("block_size", [16, 64])
def test_rotary_store_equals_rotary_then_store(tokens: int, block_size: int) -> None:
    ta, ops = _triton_modules()
    cache = reference.rotary_cos_sin_cache(128, 8192, 10000.0).to(DEVICE)
    qkv = torch.randn(tokens, (12 + 2 + 2) * 128, device=DEVICE, dtype=DTYPE)
    q, k, v = qkv.split([12 * 128, 2 * 128, 2 * 128], dim=-1)
    q, k, v = q.view(tokens, 12, 128), k.view(tokens, 2, 128), v.view(tokens, 2, 128)
    positions = torch.randint(0, 8192, (tokens,), device=DEVICE)
    num_blocks = tokens // block_size + 3
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:tokens]
    slots[::3] = -1  # padding rows store nothing
    k_cache = torch.randn(num_blocks, block_size, 2, 128, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref, k_rot = ops.apply_rotary(q, k, positions, cache)
    ta.store_kv(k_rot, v, k_ref, v_ref, slots)
    q_bf, _ = reference.apply_rotary(q, k, positions, cache)
    q_fp, _ = reference.apply_rotary(q.float(), k.float(), positions, cache)
    out = ta.rotary_store_kv(q, k, v, positions, cache, k_cache, v_cache, slots)
    assert out.data_ptr() == q.data_ptr()  # rotated in place in the qkv buffer
    assert torch.equal(out, q_ref)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert rel_err(out, q_fp) < BF16_TOL and rel_err(out, q_bf) < 5e-3


@pytest.mark.parametrize("merge_in_decode", [False, True])
@pytest.mark.parametrize("num_splits", [1, 5, 32, None])
def test_decode_with_rotary_equals_rotary_store_then_decode(num_splits: int | None, merge_in_decode: bool) -> None:
    """The decode kernel with the rotary and the KV store folded in: the same output and cache as the fused
    rotary + store kernel followed by plain decode, and the twin's result; slot -1 and length 0 rows too; its
    splits merged by the merge kernel or by their last program."""
    ta, _ = _triton_modules()
    seq_lens = [5, 200, 64, 65, 1, 1000, 17]
    query, key, value, k_cache, v_cache, meta = make_batch([1] * len(seq_lens), seq_lens)
    cache = reference.rotary_cos_sin_cache(128, 4096, 10000.0).to(DEVICE)
    positions = (meta.seq_lens - 1).long()
    slots = meta.slot_mapping.clone()
    slots[4] = -1  # stores nothing
    seq_lens_t = meta.seq_lens.clone()
    seq_lens_t[6] = 0  # a padded row: reads nothing, writes zeros
    padded = AttentionMetadata(slots, meta.query_start_loc, seq_lens_t, meta.block_tables, 1, 4096,
                               [1] * len(seq_lens), seq_lens_t.tolist())
    k_cache.view(-1, 2, 128)[meta.slot_mapping] = float("nan")  # the kernel must write the new slots
    v_cache.view(-1, 2, 128)[meta.slot_mapping] = float("nan")
    k_cache.view(-1, 2, 128)[meta.slot_mapping[4]] = 0.0  # the skipped slot stays as it was
    v_cache.view(-1, 2, 128)[meta.slot_mapping[4]] = 0.0
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_rot = ta.rotary_store_kv(query.clone(), key, value, positions, cache, k_ref, v_ref, slots)
    ref = run_decode(q_rot, k_ref, v_ref, padded, num_splits=num_splits, max_seq_len=4096)
    out = torch.full_like(query, float("nan"))
    ta.paged_decode_attention(query, k_cache, v_cache, padded.block_tables, padded.seq_lens, 128 ** -0.5, 4096,
                              num_splits=num_splits, out=out,
                              rotary=ta.DecodeRotary(key, value, positions, cache, slots),
                              tiles=replace(ta.DECODE_TILES, merge_in_decode=merge_in_decode))
    assert torch.equal(v_cache, v_ref)
    assert rel_err(k_cache, k_ref) < 1e-3  # the same rotation; at most a last-bit difference
    assert rel_err(out, ref) < 2e-3
    assert torch.equal(out[6], torch.zeros_like(out[6]))
    twin_q, _ = reference.apply_rotary(query.float(), key.float(), positions, cache)
    twin_meta = AttentionMetadata(slots, meta.query_start_loc, seq_lens_t, meta.block_tables, 1, meta.max_seq_len,
                                  [1] * len(seq_lens), seq_lens_t.tolist())  # the twin gathers up to max_seq_len
    twin = reference_attention(twin_q, k_ref, v_ref, twin_meta)
    assert rel_err(out[:6], twin[:6]) < BF16_TOL


# ---------------------------------------------------------------- a model on the fused ops


def _fused_model(layers: int = 2):
    """A 2-layer model with the 1.5B model's layer shapes (random weights), Triton attention, bf16 on CUDA."""
    from r1serve.config import ModelConfig
    from r1serve.kernels.triton_attention import TritonAttention
    from r1serve.model.qwen2 import Qwen2ForCausalLM

    config = ModelConfig.from_hf_dict({
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": 1000, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": layers, "num_attention_heads": 12, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6})
    torch.manual_seed(random.randrange(1 << 30))
    model = Qwen2ForCausalLM(config, TritonAttention()).to(DEVICE, DTYPE).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else p * 4 if "bias" in name else p)
    return model


@pytest.fixture
def pdl(request: pytest.FixtureRequest):
    """Programmatic dependent launch on (param True) or off for the test, restored after."""
    _, ops = _triton_modules()
    with ops.pdl(request.param):
        yield request.param


@pytest.mark.parametrize("pdl", [False, True], indirect=True)
def test_model_on_fused_ops_matches_unfused_and_graph_equals_eager(pdl: bool) -> None:
    """Prefill 16 sequences, then a decode step at batch 1, 3 and 16: the fused table matches the element-wise
    one within bf16 tolerance, and a CUDA graph of the fused step replays exactly what eager computes (with
    programmatic dependent launch too: every kernel waits for its predecessor before reading its output)."""
    from r1serve.engine.cuda_graphs import DecodeGraphs
    from r1serve.model.layers import triton_kernel_ops

    model = _fused_model()
    cfg, block, cap = model.config, 16, 1024
    kv = torch.zeros(2, cfg.num_hidden_layers, 256, block, 2, 128, device=DEVICE, dtype=DTYPE)
    caches = [(kv[0, i], kv[1, i]) for i in range(cfg.num_hidden_layers)]
    prompt_lens = [random.randint(1, 250) for _ in range(16)]
    tables = [list(range(i * 16, i * 16 + 16)) for i in range(16)]
    model.set_ops(triton_kernel_ops())
    with torch.inference_mode():
        model(torch.randint(0, 1000, (sum(prompt_lens),), device=DEVICE),
              torch.cat([torch.arange(n, device=DEVICE) for n in prompt_lens]),
              build_metadata(prompt_lens, prompt_lens, tables, block, DEVICE), caches)
    graphs = DecodeGraphs(model, caches, 16, cap, block, cfg.hidden_size, torch.device(DEVICE))
    graphs.capture()
    for batch in (1, 3, 16):
        ids = torch.randint(0, 1000, (batch,), device=DEVICE)
        lens = [n + 1 for n in prompt_lens[:batch]]
        meta = build_metadata([1] * batch, lens, tables[:batch], block, DEVICE)
        meta.max_seq_len = cap  # the graph's bound: the same decode splits as the replay
        positions = torch.tensor([n - 1 for n in lens], device=DEVICE)
        with torch.inference_mode():
            replayed = graphs.run(ids, positions, meta.slot_mapping, meta.seq_lens, meta.block_tables).clone()
            model.set_ops(triton_kernel_ops())
            eager = model(ids, positions, meta, caches)
            model.set_ops(triton_kernel_ops(fused=False))
            unfused = model(ids, positions, meta, caches)
        assert torch.equal(replayed, eager), f"batch {batch}: graph replay differs from eager"
        assert rel_err(eager, unfused) < BF16_TOL


# ---------------------------------------------------------------- fp8 KV cache (e4m3, per-tensor scales)

FP8_SCALES = KVScales(k=0.7, v=0.05)  # not powers of two: the reciprocal's rounding is the twin's too
EXACT_FP8 = True  # the interpreter's float-to-fp8 conversion is not the GPU's: dev/interpret_kernels.py clears it


def fp8_caches(k_cache: torch.Tensor, v_cache: torch.Tensor,
               scales: KVScales = FP8_SCALES) -> tuple[torch.Tensor, torch.Tensor]:
    """A written bf16 cache pair quantized to fp8 with the twin's `quantize_kv`."""
    return quantize_kv(k_cache, FP8_KV_DTYPE, scales.k), quantize_kv(v_cache, FP8_KV_DTYPE, scales.v)


def assert_same_fp8(out: torch.Tensor, ref: torch.Tensor, scale: float) -> None:
    """Byte-equal on the GPU. Under the interpreter, whose conversion halves values that round up to a power of
    two and mis-rounds subnormals: 95% of the elements within one e4m3 step."""
    assert out.dtype == ref.dtype == FP8_KV_DTYPE
    if EXACT_FP8:
        assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
        return
    a, b = dequantize_kv(out, torch.float32, scale), dequantize_kv(ref, torch.float32, scale)
    close = (a - b).abs() <= 0.125 * b.abs() + 2.0 ** -9 * scale
    assert close.float().mean() > 0.95


def reference_fp8_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scales: KVScales = FP8_SCALES) -> torch.Tensor:
    """The twin in float32 over the fp8 cache itself (dequantized by `TorchAttention`)."""
    return TorchAttention().attend(query.float(), k_cache, v_cache, meta, query.shape[-1] ** -0.5, scales)


@pytest.mark.parametrize("block_size", [16, 128])
def test_fp8_store_kv_matches_twin_and_skips_padding(block_size: int) -> None:
    ta, _ = _triton_modules()
    _, _, _, k_cache, v_cache, meta = make_batch([37, 1, 5], [37, 50, 300], block_size=block_size)
    k_cache, v_cache = fp8_caches(k_cache, v_cache)
    qkv = torch.randn(43, (12 + 2 + 2) * 128, device=DEVICE, dtype=DTYPE) * 30  # some values past ±448 · scale
    key, value = qkv[:, 12 * 128:14 * 128].view(43, 2, 128), qkv[:, 14 * 128:].view(43, 2, 128)
    slots = meta.slot_mapping.clone()
    slots[torch.tensor([0, 7, 42], device=DEVICE)] = -1
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    TorchAttention().store_kv(key, value, k_ref, v_ref, slots, FP8_SCALES)
    ta.store_kv(key, value, k_cache, v_cache, slots, FP8_SCALES)
    assert_same_fp8(k_cache, k_ref, FP8_SCALES.k)
    assert_same_fp8(v_cache, v_ref, FP8_SCALES.v)
    assert not dequantize_kv(k_cache, torch.float32, 1.0).isnan().any()  # clamped, never NaN


@pytest.mark.parametrize("tokens", [1, 6, 300])
def test_fp8_rotary_store_matches_rotary_then_store(tokens: int) -> None:
    ta, ops = _triton_modules()
    cache = reference.rotary_cos_sin_cache(128, 8192, 10000.0).to(DEVICE)
    qkv = torch.randn(tokens, (12 + 2 + 2) * 128, device=DEVICE, dtype=DTYPE)
    q, k, v = qkv.split([12 * 128, 2 * 128, 2 * 128], dim=-1)
    q, k, v = q.view(tokens, 12, 128), k.view(tokens, 2, 128), v.view(tokens, 2, 128)
    positions = torch.randint(0, 8192, (tokens,), device=DEVICE)
    num_blocks = tokens // 16 + 3
    slots = torch.randperm(num_blocks * 16, device=DEVICE)[:tokens]
    slots[::3] = -1
    k_cache, v_cache = fp8_caches(torch.randn(num_blocks, 16, 2, 128, device=DEVICE, dtype=DTYPE),
                                  torch.randn(num_blocks, 16, 2, 128, device=DEVICE, dtype=DTYPE))
    k_ref, v_ref, k_twin, v_twin = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    q_ref, k_rot = ops.apply_rotary(q.clone(), k, positions, cache)
    ta.store_kv(k_rot, v, k_ref, v_ref, slots, FP8_SCALES)
    reference.rotary_store_kv(q.clone(), k, v, positions, cache, k_twin, v_twin, slots, FP8_SCALES)
    out = ta.rotary_store_kv(q, k, v, positions, cache, k_cache, v_cache, slots, FP8_SCALES)
    assert torch.equal(out, q_ref)  # q is not quantized
    assert_same_fp8(k_cache, k_ref, FP8_SCALES.k)
    assert_same_fp8(v_cache, v_ref, FP8_SCALES.v)
    assert_same_fp8(v_cache, v_twin, FP8_SCALES.v)
    # the twin's rotation may differ in a bf16 last bit, which can move a key to the next e4m3 value
    f32 = torch.float32
    if EXACT_FP8:
        assert rel_err(dequantize_kv(k_cache, f32, FP8_SCALES.k), dequantize_kv(k_twin, f32, FP8_SCALES.k)) < 1e-2
    else:
        assert_same_fp8(k_cache, k_twin, FP8_SCALES.k)


@pytest.mark.parametrize("batch", [1, 7, 33])
@pytest.mark.parametrize("num_splits", [1, 5, None])
def test_fp8_decode_matches_twin(batch: int, num_splits: int | None) -> None:
    ta, _ = _triton_modules()
    seq_lens = [random.choice(BOUNDARY_LENS) for _ in range(batch)]
    query, _, _, k_cache, v_cache, meta = make_batch([1] * batch, seq_lens)
    k_cache, v_cache = fp8_caches(k_cache, v_cache)
    out = ta.paged_decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, 128 ** -0.5,
                                    meta.max_seq_len, num_splits=num_splits, out=torch.full_like(query, float("nan")),
                                    kv_scales=FP8_SCALES)
    assert rel_err(out, reference_fp8_attention(query, k_cache, v_cache, meta)) < BF16_TOL


@pytest.mark.parametrize("merge_in_decode", [False, True])
@pytest.mark.parametrize("num_splits", [1, 5, None])
def test_fp8_decode_with_rotary_equals_rotary_store_then_decode(num_splits: int | None,
                                                                 merge_in_decode: bool) -> None:
    """The decode kernel with rotary and the fp8 store folded in: the cache and output of the fused rotary +
    store kernel followed by plain fp8 decode, and the twin's result; slot -1 and length 0 rows too; its splits
    merged by the merge kernel or by their last program."""
    ta, _ = _triton_modules()
    seq_lens = [5, 200, 64, 65, 1, 1000, 17]
    query, key, value, k_cache, v_cache, meta = make_batch([1] * len(seq_lens), seq_lens)
    k_cache, v_cache = fp8_caches(k_cache, v_cache)
    cache = reference.rotary_cos_sin_cache(128, 4096, 10000.0).to(DEVICE)
    positions = (meta.seq_lens - 1).long()
    slots = meta.slot_mapping.clone()
    slots[4] = -1
    seq_lens_t = meta.seq_lens.clone()
    seq_lens_t[6] = 0
    padded = AttentionMetadata(slots, meta.query_start_loc, seq_lens_t, meta.block_tables, 1, 4096,
                               [1] * len(seq_lens), seq_lens_t.tolist())
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_rot = ta.rotary_store_kv(query.clone(), key, value, positions, cache, k_ref, v_ref, slots, FP8_SCALES)
    ref = ta.paged_decode_attention(q_rot, k_ref, v_ref, padded.block_tables, padded.seq_lens, 128 ** -0.5, 4096,
                                    num_splits=num_splits, kv_scales=FP8_SCALES)
    out = torch.full_like(query, float("nan"))
    ta.paged_decode_attention(query, k_cache, v_cache, padded.block_tables, padded.seq_lens, 128 ** -0.5, 4096,
                              num_splits=num_splits, out=out,
                              rotary=ta.DecodeRotary(key, value, positions, cache, slots), kv_scales=FP8_SCALES,
                              tiles=replace(ta.DECODE_TILES, merge_in_decode=merge_in_decode))
    assert_same_fp8(v_cache, v_ref, FP8_SCALES.v)
    f32 = torch.float32
    assert rel_err(dequantize_kv(k_cache, f32, FP8_SCALES.k), dequantize_kv(k_ref, f32, FP8_SCALES.k)) < 1e-2
    assert rel_err(out, ref) < 5e-3
    assert torch.equal(out[6], torch.zeros_like(out[6]))
    twin_q, _ = reference.apply_rotary(query.float(), key.float(), positions, cache)
    twin_meta = AttentionMetadata(slots, meta.query_start_loc, seq_lens_t, meta.block_tables, 1, meta.max_seq_len,
                                  [1] * len(seq_lens), seq_lens_t.tolist())
    assert rel_err(out[:6], reference_fp8_attention(twin_q, k_ref, v_ref, twin_meta)[:6]) < BF16_TOL


@pytest.mark.parametrize("case", ["block_boundaries", "prefix_hits", "chunked_with_decodes"])
def test_fp8_prefill_matches_twin(case: str) -> None:
    ta, _ = _triton_modules()
    query_lens, seq_lens = PREFILL_CASES[case]
    query, _, _, k_cache, v_cache, meta = make_batch(query_lens, seq_lens)
    k_cache, v_cache = fp8_caches(k_cache, v_cache)
    out = ta.paged_prefill_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                     meta.query_start_loc, 128 ** -0.5, meta.max_query_len,
                                     out=torch.full_like(query, float("nan")), kv_scales=FP8_SCALES)
    assert rel_err(out, reference_fp8_attention(query, k_cache, v_cache, meta)) < BF16_TOL


def test_fp8_backend_store_then_attend_matches_twin() -> None:
    """TritonAttention over an fp8 cache: decode-only, mixed, and few long whole prompts (the SDPA path)."""
    ta, _ = _triton_modules()
    long = ta.SDPA_MIN_PROMPT
    for query_lens, seq_lens in (([1, 1, 1], [19, 1, 700]), ([12, 1, 40], [12, 90, 1000]), ([long], [long])):
        query, key, value, k_cache, v_cache, meta = make_batch(query_lens, seq_lens)
        k_cache, v_cache = fp8_caches(k_cache, v_cache)
        k_twin, v_twin = k_cache.clone(), v_cache.clone()
        backend = ta.TritonAttention()
        backend.store_kv(key, value, k_cache, v_cache, meta.slot_mapping, FP8_SCALES)
        out = backend.attend(query, k_cache, v_cache, meta, 128 ** -0.5, FP8_SCALES)
        TorchAttention().store_kv(key, value, k_twin, v_twin, meta.slot_mapping, FP8_SCALES)
        assert_same_fp8(k_cache, k_twin, FP8_SCALES.k)
        assert rel_err(out, reference_fp8_attention(query, k_twin, v_twin, meta)) < BF16_TOL
