"""`InputPacker`: one step's inputs packed into one int64 buffer and split back into the model's tensors, checked
against the layout built column by column (`build_metadata`) for a step that mixes a prefill chunk, a decode whose
token is known and a decode whose token the step in flight sampled."""

from __future__ import annotations

from array import array

import torch

from r1serve.engine.input_batch import InputPacker
from r1serve.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from r1serve.engine.sequence import Request, Sequence
from r1serve.kernels.attention import build_metadata
from r1serve.sampling_params import SamplingParams

BLOCK = 4


def make_seq(tokens: list[int], blocks: list[int]) -> Sequence:
    request = Request("r", None, tokens, SamplingParams())
    seq = Sequence(request, 0, list(tokens), len(tokens), block_table=array("q", blocks))
    request.seqs = [seq]
    return seq


def record(seq: Sequence, start: int, num_new: int, pending_row: int = -1) -> ScheduledSeq:
    """A sampling chunk of `seq` as the scheduler writes it (a pending last token is not on the host)."""
    end = start + num_new - (pending_row >= 0)
    return ScheduledSeq(seq.spec, seq.seq_id, start, num_new, seq.token_ids[start:end], pending_row, True, 0,
                        seq.block_table)


def test_pack_matches_the_column_layout() -> None:
    prefill = make_seq(list(range(100, 110)), [7, 3, 9])  # tokens 4..9 this step (a chunk after 4 cached)
    known = make_seq(list(range(200, 217)), [1, 2, 4, 5, 6])  # decode of its last known token (position 16)
    pending = make_seq(list(range(300, 305)), [8, 0])  # decode of a token sampled by the step in flight
    sched = SchedulerOutput([record(prefill, 4, 6), record(known, 16, 1), record(pending, 5, 1, pending_row=5)],
                            num_sampling=3)
    inputs = InputPacker(BLOCK, torch.device("cpu")).pack(sched)

    tables = [[7, 3, 9], [1, 2, 4, 5, 6], [8, 0]]
    want = build_metadata([6, 1, 1], [10, 17, 6], tables, BLOCK)
    meta = inputs.meta
    assert meta.block_tables.tolist() == [[7, 3, 9, 0, 0], [1, 2, 4, 5, 6], [8, 0, 0, 0, 0]]
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        assert torch.equal(getattr(meta, name), getattr(want, name)), name
        assert getattr(meta, name).dtype == getattr(want, name).dtype, name
    assert meta.slot_mapping.tolist() == [3 * 4 + 0, 3 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3, 9 * 4 + 0, 9 * 4 + 1,
                                          6 * 4 + 0, 0 * 4 + 1]
    assert (meta.max_query_len, meta.max_seq_len, meta.seq_lens_cpu) == (6, 17, [10, 17, 6])
    assert inputs.input_ids.tolist() == [104, 105, 106, 107, 108, 109, 216, 0]  # the last one is filled on device
    assert inputs.positions.tolist() == [4, 5, 6, 7, 8, 9, 16, 5]
    assert inputs.logits_indices.tolist() == [5, 6, 7]
    assert (inputs.pending_dst.tolist(), inputs.pending_src.tolist()) == ([7], [5])


def test_list_and_array_tables_give_the_same_metadata() -> None:
    lists = [[5, 1], [2], [4, 3, 0]]
    a = build_metadata([2, 1, 3], [6, 3, 9], lists, BLOCK)
    b = build_metadata([2, 1, 3], [6, 3, 9], [array("q", t) for t in lists], BLOCK)
    assert torch.equal(a.block_tables, b.block_tables) and torch.equal(a.slot_mapping, b.slot_mapping)
    assert a.block_tables.tolist() == [[5, 1, 0], [2, 0, 0], [4, 3, 0]]
