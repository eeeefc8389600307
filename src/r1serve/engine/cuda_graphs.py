"""CUDA graphs for decode steps: one captured forward per batch-size bucket, replayed with new inputs.

A decode step of a 1.5B model launches hundreds of small kernels; run eagerly, launching them costs more
than running them. Each bucket's graph is captured once at start-up (largest first, all into one memory
pool) over static input buffers; a step copies its inputs into the first `batch` rows, pads the rest
(slot -1: nothing is stored; length 0: nothing is read) and replays the smallest bucket that fits. Only the
forward is captured; logits and sampling run after it on the rows that are real.
"""

from __future__ import annotations

import logging
import time

import torch

from r1serve.kernels.attention import AttentionMetadata

logger = logging.getLogger("r1serve")


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_batch (and max_batch itself)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 max_batch: int, max_model_len: int, block_size: int, hidden_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.max_model_len = max_model_len
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        max_blocks = -(-max_model_len // block_size)
        i64, i32 = dict(dtype=torch.int64, device=device), dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(self.max_batch, **i64)
        self.positions = torch.zeros(self.max_batch, **i64)
        self.slot_mapping = torch.full((self.max_batch,), -1, **i64)
        self.seq_lens = torch.zeros(self.max_batch, **i32)
        self.block_tables = torch.zeros(self.max_batch, max_blocks, **i32)
        self.query_start_loc = torch.arange(self.max_batch + 1, **i32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _metadata(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch], query_start_loc=self.query_start_loc[:batch + 1],
            seq_lens=self.seq_lens[:batch], block_tables=self.block_tables[:batch], max_query_len=1,
            max_seq_len=self.max_model_len, query_lens_cpu=[1] * batch, seq_lens_cpu=[self.max_model_len] * batch,
        )

    def forward(self, batch: int) -> torch.Tensor:
        """The forward a bucket's graph captures, run eagerly on the static buffers."""
        return self.model(self.input_ids[:batch], self.positions[:batch], self._metadata(batch), self.kv_caches)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        for batch in reversed(self.buckets):
            self.forward(batch)  # warm-up: autotuning and lazy initialisation stay out of the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[batch] = self.forward(batch)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs for decode batches up to %d in %.1f s",
                    len(self.graphs), self.max_batch, time.perf_counter() - start)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            seq_lens: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """Inputs for `batch` real rows (on the device) → hidden states [batch, hidden] of those rows."""
        batch = input_ids.shape[0]
        bucket = next(b for b in self.buckets if b >= batch)
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.slot_mapping[:batch].copy_(slot_mapping)
        self.seq_lens[:batch].copy_(seq_lens)
        if batch < bucket:  # padding rows: store nothing, read nothing
            self.slot_mapping[batch:bucket].fill_(-1)
            self.seq_lens[batch:bucket].fill_(0)
        self.block_tables[:batch, :block_tables.shape[1]].copy_(block_tables)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:batch]
