"""The contract from the scheduler to the runner: one step's plan as plain data (`SchedulerOutput`).

The scheduler builds it; the model runner, the input packer, the sampler and the logprobs plan read it and
nothing else: no live `Sequence` crosses this line, so what the device side does is a function of the plan alone.
Each scheduled sequence is one `ScheduledSeq`: the chunk of tokens to compute (those known on the host, and
whether the last one is the in-flight step's sample, filled on the device), its positions, its block ids, whether
it samples, and the epoch the sample belongs to. What never changes about a sequence (its id, sample index,
request parameters and prompt) is one `SequenceSpec`, built once with the sequence and shared by its records.

Records are read-only once built. Their lists and arrays are never changed afterwards either: the scheduler
gives a sequence a new block-table array when it grows (engine/scheduler.py), so a record keeps the blocks of
its own step. After the step has run, `Scheduler.update_from_output` is where the sequences learn its result.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from r1serve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from r1serve.engine.structured import TokenMasks


@dataclass(frozen=True)
class SequenceSpec:
    """What a step needs to know of a sequence that stays fixed for its whole life."""

    seq_id: int
    request_id: str
    index: int  # sample index within its request (0..n-1)
    params: SamplingParams
    prompt_token_ids: list[int]  # the request's prompt (never changed)
    num_prompt_tokens: int
    needs_penalties: bool  # its sampling reads its own tokens (`output_token_ids` of its records)


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's part in one step: tokens [start, start + num_new_tokens) run, at those positions."""

    spec: SequenceSpec
    seq_id: int  # spec.seq_id, read once per row by the runner and the scheduler
    start: int  # the sequence's computed tokens before this step
    num_new_tokens: int
    new_token_ids: list[int]  # the chunk's tokens known on the host: all, or all but the last (`pending_row`)
    pending_row: int  # -1; else the chunk's last token is row `pending_row` of the in-flight step's samples
    samples: bool  # the chunk reaches the end of the sequence, so the step samples its next token
    epoch: int  # the sequence's epoch when scheduled: a sample of an older epoch is dropped
    block_table: array[int]  # the sequence's block ids
    output_token_ids: list[int] | None = None  # its output so far, only when `spec.needs_penalties`

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def params(self) -> SamplingParams:
        return self.spec.params

    @property
    def num_outputs_before(self) -> int:
        """Output tokens before the one this step samples (pending ones included)."""
        return self.end - self.spec.num_prompt_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted_seq_ids: list[int] = field(default_factory=list)
    num_sampling: int = 0  # records that sample: the step's rows of sampled tokens, in order
    logprobs: bool = False  # some live request asks for logprobs (set by the engine; engine/logprobs.py)
    token_masks: TokenMasks | None = None  # structured output: the engine's masks of the constrained rows

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def sampling(self) -> list[ScheduledSeq]:
        """The records that sample, in the order of the step's sampled tokens."""
        return [s for s in self.scheduled if s.samples]
