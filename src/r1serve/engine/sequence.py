"""The state of one sample being generated (`Sequence`) and of the request that owns its n samples (`Request`).

There are no separate prefill and decode phases: a sequence has `token_ids` (prompt, then output) and
`num_computed_tokens` whose KV is in the cache (or will be, once the steps already launched have run); every step
the scheduler lets the computed tokens catch up by a chunk, and once they reach the end the sequence samples a new
token. Preemption by recompute simply sets `num_computed_tokens` back to zero.

Steps are pipelined (the engine schedules step N+1 before it has read step N's tokens), so a sequence can have a
sampled token that is not yet known on the host: `num_pending` counts those, and the next step reads it on the
device. When the engine changes a sequence's tokens itself (the thinking budget's forced tokens), the samples in
flight were drawn for the wrong position: the scheduler bumps `epoch` (`Scheduler.void_pending`), and samples of
an older epoch are dropped.

Who writes what: the scheduler alone writes the scheduling state (`status`, `num_computed_tokens`, `num_pending`,
`epoch`, `sample_row`, `block_table`, `block_hashes`, `num_cached_tokens`), from what the block manager returns
and from each step's result (`Scheduler.update_from_output`); the engine writes the output state (tokens
appended, text, reasoning, finish reason). The runner never sees a `Sequence`: it reads `spec` and the step's
records (engine/scheduler_output.py).
"""

from __future__ import annotations

import enum
import itertools
import time
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from r1serve.engine.logprobs import FORCED, TokenLogprob
from r1serve.engine.scheduler_output import SequenceSpec
from r1serve.outputs import CompletionOutput, FinishReason, RequestDelta, RequestOutput, SampleDelta, TextBuffer
from r1serve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from r1serve.engine.detokenizer import IncrementalDetokenizer
    from r1serve.engine.structured import Guide

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # sample index within its request (0..n-1)
    token_ids: list[int]
    num_prompt_tokens: int
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # advanced when a step is scheduled
    num_pending: int = 0  # tokens sampled by launched steps, not yet appended
    epoch: int = 0  # bumped when the engine appends tokens itself: in-flight samples of older epochs are void
    sample_row: int = -1  # this sequence's row in the sampled tokens of the last scheduled step
    # block ids, a C array: packing a step's block tables is then a copy, not a conversion of every id; replaced,
    # never changed in place, when it grows (the records of launched steps hold the old one)
    block_table: array[int] = field(default_factory=lambda: array("q"))
    block_hashes: list[int] = field(default_factory=list)  # hashes of the leading full blocks, for the cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    reasoning_open: bool = False  # inside <think> … </think> (for the thinking budget)
    num_reasoning_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)  # token_ids' output part, a live list grown with it
    num_emitted_tokens: int = 0  # output tokens already reported in a RequestOutput
    detokenizer: IncrementalDetokenizer | None = None
    defer_text: bool = False  # decode the text once at the end (nobody reads it before, and no stop strings)
    text: TextBuffer = field(default_factory=TextBuffer)  # all text emitted so far
    pending_text: list[str] = field(default_factory=list)  # pieces of text produced since the last RequestOutput
    logprobs: list[TokenLogprob] | None = None  # one per output token, when the request asks
    guide: Guide | None = None  # the grammar of its answer (structured output), engine/structured.py
    spec: SequenceSpec = field(init=False)  # what the runner may know of it (the fields that never change)

    def __post_init__(self) -> None:
        params = self.request.params
        self.spec = SequenceSpec(self.seq_id, self.request.request_id, self.index, params,
                                 self.request.prompt_token_ids, self.num_prompt_tokens, params.needs_penalties)
        if not self.output_ids:
            self.output_ids = self.token_ids[self.num_prompt_tokens:]
        if self.request.params.logprobs is not None:
            self.logprobs = [FORCED] * len(self.output_ids)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    def append_text(self, piece: str) -> None:
        self.text.append(piece)
        if piece:
            self.pending_text.append(piece)

    def append_tokens(self, token_ids: list[int], logprob: TokenLogprob | None = None) -> None:
        """Appends output tokens; with logprobs asked, `logprob` is the one sampled token's (forced tokens have
        none)."""
        self.token_ids.extend(token_ids)
        self.output_ids.extend(token_ids)
        if self.logprobs is not None:
            self.logprobs.extend([logprob or FORCED] if len(token_ids) == 1 else [FORCED] * len(token_ids))

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def has_unsent(self) -> bool:
        """Whether it holds tokens or text no RequestOutput has carried yet (a stream gathering them)."""
        return self.num_emitted_tokens < len(self.output_ids) or bool(self.pending_text)

    def _take_delta(self) -> tuple[int, list[int], str]:
        """What no output has carried yet, now marked as carried: (its first output position, ids, text)."""
        start = self.num_emitted_tokens
        delta_ids = self.output_ids[start:]
        self.num_emitted_tokens += len(delta_ids)
        delta_text = "".join(self.pending_text)
        self.pending_text.clear()
        return start, delta_ids, delta_text

    def to_output(self) -> CompletionOutput:
        """The cumulative output so far plus the delta since the previous output."""
        start, delta_ids, delta_text = self._take_delta()
        logprobs = self.logprobs
        # positional: this runs once per sample per streamed step
        return CompletionOutput(self.index, self.text, self.output_ids, self.finish_reason, self.stop_reason,
                                delta_text, delta_ids, logprobs, None if logprobs is None else logprobs[start:])

    def to_delta(self) -> SampleDelta:
        """Only the delta since the previous output (`to_output` without the cumulative part)."""
        start, delta_ids, delta_text = self._take_delta()
        logprobs = self.logprobs
        return (self.index, delta_text, delta_ids, self.finish_reason, self.stop_reason,
                None if logprobs is None else logprobs[start:])


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int = 0  # the effective limit, set by the engine (params.max_tokens or what the context leaves)
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    num_finished: int = 0  # samples that have finished (the engine counts them as they end)
    stream: bool = True  # report every step's progress; False: only the final output
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when asked: [None, then one per prompt token]
    prompt_logprobs_reported: bool = False  # they go out once, in the first output after they are complete

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.seqs)

    @property
    def prefill_leader(self) -> Sequence:
        """The first sample: its siblings wait until its prompt is cached, then share its blocks."""
        return self.seqs[0]

    def to_output(self, seqs: list[Sequence]) -> RequestOutput:
        """The output of the request's samples `seqs` (the others have nothing new)."""
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, [s.to_output() for s in seqs],
                             self.finished, self.seqs[0].num_cached_tokens, self._new_prompt_logprobs())

    def to_delta(self, seqs: list[Sequence]) -> RequestDelta:
        """`to_output` as a delta: what is new for the samples `seqs`, for a frontend that keeps the rest."""
        return (self.request_id, self.finished, self.seqs[0].num_cached_tokens, [s.to_delta() for s in seqs],
                self._new_prompt_logprobs())

    def _new_prompt_logprobs(self) -> list[TokenLogprob | None] | None:
        """The prompt logprobs once complete, in the first output after that only."""
        recorded = self.prompt_logprobs
        if recorded is None or self.prompt_logprobs_reported or len(recorded) < len(self.prompt_token_ids):
            return None
        self.prompt_logprobs_reported = True
        return recorded
