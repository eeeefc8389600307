"""Block manager: allocation, reference counts, prefix sharing by chained hashes, LRU eviction of cached blocks.

The manager knows no sequences: it takes token ids and block ids and returns what it handed out or matched."""

from __future__ import annotations

from r1serve.engine.block_manager import BlockManager


def run_prefill(bm: BlockManager, tokens: list[int]) -> list[int]:
    """What the scheduler does for a whole-prompt step: match, allocate, compute, name the full blocks; returns
    the block table."""
    match = bm.match_prefix(tokens)
    new_blocks = bm.allocate(len(match.block_ids), len(tokens))
    assert new_blocks is not None
    table = match.block_ids + new_blocks
    hashes = match.block_hashes + bm.register_full_blocks(tokens, len(tokens), table, match.block_hashes)
    assert len(hashes) == len(tokens) // bm.block_size
    return table


def test_allocate_and_free_counts_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.blocks_needed(0, 10) == 3 and bm.blocks_needed(3, 12) == 0
    table = bm.allocate(0, 10)
    assert table is not None and len(table) == 3 and bm.num_free_blocks == 5
    assert bm.allocate(3, 12) == []  # room for two more tokens in the last block
    bm.free(table)
    assert bm.num_free_blocks == 8


def test_allocate_refuses_when_out_of_blocks() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    assert not bm.can_allocate(0, 12)
    assert bm.allocate(0, 12) is None
    assert bm.num_free_blocks == 2


def test_repeated_prompt_shares_full_blocks_and_leaves_one_token() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    first = run_prefill(bm, list(range(10)))
    second = bm.match_prefix(list(range(10)))
    assert second.num_tokens == 8  # two full blocks; the partial third is recomputed
    assert second.block_ids == first[:2] and len(second.block_hashes) == 2
    assert all(bm.blocks[b].ref_count == 2 for b in second.block_ids)
    exact = bm.match_prefix(list(range(8)))  # a prompt of exactly two blocks still computes its last token
    assert exact.num_tokens == 4


def test_prefix_match_stops_at_first_different_block() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    run_prefill(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.match_prefix([1, 2, 3, 4, 0, 6, 7, 8, 9]).num_tokens == 4
    # same second block content after a different first block: the chained hash must not match it
    assert bm.match_prefix([0, 2, 3, 4, 5, 6, 7, 8, 9]).num_tokens == 0


def test_a_refused_match_given_back_leaves_the_counts_as_they_were() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    table = run_prefill(bm, list(range(9)))
    match = bm.match_prefix(list(range(9)))
    assert bm.blocks[table[0]].ref_count == 2
    bm.free(match.block_ids)
    assert bm.blocks[table[0]].ref_count == 1 and bm.num_free_blocks == 1


def test_freed_blocks_stay_cached_until_evicted() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.free(run_prefill(bm, list(range(9))))
    assert bm.num_free_blocks == 4
    again = bm.match_prefix(list(range(9)))
    assert again.num_tokens == 8  # hit although the owner finished
    bm.free(again.block_ids)
    hog = bm.allocate(0, 16)  # takes every block, evicting the cached ones
    assert hog is not None and bm.cached == {}
    bm.free(hog)
    assert bm.match_prefix(list(range(9))).num_tokens == 0


def test_prefix_caching_off_never_matches() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    table = bm.allocate(0, 9)
    assert table is not None
    assert bm.register_full_blocks(list(range(9)), 9, table, []) == []
    assert bm.match_prefix(list(range(9))).num_tokens == 0
    assert bm.cached == {}


def test_blocks_held_by_one_holder_leave_the_cache_and_shared_ones_stay() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    first = run_prefill(bm, list(range(9)))
    second = run_prefill(bm, list(range(8)) + [50, 51, 52, 53, 54])  # shares block 0 and 1, owns block 2
    bm.uncache_own_blocks(second)
    assert bm.blocks[first[0]].hash is not None and bm.blocks[second[2]].hash is None


def test_cache_hit_counters() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, list(range(9)))
    bm.match_prefix(list(range(9)))
    assert (bm.num_cache_queries, bm.num_cache_hits) == (18, 8)
