"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step has a token budget (`max_num_batched_tokens`). Running sequences go first, oldest first: a decoding
sequence takes one token, a sequence still prefilling takes the rest of its prompt or whatever budget is left
(chunked prefill). When the KV cache has no block left for a running sequence, the newest running sequence is
preempted by recompute: its blocks are freed and it goes back to the front of the queue. Waiting sequences are
admitted while budget, `max_num_seqs` and blocks allow, after a prefix-cache lookup. `SchedulerOutput`
(engine/scheduler_output.py), plain records of what to compute, is the only thing the model runner sees.

The scheduler is the one writer of a sequence's scheduling state. Scheduling advances `num_computed_tokens` at
once and counts a sample as pending, so that the next step can be scheduled while this one still runs on the
device; it writes the blocks the block manager hands out or matched. Once a step's tokens are read,
`update_from_output` retires its pending samples (dropping those of finished sequences and of older epochs) and
hands the rest to the engine, which appends them: the engine owns what follows a token (detokenizing, stop
checks, the R1 token rules), and when it changes a sequence's tokens itself it asks `void_pending`. A sequence
whose pending sample will reach its `max_tokens` is left out: it ends when that sample is read.
"""

from __future__ import annotations

from array import array
from collections import deque

from r1serve.engine.block_manager import BlockManager, PrefixMatch
from r1serve.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from r1serve.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}  # every sequence added and not finished, by seq_id
        self.num_preemptions = 0
        # Admission leaves a few blocks free so that running sequences do not preempt at once.
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues (if it was ever added) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)
        self.seqs.pop(seq.seq_id, None)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted_seq_ids:
            self._schedule_waiting(out, budget)
        return out

    def update_from_output(self, sched: SchedulerOutput, sampled: list[int]) -> list[tuple[Sequence, int, int]]:
        """A step's sampled tokens are read: its pending samples are retired. Returns (sequence, token, row of
        the step's samples) for each sample still wanted, in order; the engine appends them. A sample of a
        sequence that finished meanwhile, or of an older epoch (its tokens changed while it ran), is dropped."""
        accepted = []
        row = 0
        for item in sched.scheduled:
            if not item.samples:
                continue
            seq = self.seqs.get(item.seq_id)
            if seq is not None and item.epoch == seq.epoch:
                seq.num_pending -= 1
                accepted.append((seq, sampled[row], row))
            row += 1
        return accepted

    def void_pending(self, seq: Sequence) -> None:
        """The samples in flight for `seq` no longer follow its tokens (the engine appended some itself, or its
        answer's grammar started after they were drawn): they are dropped. With no token left to compute, the
        last one is computed again (its KV is there), so that the next step samples."""
        seq.epoch += 1
        seq.num_pending = 0
        if seq.num_computed_tokens == seq.num_tokens:
            seq.num_computed_tokens -= 1

    def refresh(self, items: list[ScheduledSeq]) -> SchedulerOutput:
        """The same chunks of the sequences still live, with the tokens read since they were scheduled: for a
        step run again once the step before it has been read (`LLMEngine._isolate`)."""
        out = SchedulerOutput()
        for item in items:
            seq = self.seqs.get(item.seq_id)
            if seq is None:
                continue
            tokens = seq.token_ids
            known = item.end <= len(tokens)
            out.scheduled.append(ScheduledSeq(
                item.spec, item.seq_id, item.start, item.num_new_tokens, tokens[item.start:item.end],
                -1 if known else item.pending_row, item.samples, item.epoch, item.block_table,
                item.output_token_ids))
            out.num_sampling += item.samples
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(len(seq.token_ids) + seq.num_pending - seq.num_computed_tokens, budget)
            if num_new <= 0 or (seq.num_pending and _ends_by_length(seq)):
                i += 1  # nothing to run before its pending token is read
                continue
            while not self._allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted_seq_ids.append(victim.seq_id)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            self._advance(out, seq, num_new)
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending or self._waits_for_leader(seq):
                break
            num_new = self._admit(seq, budget)
            if num_new is None:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._advance(out, seq, num_new)
            budget -= num_new

    def _advance(self, out: SchedulerOutput, seq: Sequence, num_new: int) -> None:
        """Schedule `num_new` tokens of `seq`: its record goes to `out`; they count as computed, and a sample at
        the end as pending."""
        start = seq.num_computed_tokens
        end = start + num_new
        tokens = seq.token_ids
        num_known = len(tokens)
        samples = end == num_known + seq.num_pending  # reaches the last token, pending ones too
        new_ids = [tokens[start]] if num_new == 1 and end <= num_known else tokens[start:end]
        spec = seq.spec
        out.scheduled.append(ScheduledSeq(
            spec, seq.seq_id, start, num_new, new_ids, -1 if end <= num_known else seq.sample_row, samples,
            seq.epoch, seq.block_table, seq.output_ids[:] if spec.needs_penalties else None))
        seq.num_computed_tokens = end
        if samples:
            seq.num_pending += 1
            seq.sample_row = out.num_sampling
            out.num_sampling += 1
        new_hashes = self.block_manager.register_full_blocks(tokens, min(end, num_known), seq.block_table,
                                                             seq.block_hashes)
        if new_hashes:
            seq.block_hashes.extend(new_hashes)

    def _allocate(self, seq: Sequence, num_new: int) -> bool:
        """Gives `seq` the blocks its next `num_new` tokens need; False (and no change) if too few are free."""
        num_tokens = seq.num_computed_tokens + num_new
        if num_tokens <= len(seq.block_table) * self.block_manager.block_size:
            return True  # the common case (a decode inside its last block): nothing to hand out
        new_blocks = self.block_manager.allocate(len(seq.block_table), num_tokens)
        if new_blocks is None:
            return False
        seq.block_table = seq.block_table + array("q", new_blocks)  # a new array: launched steps keep theirs
        return True

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Look the prefix up and allocate the first chunk; None (and no change) if the blocks are not there."""
        bm = self.block_manager
        match = PrefixMatch([], [], 0) if _needs_prompt_logits(seq) else bm.match_prefix(seq.token_ids)
        if seq.num_output_tokens == 0:
            seq.num_cached_tokens = match.num_tokens
        num_new = min(seq.num_tokens - match.num_tokens, budget)
        num_held = len(match.block_ids)
        if not bm.can_allocate(num_held, match.num_tokens + num_new, reserve=self.watermark_blocks):
            bm.free(match.block_ids)
            return None
        new_blocks = bm.allocate(num_held, match.num_tokens + num_new)
        assert new_blocks is not None  # can_allocate said so
        seq.block_table = array("q", match.block_ids + new_blocks)
        seq.block_hashes = match.block_hashes
        seq.num_computed_tokens = match.num_tokens
        return num_new

    def _waits_for_leader(self, seq: Sequence) -> bool:
        """Samples 2..n of a prompt wait until the first sample's prompt is cached, then share it."""
        leader = seq.request.prefill_leader
        return (
            leader is not seq
            and self.block_manager.enable_prefix_caching
            and leader.status is not SequenceStatus.FINISHED
            and leader.num_computed_tokens < leader.num_prompt_tokens
        )

    def _preempt(self, seq: Sequence) -> None:  # a pending sample stays valid: it is appended when read
        self.running.remove(seq)
        self._free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _free(self, seq: Sequence) -> None:
        """Gives the blocks of `seq` back; it is to be computed again from its first token."""
        self.block_manager.free(seq.block_table)
        seq.block_table = array("q")
        seq.block_hashes = []
        seq.num_computed_tokens = 0


def _needs_prompt_logits(seq: Sequence) -> bool:
    """A prompt whose logprobs are still to compute needs the logits of every position: a cached prefix has
    none, so it skips the prefix cache (its siblings do not: only the first sample reports them)."""
    recorded = seq.request.prompt_logprobs
    return recorded is not None and seq.index == 0 and len(recorded) < seq.num_prompt_tokens


def _ends_by_length(seq: Sequence) -> bool:
    """Whether the pending samples bring `seq` to its `max_tokens` (so scheduling more would be wasted)."""
    return seq.num_output_tokens + seq.num_pending >= seq.request.max_tokens > 0


def sampling_record(seq: Sequence) -> ScheduledSeq:
    """The record of a step that computes the last token of `seq` again and samples the one after it, without
    scheduling anything: for tests and benchmarks that drive the sampler or the runner alone."""
    start = seq.num_tokens - 1
    return ScheduledSeq(seq.spec, seq.seq_id, start, 1, seq.token_ids[start:], -1, True, seq.epoch, seq.block_table,
                        seq.output_ids[:] if seq.spec.needs_penalties else None)
