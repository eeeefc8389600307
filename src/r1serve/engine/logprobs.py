"""Log-probabilities of sampled and prompt tokens, computed on the device for the rows that ask, and nothing else.

A request asks with `SamplingParams.logprobs` (the sampled token's logprob and the top-k of its distribution) or
`prompt_logprobs` (the same for every prompt token after the first, which is what evaluation harnesses sum for a
log-likelihood). The logprobs are of the model's raw distribution: log_softmax of the logits before penalties,
temperature, top-k/top-p/min-p, as vLLM returns them by default.

One step's work, only when the engine marked the step (`SchedulerOutput.logprobs`, set while some live request
asks): `plan_step` picks on the host the sampling rows and the prompt rows that ask; `gather_step` runs
log_softmax on those rows alone (prompt rows through the lm_head in chunks, since 151,936 floats per position add
up), gathers the target token's logprob, its rank and the top-k, and packs everything in one float32 tensor (token ids
below 2^24 are exact in float32) whose copy to the host starts with the step's sampled ids and is read after the
same event: no extra synchronisation. `StepLogprobs.unpack` then splits it into per-row `TokenLogprob` records.
A step nobody asks for costs one attribute test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from r1serve.engine.scheduler_output import SchedulerOutput



TokenLogprob = tuple[float | None, tuple[int, ...], tuple[float, ...], int | None]
"""(logprob of the token, top-k token ids, their logprobs (most likely first), its rank in the distribution (1:
the most likely; ties share the better rank)). Logprob and rank None: a token the engine forced (the thinking
budget's closing tokens), which was never sampled. A plain tuple: these cross the engine's pipe per token
(engine/frontend.py says why not NamedTuples)."""

FORCED: TokenLogprob = (None, (), (), None)
PROMPT_CHUNK_ROWS = 256  # prompt positions projected to the vocabulary at once (256 x 151,936 floats = 156 MB)
MAX_EXACT_ID = 1 << 24  # float32 holds every integer below this exactly


def wants_logprobs(params: object) -> bool:
    """Whether a request's `SamplingParams` ask for any logprobs."""
    return getattr(params, "logprobs", None) is not None or getattr(params, "prompt_logprobs", None) is not None


@dataclass
class PromptSpan:
    """Prompt rows of one scheduled chunk that ask: hidden rows [row, row + len(targets)) predict `targets`."""

    item: int  # index in SchedulerOutput.scheduled
    row: int  # first row in the step's hidden states
    first_token: int  # prompt index of targets[0]
    targets: list[int]
    k: int


@dataclass
class LogprobPlan:
    """Which rows of a step ask for logprobs, and how many top entries each."""

    sample_rows: list[int] = field(default_factory=list)  # rows of the sampled logits
    sample_ks: list[int] = field(default_factory=list)
    prompt: list[PromptSpan] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.sample_rows and not self.prompt


def plan_step(sched: SchedulerOutput) -> LogprobPlan | None:
    """The rows of this step that ask (None when none does)."""
    plan = LogprobPlan()
    row = 0
    sample_row = 0
    for i, item in enumerate(sched.scheduled):
        spec = item.spec
        params = spec.params
        if params.prompt_logprobs is not None and spec.index == 0:
            span = _prompt_span(i, item.start, item.num_new_tokens, row, spec.prompt_token_ids)
            if span is not None:
                span.k = params.prompt_logprobs
                plan.prompt.append(span)
        if item.samples:
            if params.logprobs is not None:
                plan.sample_rows.append(sample_row)
                plan.sample_ks.append(params.logprobs)
            sample_row += 1
        row += item.num_new_tokens
    return None if plan.is_empty else plan


def _prompt_span(item: int, start: int, num_new: int, row: int, prompt_ids: list[int]) -> PromptSpan | None:
    """Position p's logits predict token p + 1: a chunk [start, end) gives the prompt tokens start + 1 .. end
    that are prompt tokens (the last prompt position predicts the sampled token, not a prompt one)."""
    stop = min(start + num_new, len(prompt_ids) - 1)
    if stop <= start:
        return None
    return PromptSpan(item, row, start + 1, prompt_ids[start + 1: stop + 1], 0)


def gather(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """logits [N, V], targets [N] → [N, 2 + 2k] float32: the target's logprob, its rank (1 + the entries more
    likely), the top-k logprobs (descending), the top-k ids (as floats)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, targets.view(-1, 1))
    rank = (logprobs > chosen).sum(-1, keepdim=True, dtype=torch.float32) + 1
    if k == 0:
        return torch.cat([chosen, rank], dim=-1)
    top = torch.topk(logprobs, k, dim=-1)
    return torch.cat([chosen, rank, top.values, top.indices.float()], dim=-1)


def gather_step(plan: LogprobPlan, logits: torch.Tensor, sampled: torch.Tensor, hidden: torch.Tensor,
                project: Callable[[torch.Tensor], torch.Tensor]) -> StepLogprobs:
    """The plan's logprobs on the device: `logits` [num_sampling, V] are the step's sampled rows (raw), `sampled`
    their ids, `hidden` [num_tokens, H] every row of the step, `project` the lm_head (hidden → float32 logits)."""
    assert logits.shape[-1] <= MAX_EXACT_ID
    parts: list[torch.Tensor] = []
    if plan.sample_rows:
        rows = torch.tensor(plan.sample_rows, dtype=torch.int64).to(logits.device, non_blocking=True)
        k = max(plan.sample_ks)
        parts.append(gather(logits.index_select(0, rows), sampled.index_select(0, rows), k).flatten())
    for span in plan.prompt:
        targets = torch.tensor(span.targets, dtype=torch.int64).to(hidden.device, non_blocking=True)
        for lo in range(0, len(span.targets), PROMPT_CHUNK_ROWS):
            hi = min(lo + PROMPT_CHUNK_ROWS, len(span.targets))
            chunk_logits = project(hidden[span.row + lo: span.row + hi])
            parts.append(gather(chunk_logits, targets[lo:hi], span.k).flatten())
    packed = torch.cat(parts) if len(parts) > 1 else parts[0]
    return StepLogprobs(plan, packed)


class StepLogprobs:
    """One step's packed logprobs, on the device and then (`start_copy`) on their way to the host."""

    def __init__(self, plan: LogprobPlan, packed: torch.Tensor) -> None:
        self.plan = plan
        self.packed = packed  # [total] float32

    def start_copy(self) -> None:
        """Starts the device-to-host copy (pinned, non-blocking); the step's event, recorded after, covers it."""
        if self.packed.device.type == "cuda":
            host = torch.empty(self.packed.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(self.packed, non_blocking=True)
            self.packed = host

    def unpack(self) -> tuple[dict[int, TokenLogprob], dict[int, list[TokenLogprob]]]:
        """(records by sampling row, prompt records by scheduled index); call once the step's tokens are read."""
        values = self.packed.cpu().tolist()
        at = 0
        samples: dict[int, TokenLogprob] = {}
        if self.plan.sample_rows:
            width = 2 + 2 * max(self.plan.sample_ks)
            for row, k in zip(self.plan.sample_rows, self.plan.sample_ks, strict=True):
                samples[row] = _record(values, at, width, k)
                at += width
        prompts: dict[int, list[TokenLogprob]] = {}
        for span in self.plan.prompt:
            width = 2 + 2 * span.k
            prompts[span.item] = [_record(values, at + j * width, width, span.k) for j in range(len(span.targets))]
            at += width * len(span.targets)
        return samples, prompts


def _record(values: list[float], at: int, width: int, k: int) -> TokenLogprob:
    """One row of `gather`'s layout (width 2 + 2K, of which the first k entries of the top are kept)."""
    top_k = (width - 2) // 2
    ids = values[at + 2 + top_k: at + 2 + top_k + k]
    return values[at], tuple(int(i) for i in ids), tuple(values[at + 2: at + 2 + k]), int(values[at + 1])


def record_prompt(recorded: list[TokenLogprob | None], first_token: int, entries: list[TokenLogprob]) -> None:
    """Append the entries of prompt tokens first_token.. that `recorded` lacks (a preempted prompt is computed
    again: its earlier entries are kept, the repeats dropped)."""
    skip = len(recorded) - first_token
    if skip < 0:
        raise AssertionError(f"prompt logprobs out of order: have {len(recorded)}, got from {first_token}")
    recorded.extend(entries[skip:])
