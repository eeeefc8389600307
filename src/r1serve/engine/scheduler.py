"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step has a token budget (`max_num_batched_tokens`). Running sequences go first, oldest first: a decoding
sequence takes one token, a sequence still prefilling takes the rest of its prompt or whatever budget is left
(chunked prefill). When the KV cache has no block left for a running sequence, the newest running sequence is
preempted by recompute: its blocks are freed and it goes back to the front of the queue. Waiting sequences are
admitted while budget, `max_num_seqs` and blocks allow, after a prefix-cache lookup. `SchedulerOutput` is the
only thing the model runner sees.

Scheduling advances `num_computed_tokens` at once and counts a sample as pending, so the next step can be scheduled
while this one still runs on the device (the engine reads the tokens afterwards). A sequence whose pending sample
will reach its `max_tokens` is left out: it ends when that sample is read.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from r1serve.engine.block_manager import BlockManager
from r1serve.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from r1serve.engine.structured import TokenMasks


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens [start, start + num_new_tokens) run this step
    start: int  # num_computed_tokens before this step
    samples: bool  # the chunk reaches the end of the sequence, so the step samples its next token
    epoch: int  # the sequence's epoch when scheduled: a sample of an older epoch is dropped

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    logprobs: bool = False  # some live request asks for logprobs (set by the engine; engine/logprobs.py)
    token_masks: TokenMasks | None = None  # structured output: the engine's masks of the constrained rows

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Admission leaves a few blocks free so that running sequences do not preempt at once.
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues (if it was ever added) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(len(seq.token_ids) + seq.num_pending - seq.num_computed_tokens, budget)
            if num_new <= 0 or (seq.num_pending and _ends_by_length(seq)):
                i += 1  # nothing to run before its pending token is read
                continue
            while not self.block_manager.allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
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
        """Schedule `num_new` tokens of `seq`: they count as computed, and a sample at the end as pending."""
        start = seq.num_computed_tokens
        samples = start + num_new == len(seq.token_ids) + seq.num_pending  # reaches the last token, pending ones too
        out.scheduled.append(ScheduledSeq(seq, num_new, start, samples, seq.epoch))
        seq.num_computed_tokens = start + num_new
        if samples:
            seq.num_pending += 1
        self.block_manager.register_full_blocks(seq)

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Look the prefix up and allocate the first chunk; None (and no change) if the blocks are not there."""
        matched = 0 if _needs_prompt_logits(seq) else self.block_manager.match_prefix(seq)
        if seq.num_output_tokens == 0:
            seq.num_cached_tokens = matched
        num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
        if not self.block_manager.can_allocate(seq, num_new, reserve=self.watermark_blocks):
            self.block_manager.free(seq)
            return None
        self.block_manager.allocate(seq, num_new)
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
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1


def _needs_prompt_logits(seq: Sequence) -> bool:
    """A prompt whose logprobs are still to compute needs the logits of every position: a cached prefix has
    none, so it skips the prefix cache (its siblings do not: only the first sample reports them)."""
    recorded = seq.request.prompt_logprobs
    return recorded is not None and seq.index == 0 and len(recorded) < seq.num_prompt_tokens


def _ends_by_length(seq: Sequence) -> bool:
    """Whether the pending samples bring `seq` to its `max_tokens` (so scheduling more would be wasted)."""
    return seq.num_output_tokens + seq.num_pending >= seq.request.max_tokens > 0
