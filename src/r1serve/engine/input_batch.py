"""One step's model inputs, packed on the host and sent to the device in a single copy.

A step needs token ids, positions, KV slots, the rows to sample from, and the attention metadata (query starts,
sequence lengths, block tables). Made one tensor at a time, that is about ten small synchronous host-to-device
copies per step, which at batch 1 costs as much as a tenth of the step. Here they are written into one int64
buffer (pinned on CUDA), copied with one non-blocking transfer, and split into views on the device. A CUDA
event keeps the next step from overwriting the pinned buffer before its copy has finished.

A decode whose last token was sampled by the step still in flight has no id on the host yet (its record's
`pending_row`): its slot gets a placeholder, and `pending_dst` / `pending_src` say which input rows to fill from
which rows of that step's sampled tokens, on the device. Packing reads the step's records alone.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from r1serve.engine.scheduler_output import SchedulerOutput
from r1serve.kernels.attention import AttentionMetadata, paged_layout


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampling] int64: rows of the hidden states to sample from
    pending_dst: torch.Tensor  # [num_pending] int64: input rows whose token the step in flight sampled
    pending_src: torch.Tensor  # [num_pending] int64: their rows in that step's sampled tokens


class InputPacker:
    def __init__(self, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self.device = device
        self.pinned = device.type == "cuda"
        self.staging = torch.empty(0, dtype=torch.int64)
        self.copied: torch.cuda.Event | None = None

    def pack(self, sched: SchedulerOutput) -> StepInputs:
        cols, query_lens = _columns(sched, self.block_size)
        sizes = [len(c) for c in cols]
        device_buf = self._to_device(_pack_int64(cols))
        ids, positions, slots, logits_idx, starts, seq_lens, tables, pend_dst, pend_src = device_buf.split(sizes)
        num_seqs = len(seq_lens)
        width = len(tables) // max(num_seqs, 1)
        seq_lens_cpu = cols[5]
        meta = AttentionMetadata(
            slot_mapping=slots, query_start_loc=starts.to(torch.int32), seq_lens=seq_lens.to(torch.int32),
            block_tables=tables.view(num_seqs, width).to(torch.int32), max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens_cpu, default=0), query_lens_cpu=query_lens, seq_lens_cpu=seq_lens_cpu,
        )
        return StepInputs(ids, positions, meta, logits_idx, pend_dst, pend_src)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        if not self.pinned:
            return host.to(self.device)
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has left the staging buffer
        if self.staging.numel() < host.numel():
            self.staging = torch.empty(max(host.numel(), 2 * self.staging.numel()), dtype=torch.int64,
                                       pin_memory=True)
        staged = self.staging[: host.numel()]
        staged.copy_(host)
        out = staged.to(self.device, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        return out


def _pack_int64(cols: list[list[int] | array[int]]) -> torch.Tensor:
    """The columns end to end in one int64 tensor (through a C array: half the time of `torch.tensor(list)`, and
    the block tables, already an int64 array, are one copy)."""
    packed = array("q")
    for col in cols:
        packed.extend(col)
    return torch.frombuffer(packed, dtype=torch.int64) if packed else torch.empty(0, dtype=torch.int64)


def _columns(sched: SchedulerOutput, block_size: int) -> tuple[list[list[int] | array[int]], list[int]]:
    """ids, positions, slots, logits indices, query starts, sequence lengths, flat padded block tables, pending
    input rows and their rows in the previous step's samples; and the query lengths. One pass over the rows (a
    decode row, the common one at high concurrency, takes no slice or range)."""
    ids: list[int] = []
    positions: list[int] = []
    logits_idx: list[int] = []
    pend_dst: list[int] = []
    pend_src: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    block_tables = []
    for s in sched.scheduled:
        start, num = s.start, s.num_new_tokens
        end = start + num
        ids.extend(s.new_token_ids)
        if s.pending_row >= 0:  # the last token is the in-flight step's sample
            pend_dst.append(len(ids))
            pend_src.append(s.pending_row)
            ids.append(0)
        if num == 1:
            positions.append(start)
        else:
            positions.extend(range(start, end))
        if s.samples:
            logits_idx.append(len(ids) - 1)
        query_lens.append(num)
        seq_lens.append(end)
        block_tables.append(s.block_table)
    slots, starts, tables, _ = paged_layout(query_lens, seq_lens, block_tables, block_size)
    return [ids, positions, slots, logits_idx, starts, seq_lens, tables, pend_dst, pend_src], query_lens
