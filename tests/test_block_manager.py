"""Block manager: allocation, reference counts, prefix sharing by chained hashes, LRU eviction of cached blocks."""

from __future__ import annotations

from r1serve.engine.block_manager import BlockManager
from r1serve.engine.sequence import Request, Sequence
from r1serve.sampling_params import SamplingParams


def make_seq(tokens: list[int]) -> Sequence:
    request = Request("r", None, tokens, SamplingParams())
    seq = Sequence(request, 0, list(tokens), len(tokens))
    request.seqs.append(seq)
    return seq


def run_prefill(bm: BlockManager, seq: Sequence) -> None:
    """What the engine does for a whole-prompt step: allocate, compute, name the full blocks."""
    bm.match_prefix(seq)
    bm.allocate(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.register_full_blocks(seq)


def test_allocate_and_free_counts_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    assert bm.blocks_needed(seq, 10) == 3
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(seq)
    assert bm.num_free_blocks == 8 and len(seq.block_table) == 0


def test_allocate_refuses_when_out_of_blocks() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(list(range(12)))
    assert not bm.can_allocate(seq, 12)
    assert bm.allocate(seq, 12) is False
    assert bm.num_free_blocks == 2 and len(seq.block_table) == 0


def test_repeated_prompt_shares_full_blocks_and_leaves_one_token() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    first = make_seq(list(range(10)))
    run_prefill(bm, first)
    second = make_seq(list(range(10)))
    assert bm.match_prefix(second) == 8  # two full blocks; the partial third is recomputed
    assert second.block_table == first.block_table[:2]
    assert all(bm.blocks[b].ref_count == 2 for b in second.block_table)
    exact = make_seq(list(range(8)))  # a prompt of exactly two blocks still computes its last token
    assert bm.match_prefix(exact) == 4


def test_prefix_match_stops_at_first_different_block() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    run_prefill(bm, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = make_seq([1, 2, 3, 4, 0, 6, 7, 8, 9])
    assert bm.match_prefix(other) == 4
    # same second block content after a different first block: the chained hash must not match it
    shifted = make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.match_prefix(shifted) == 0


def test_freed_blocks_stay_cached_until_evicted() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq(list(range(9)))
    run_prefill(bm, seq)
    bm.free(seq)
    assert bm.num_free_blocks == 4
    again = make_seq(list(range(9)))
    assert bm.match_prefix(again) == 8  # hit although the owner finished
    bm.free(again)
    hog = make_seq([100 + i for i in range(16)])
    bm.allocate(hog, 16)  # takes every block, evicting the cached ones
    assert bm.cached == {}
    bm.free(hog)
    assert bm.match_prefix(make_seq(list(range(9)))) == 0


def test_prefix_caching_off_never_matches() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    run_prefill(bm, make_seq(list(range(9))))
    assert bm.match_prefix(make_seq(list(range(9)))) == 0
    assert bm.cached == {}


def test_cache_hit_counters() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, make_seq(list(range(9))))
    bm.match_prefix(make_seq(list(range(9))))
    assert (bm.num_cache_queries, bm.num_cache_hits) == (18, 8)
