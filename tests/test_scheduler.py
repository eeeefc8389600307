"""Scheduler with no model: token budget, chunked prefill, max_num_seqs, preemption, n-sample prefix sharing."""

from __future__ import annotations

from r1serve.engine.block_manager import BlockManager
from r1serve.engine.scheduler import Scheduler, SchedulerOutput
from r1serve.engine.sequence import Request, Sequence, SequenceStatus
from r1serve.sampling_params import SamplingParams


def make_request(prompt_len: int, n: int = 1, first_token: int = 0) -> Request:
    tokens = list(range(first_token, first_token + prompt_len))
    request = Request(f"r{first_token}", None, tokens, SamplingParams(n=n))
    request.seqs = [Sequence(request, i, list(tokens), prompt_len) for i in range(n)]
    return request


def fake_step(sched: Scheduler, out: SchedulerOutput) -> None:
    """Reads the step as the engine would: every sample becomes token 7 (the scheduler advanced the rest)."""
    for seq, token, _ in sched.update_from_output(out, [7] * out.num_sampling):
        seq.append_tokens([token])


def seqs_of(sched: Scheduler, out: SchedulerOutput) -> list[Sequence]:
    return [sched.seqs[item.seq_id] for item in out.scheduled]


def test_token_budget_chunks_a_long_prompt() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    seq = make_request(25).seqs[0]
    sched.add(seq)
    chunks = []
    while seq.num_computed_tokens < 25:
        out = sched.schedule()
        chunks.append(out.scheduled[0].num_new_tokens)
        assert out.num_batched_tokens <= 10
        fake_step(sched, out)
    assert chunks == [10, 10, 5]
    assert seq.num_tokens == 26  # sampled once, after the last chunk


def test_decodes_first_then_new_prefills_fill_the_budget() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=8)
    a = make_request(4).seqs[0]
    sched.add(a)
    fake_step(sched, sched.schedule())
    b = make_request(20, first_token=100).seqs[0]
    sched.add(b)
    out = sched.schedule()
    assert seqs_of(sched, out) == [a, b] and [s.num_new_tokens for s in out.scheduled] == [1, 7]


def test_max_num_seqs_caps_running() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(make_request(3, first_token=10 * i).seqs[0])
    out = sched.schedule()
    assert len(out.scheduled) == 2 and len(sched.waiting) == 1


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    sched.watermark_blocks = 0
    old, new = make_request(7).seqs[0], make_request(7, first_token=50).seqs[0]
    sched.add(old)
    sched.add(new)
    fake_step(sched, sched.schedule())  # both prefilled: 2 blocks each, 8 tokens of room each
    fake_step(sched, sched.schedule())  # both reach 8 tokens (block full)
    out = sched.schedule()  # each needs a third block; there are none: the newest is preempted
    assert out.preempted_seq_ids == [new.seq_id]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and len(new.block_table) == 0
    assert seqs_of(sched, out) == [old]
    assert sched.num_preemptions == 1
    assert sched.waiting[0] is new


def test_samples_of_one_prompt_wait_for_the_first_then_share_its_blocks() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=12)
    request = make_request(10, n=3)
    for seq in request.seqs:
        sched.add(seq)
    out = sched.schedule()  # the leader's whole prompt is scheduled: its full blocks are named at once
    siblings = [s for s in out.scheduled if s.spec.index > 0]
    assert [s.spec.index for s in out.scheduled] == [0, 1]  # the budget (12) leaves 2 tokens: one sibling fits
    assert [s.num_new_tokens for s in siblings] == [2]  # 8 of 10 prompt tokens were cached
    fake_step(sched, out)
    out = sched.schedule()
    assert [(s.spec.index, s.num_new_tokens) for s in out.scheduled] == [(0, 1), (1, 1), (2, 2)]
    assert all(s.block_table[:2] == request.seqs[0].block_table[:2] for s in request.seqs[1:])


def test_leader_chunked_prompt_holds_siblings_back() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=6)
    request = make_request(10, n=2)
    for seq in request.seqs:
        sched.add(seq)
    out = sched.schedule()
    assert [(s.spec.index, s.num_new_tokens) for s in out.scheduled] == [(0, 6)]  # first chunk only


def test_pending_sample_is_decoded_next_step_before_it_is_read() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    seq = make_request(5).seqs[0]
    sched.add(seq)
    first = sched.schedule()
    assert first.scheduled[0].samples and seq.num_pending == 1 and seq.num_computed_tokens == 5
    second = sched.schedule()  # the first step's token is not read yet: decode it from the device
    item = second.scheduled[0]
    assert (item.start, item.num_new_tokens, item.samples) == (5, 1, True)
    assert seq.num_pending == 2 and seq.num_tokens == 5


def test_no_step_past_max_tokens_while_the_last_sample_is_pending() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    request = make_request(5)
    request.max_tokens = 1
    sched.add(request.seqs[0])
    sched.schedule()
    assert sched.schedule().is_empty  # its one token is in flight: nothing more to run


def test_finish_frees_blocks_and_dequeues() -> None:
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    seq = make_request(9).seqs[0]
    sched.add(seq)
    fake_step(sched, sched.schedule())
    sched.finish(seq)
    assert sched.num_unfinished == 0 and bm.num_free_blocks == 16
    assert seq.status is SequenceStatus.FINISHED


def test_a_record_carries_the_chunk_and_its_pending_token_as_plain_data() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64)
    seq = make_request(5, first_token=40).seqs[0]
    sched.add(seq)
    first = sched.schedule().scheduled[0]
    assert (first.new_token_ids, first.pending_row, first.block_table.tolist()) == ([40, 41, 42, 43, 44], -1,
                                                                                     seq.block_table.tolist())
    second = sched.schedule().scheduled[0]  # decodes the first step's sample, row 0 of its tokens
    assert (second.new_token_ids, second.pending_row, second.start) == ([], 0, 5)
    seq.append_tokens([45, 46, 47])  # the engine's tokens (the first sample and two forced ones)
    assert first.new_token_ids == [40, 41, 42, 43, 44]  # a record does not follow its sequence


def test_a_growing_block_table_is_a_new_array_so_launched_records_keep_theirs() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64)
    seq = make_request(4).seqs[0]
    sched.add(seq)
    first = sched.schedule()
    fake_step(sched, first)
    second = sched.schedule()  # position 4 needs a second block
    assert len(first.scheduled[0].block_table) == 1 and len(second.scheduled[0].block_table) == 2
    assert second.scheduled[0].block_table is seq.block_table


def test_update_from_output_drops_samples_of_finished_sequences_and_older_epochs() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64)
    kept, voided, finished = (make_request(5, first_token=10 * i).seqs[0] for i in range(3))
    for seq in (kept, voided, finished):
        sched.add(seq)
    out = sched.schedule()
    sched.void_pending(voided)
    sched.finish(finished)
    accepted = sched.update_from_output(out, [101, 102, 103])
    assert accepted == [(kept, 101, 0)] and kept.num_pending == 0
    assert voided.num_pending == 0 and voided.num_computed_tokens == 4  # its last token is computed again
    again = sched.schedule()
    assert [(s.seq_id, s.start, s.samples) for s in again.scheduled if s.seq_id == voided.seq_id] == [
        (voided.seq_id, 4, True)]
