"""Paged KV-cache bookkeeping: which cache blocks each sequence owns, shared prefixes, and what is free.

Blocks are reference-counted. With prefix caching on, every full block is named by a hash chained over all
tokens before it; a sequence admitted later looks its leading full blocks up by hash and shares them instead
of recomputing them (repeated prompts, the n samples of one prompt, multi-turn chats). A block whose last
owner finishes keeps its hash and its data and goes to the back of the free queue; it is reused as a cache
hit until it reaches the front and is handed out to someone else (least recently freed goes first).
The manager touches no tensors: it only hands out block ids.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass

from r1serve.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()  # the tokens the hash names, to rule out hash collisions


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

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(seq, num_new_tokens) + reserve <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give `seq` the blocks its next `num_new_tokens` tokens need; False (and no change) if too few are free."""
        if seq.num_computed_tokens + num_new_tokens <= len(seq.block_table) * self.block_size:
            return True  # the common case (a decode inside its last block): nothing to hand out
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self.free_queue):
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())
        return True

    def match_prefix(self, seq: Sequence) -> int:
        """Share the cached blocks of `seq`'s leading full blocks; returns the number of tokens matched.

        At least one token is always left to compute, so that the step that admits `seq` yields logits.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        parent = None
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = hash((parent, tokens))
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._share(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            parent = h
        matched = len(seq.block_table) * self.block_size
        seq.num_computed_tokens = matched
        self.num_cache_queries += seq.num_tokens
        self.num_cache_hits += matched
        return matched

    def register_full_blocks(self, seq: Sequence) -> None:
        """Name the full blocks of known, scheduled tokens, so that later sequences can share them (their KV is
        written by a step launched before any step that reads it)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        if num_full <= len(seq.block_hashes):
            return
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = hash((parent, tokens))
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if h not in self.cached and block.hash is None:
                block.hash, block.token_ids = h, tokens
                self.cached[h] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s hold on its blocks; the tail goes first so that prefixes stay cached longest."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        seq.block_table = array("q")
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def uncache_own_blocks(self, seq: Sequence) -> None:
        """Take the blocks that `seq` alone holds out of the prefix cache (a failed step may not have written them)."""
        for block_id in seq.block_table:
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
