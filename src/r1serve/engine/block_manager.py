"""Paged KV-cache bookkeeping: which cache blocks each sequence owns, shared prefixes, and what is free.

Blocks are reference-counted. With prefix caching on, every full block is named by a hash chained over all
tokens before it; a sequence admitted later looks its leading full blocks up by hash and shares them instead
of recomputing them (repeated prompts, the n samples of one prompt, multi-turn chats). A block whose last
owner finishes keeps its hash and its data and goes to the back of the free queue; it is reused as a cache
hit until it reaches the front and is handed out to someone else (least recently freed goes first).
The manager touches no tensors and no sequences: it hands out block ids and returns what it matched
(`PrefixMatch`); the scheduler writes them into its sequences.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()  # the tokens the hash names, to rule out hash collisions


@dataclass
class PrefixMatch:
    """The cached blocks found for a prompt's leading full blocks, now shared with the caller."""

    block_ids: list[int]
    block_hashes: list[int]  # the hash that names each of them
    num_tokens: int  # the tokens they hold (len(block_ids) * block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.num_cache_queries = 0  # prompt tokens looked up
        self.num_cache_hits = 0  # prompt tokens found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (never used, or cached with no owner)."""
        return len(self.free_queue)

    def blocks_needed(self, num_held_blocks: int, num_tokens: int) -> int:
        """Blocks to add to `num_held_blocks` so that they hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - num_held_blocks)

    def can_allocate(self, num_held_blocks: int, num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(num_held_blocks, num_tokens) + reserve <= self.num_free_blocks

    def allocate(self, num_held_blocks: int, num_tokens: int) -> list[int] | None:
        """The new block ids that take a holder of `num_held_blocks` to `num_tokens` tokens ([] if none is
        needed); None (and no change) if too few are free."""
        needed = self.blocks_needed(num_held_blocks, num_tokens)
        if needed > len(self.free_queue):
            return None
        return [self._take_free_block() for _ in range(needed)]

    def match_prefix(self, token_ids: list[int]) -> PrefixMatch:
        """Shares the cached blocks of the leading full blocks of `token_ids` (a sequence holding no block yet)
        and returns them: the caller owns them from now on (`free` gives them back).

        At least one token is always left to compute, so that the step that admits the sequence yields logits.
        """
        match = PrefixMatch([], [], 0)
        if not self.enable_prefix_caching:
            return match
        parent = None
        for i in range((len(token_ids) - 1) // self.block_size):
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = hash((parent, tokens))
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._share(block_id)
            match.block_ids.append(block_id)
            match.block_hashes.append(h)
            parent = h
        match.num_tokens = len(match.block_ids) * self.block_size
        self.num_cache_queries += len(token_ids)
        self.num_cache_hits += match.num_tokens
        return match

    def register_full_blocks(self, token_ids: list[int], num_tokens: int, block_table: array[int],
                             block_hashes: list[int]) -> list[int]:
        """Names the full blocks among the first `num_tokens` of `token_ids` (known and scheduled: their KV is
        written by a step launched before any step that reads it) that `block_hashes` does not name yet, so that
        later sequences can share them; returns their hashes, which extend `block_hashes`."""
        new_hashes: list[int] = []
        num_full = num_tokens // self.block_size
        if not self.enable_prefix_caching or num_full <= len(block_hashes):
            return new_hashes  # the common case (a decode inside its last block)
        parent = block_hashes[-1] if block_hashes else None
        for i in range(len(block_hashes), num_full):
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = hash((parent, tokens))
            new_hashes.append(h)
            block = self.blocks[block_table[i]]
            if h not in self.cached and block.hash is None:
                block.hash, block.token_ids = h, tokens
                self.cached[h] = block.block_id
            parent = h
        return new_hashes

    def free(self, block_ids: Sequence[int]) -> None:
        """Drops one hold on each block; the tail goes first so that prefixes stay cached longest."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    def uncache_own_blocks(self, block_ids: Sequence[int]) -> None:
        """Takes the blocks held by this holder alone out of the prefix cache (a failed step may not have
        written them)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 1 and block.hash is not None:
                del self.cached[block.hash]
                block.hash, block.token_ids = None, ()

    def reset_prefix_cache(self) -> None:
        for block_id in list(self.cached.values()):
            self.blocks[block_id].hash = None
            self.blocks[block_id].token_ids = ()
        self.cached.clear()

    def _share(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached content
            del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id
