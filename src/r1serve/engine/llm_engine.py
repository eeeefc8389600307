"""The engine: requests in, `step()` = schedule → run the model → sample → detokenize → outputs.

A step hands back one output per request that progressed: a `RequestOutput` from `step()`, or from
`step_deltas()` only what is new (a `RequestDelta`, which a frontend in another process adds to what it keeps).

`LLMEngine` is synchronous and single-threaded; `LLM` drives it in a loop and `AsyncEngine` drives it from a
background thread. It validates requests (a `ValueError` naming the field), fans a request out into its n
samples, applies the R1 extensions that act on tokens (the thinking budget forces `\\n</think>\\n\\n`; the
repetition guard stops loops), and isolates failures: an error while handling one request aborts that request,
never the engine.
"""

from __future__ import annotations

import gc
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r1serve.config import EngineConfig, ModelConfig
from r1serve.engine.block_manager import BlockManager
from r1serve.engine.detokenizer import IncrementalDetokenizer
from r1serve.engine.logprobs import StepLogprobs, TokenLogprob, record_prompt, wants_logprobs
from r1serve.engine.model_runner import ModelRunner, Runner, RunnerFactory, SampledTokens
from r1serve.engine.scheduler import Scheduler
from r1serve.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from r1serve.engine.sequence import Request, Sequence
from r1serve.engine.stopping import finish_reason
from r1serve.engine.structured import Guide, MasksWaiter, StructuredOutputs, TokenMasks
from r1serve.engine.validation import check_request, encode_prompt
from r1serve.errors import EngineDeadError
from r1serve.model.loader import load_model_config, resolve_model_path
from r1serve.outputs import FinishReason, RequestDelta, RequestOutput
from r1serve.r1_rules import BUDGET_CLOSE
from r1serve.sampling_params import SamplingParams
from r1serve.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger("r1serve")

COMPILE_POLL_S = 0.01  # an engine with nothing to run but grammars compiling waits this long for one per step

Emitted = Any  # what a step hands back for a request: a RequestOutput (`step`) or a RequestDelta (`step_deltas`)
Emit = Callable[[Request, list[Sequence]], Emitted]  # builds it from the request's progressed samples


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_free_blocks: int
    kv_usage: float
    num_prompt_tokens: int  # prompt tokens computed (prefix-cache hits excluded), cumulative
    num_generation_tokens: int  # tokens sampled, cumulative
    prefix_cache_queries: int  # prompt tokens looked up, cumulative
    prefix_cache_hits: int  # prompt tokens found cached, cumulative
    num_preemptions: int


@dataclass(frozen=True)
class InFlight:
    """A step launched on the device: what was scheduled, and its sampled tokens once they are there."""

    sched: SchedulerOutput
    sampled: SampledTokens


class ReadThenMask:
    """A step's late masks (`Runner.execute`'s `late_masks`): called once the step's forward pass is launched,
    it reads the step before (whose tokens the guides accept) and starts the fill of this step's masks on the
    grammar thread, returning its waiter; the host's reading overlaps the device's forward pass, and the fill
    the engine's work until the sampling launches. `finish` reads the step before if the runner never called it
    (a step with no sampling row) and hands over the outputs of that read."""

    def __init__(self, engine: LLMEngine, previous: InFlight, sched: SchedulerOutput) -> None:
        self.engine, self.previous, self.sched = engine, previous, sched
        self.outputs: list[Emitted] = []
        self.waiter: MasksWaiter | None = None

    def __call__(self) -> MasksWaiter:
        self._read_previous(self._queue_fill)
        if self.waiter is None:  # no step before, or its read failed before its accepts
            self._queue_fill()
        assert self.waiter is not None
        return self.waiter

    def _queue_fill(self) -> None:
        """Queues this step's fill on the grammar thread, behind the step before's accepts; planned before the
        engine has appended those tokens, it may cover rows whose sequence they end (their samples are dropped)."""
        self.waiter = self.engine.structured.fill_later(self.engine._guides(self.sched))

    def _read_previous(self, after_accepts: Callable[[], None] | None = None) -> None:
        if self.previous is not None:
            done, self.previous = self.previous, None
            self.outputs += self.engine._read(done, after_accepts)

    def finish(self) -> list[Emitted]:
        self._read_previous()
        outputs, self.outputs = self.outputs, []
        return outputs


@dataclass(frozen=True)
class ModelFiles:
    """What the model's folder (or hub id) says, without loading weights: enough to validate requests."""

    path: Path | None  # None: dummy weights with no folder
    model_config: ModelConfig
    tokenizer: Tokenizer
    max_model_len: int

    @classmethod
    def load(cls, config: EngineConfig) -> ModelFiles:
        path = resolve_model_path(config.model, config.revision, allow_missing=config.load_format == "dummy",
                                  download_dir=config.download_dir)
        model_config = load_model_config(config, path)
        tokenizer = load_tokenizer(config.tokenizer or path)
        return cls(path, model_config, tokenizer, min(config.max_model_len, model_config.max_position_embeddings))


class LLMEngine:
    """`runner_factory` builds the device side (`ModelRunner`); tests and benchmarks pass
    `engine.fake_runner.FakeRunner` to run everything else without a model."""

    def __init__(self, config: EngineConfig, runner_factory: RunnerFactory = ModelRunner) -> None:
        self.config = config
        files = ModelFiles.load(config)
        model_path = files.path
        self.model_config: ModelConfig = files.model_config
        self.tokenizer: Tokenizer = files.tokenizer
        self.max_model_len = files.max_model_len
        self.eos_token_id = self.tokenizer.eos_token_id
        self.runner: Runner = runner_factory(config, self.model_config, model_path, self.max_model_len,
                                             self.eos_token_id)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.think_close_ids = self.tokenizer.encode(BUDGET_CLOSE)
        self.tokenizer.token_bytes()  # the detokenizers' byte table: built at start-up, not in the first step
        self.requests: dict[str, Request] = {}
        self.in_flight: InFlight | None = None  # the step launched on the device and not yet read
        self.num_sync_requests = 0  # live requests that need their tokens on the host before each step (penalties)
        self.num_logprob_requests = 0  # live requests asking for logprobs: their steps compute them
        self.structured = StructuredOutputs(self.tokenizer, self.model_config.vocab_size,
                                            pin_memory=self.runner.device.type == "cuda")
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self._emit: Emit = Request.to_output  # the form of the step in progress (`step` or `step_deltas`)
        # The block table (one object per KV block: ~10^5 on a GPU) and the weights' wrappers live as long as the
        # engine: move them out of the garbage collector's sight, or every full collection walks them (measured:
        # ~70 ms each, ~1.5 ms per step at 256 streams).
        gc.collect()
        gc.freeze()

    # ---- requests -------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return encode_prompt(self.tokenizer, self.model_config.vocab_size, prompt)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        return check_request(prompt_ids, params, self.max_model_len, self.config.max_num_seqs,
                             self.model_config.vocab_size)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, stream: bool = True) -> str:
        """Queues a request. `stream=False`: `step()` reports it only once finished, and (without stop strings) its
        text is decoded once at the end rather than token by token, which saves host time per step."""
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt_ids = self.encode_prompt(prompt)
        max_tokens = self.check_request(prompt_ids, params)
        request = Request(request_id, prompt if isinstance(prompt, str) else None, prompt_ids, params, max_tokens,
                          stream=stream)
        for index in range(params.n):
            request.seqs.append(self._new_sequence(request, index))
        self.requests[request_id] = request
        self.num_sync_requests += params.needs_penalties
        self.num_logprob_requests += wants_logprobs(params)
        if params.structured_output is not None:
            self.structured.submit(request)  # scheduled once its grammar is compiled (`_admit_compiled`)
        else:
            self._enqueue(request)
        return request_id

    def _enqueue(self, request: Request) -> None:
        for seq in request.seqs:
            forced: list[int] = []
            self._apply_thinking_budget(seq, forced)  # a budget of 0 closes the reasoning at once
            self._emit_text(seq, forced)
            if not seq.reasoning_open:
                self._start_answer(seq)  # no reasoning to wait for: the answer is constrained at once
            self.scheduler.add(seq)

    def _admit_compiled(self) -> list[Emitted]:
        """Schedules the requests whose grammar has compiled; one whose grammar failed is aborted."""
        if not self.scheduler.num_unfinished and self.in_flight is None:
            self.structured.wait(COMPILE_POLL_S)
        outputs = []
        for request, compiled in self.structured.take_ready():
            if isinstance(compiled, BaseException):
                logger.error("request %s: its structured output does not compile (%s); aborting it",
                             request.request_id, compiled)
                aborted = self._abort(request.request_id, self._emit)
                outputs += [aborted] if aborted is not None else []
                continue
            for seq in request.seqs:
                seq.guide = Guide(compiled)
            self._enqueue(request)
        return outputs

    def _new_sequence(self, request: Request, index: int) -> Sequence:
        params = request.params
        seq = Sequence(request, index, list(request.prompt_token_ids), len(request.prompt_token_ids))
        # reasoning is open when the prompt ends in "<think>" or "<think>\n" (forced thinking)
        seq.reasoning_open = self.tokenizer.think_start_id in request.prompt_token_ids[-2:]
        seq.defer_text = not request.stream and not params.stop
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer, request.prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
            stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
        )
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Ends every unfinished sample of the request with finish_reason "abort"; frees its blocks."""
        return self._abort(request_id, Request.to_output)

    def abort_delta(self, request_id: str) -> RequestDelta | None:
        """`abort_request`, handing back the final delta (as `step_deltas` does)."""
        return self._abort(request_id, Request.to_delta)

    def _abort(self, request_id: str, emit: Emit) -> Emitted | None:
        request = self._forget(request_id)
        if request is None:
            return None
        live = [s for s in request.seqs if not s.is_finished]
        for seq in live:
            self._finish(seq, "abort")
        return emit(request, live or request.seqs)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step -------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One step (`_step`); a `RequestOutput` for each request that progressed."""
        self._emit = Request.to_output
        return self._step()

    def step_deltas(self) -> list[RequestDelta]:
        """One step (`_step`); for each request that progressed only what is new, built straight from its
        samples: what the engine's child process sends (engine/process_engine.py), without the cumulative
        outputs that `step` builds and a frontend in another process would throw away."""
        self._emit = Request.to_delta
        return self._step()

    def _step(self) -> list[Emitted]:
        """Schedules and launches a step, then reads the step launched before it, so that the host's work for one
        step (scheduling, packing, detokenizing) overlaps the device's work for the other. Returns the outputs of
        the step read. While a request that needs its output tokens on the host to sample (penalties) runs, the
        step before is read first instead. While a constrained answer runs, the step before is read once this
        step's forward pass is launched, and this step's masks are filled from it (`ReadThenMask`)."""
        outputs: list[Emitted] = self._admit_compiled() if self.structured.compiling else []
        if self.num_sync_requests and self.in_flight is not None:
            done, self.in_flight = self.in_flight, None
            outputs += self._read(done)
        previous, self.in_flight = self.in_flight, None
        sched = self.scheduler.schedule()
        sched.logprobs = self.num_logprob_requests > 0
        late = None
        if self.structured.num_running and not sched.is_empty:
            if previous is None:
                sched.token_masks = self._masks(sched)
            else:
                late, previous = ReadThenMask(self, previous, sched), None
        if not sched.is_empty:
            try:
                self.in_flight = InFlight(sched, self.runner.execute(sched, late))
            except Exception as error:
                outputs += late.finish() if late is not None else []
                if previous is not None:  # its tokens come first: the retries below read theirs at once
                    outputs += self._read(previous)
                    previous = None
                outputs += self._isolate(sched, error)
                late = None
        outputs += late.finish() if late is not None else []
        if previous is not None:
            outputs += self._read(previous)
        return outputs

    def _read(self, done: InFlight, after_accepts: Callable[[], None] | None = None) -> list[Emitted]:
        try:
            tokens = done.sampled.tolist()  # waits for the device
        except Exception as error:
            raise_if_device_failure(error)
            return self._fail(done.sched)
        return self._process(done.sched, tokens, done.sampled.logprobs, after_accepts)

    def _isolate(self, sched: SchedulerOutput, error: Exception) -> list[Emitted]:
        """A step failed to launch: each of its requests runs again in a step of its own (recomputing the same
        KV into the same slots), so that only a request that fails on its own is aborted. A device failure
        ends the engine instead (`EngineDeadError`): nothing on that device can be trusted any more."""
        raise_if_device_failure(error)
        by_request: dict[str, list[ScheduledSeq]] = {}
        for item in sched.scheduled:
            by_request.setdefault(item.request_id, []).append(item)
        logger.warning("a step of %d requests failed (%s: %s); running them one at a time", len(by_request),
                       type(error).__name__, error)
        outputs: list[Emitted] = []
        for request_id, items in by_request.items():
            part = self.scheduler.refresh(items)  # the step before has been read: its tokens are on the host
            if part.is_empty:
                continue
            if self.structured.num_running:
                part.token_masks = self._masks(part)
            try:
                part.logprobs = sched.logprobs
                sampled = self.runner.execute(part)
                tokens = sampled.tolist()
            except Exception as part_error:
                raise_if_device_failure(part_error)
                logger.error("request %s failed (%s: %s); aborting it", request_id, type(part_error).__name__,
                             part_error)
                outputs += self._abort_failed(request_id)
                continue
            outputs += self._process(part, tokens, sampled.logprobs)
        return outputs

    def _abort_failed(self, request_id: str) -> list[Emitted]:
        """Abort a request whose step failed; the blocks only it held leave the prefix cache (their KV may never
        have been written)."""
        request = self.requests.get(request_id)
        if request is None:
            return []
        for seq in request.seqs:
            self.block_manager.uncache_own_blocks(seq.block_table)
        out = self._abort(request_id, self._emit)
        return [out] if out is not None else []

    def _fail(self, sched: SchedulerOutput) -> list[Emitted]:
        """A launched step could not be read: abort the requests it carried; drop the prefix cache (blocks it was
        to fill are named)."""
        logger.exception("model step failed; aborting the %d requests it carried", len(sched.scheduled))
        self.block_manager.reset_prefix_cache()
        return self._abort_scheduled(sched)

    def _process(self, sched: SchedulerOutput, sampled: list[int], logprobs: StepLogprobs | None = None,
                 after_accepts: Callable[[], None] | None = None) -> list[Emitted]:
        """A step's tokens are read: the scheduler retires its samples, the engine appends those still wanted.
        The guided ones are accepted by their grammars on the grammar thread meanwhile (`after_accepts` then
        queues what must follow them there), and the sequences they end are finished after."""
        sample_logprobs, prompt_logprobs = logprobs.unpack() if logprobs is not None else ({}, {})
        for i, item in enumerate(sched.scheduled):
            if item.start < item.spec.num_prompt_tokens:  # a prompt chunk (decodes skip the call)
                self._count_prompt_tokens(item)
                if i in prompt_logprobs:
                    self._record_prompt_logprobs(item, prompt_logprobs[i])
        progressed: dict[str, list[Sequence]] = {}
        appended = self.scheduler.update_from_output(sched, sampled)
        guided = [(seq, token) for seq, token, _ in appended
                  if seq.guide is not None and seq.guide.running] if self.structured.num_running else []
        guided_seqs = [seq for seq, _ in guided]
        verdicts = self.structured.accept_later(guided_seqs, [token for _, token in guided]) if guided else None
        if after_accepts is not None:
            after_accepts()
        for seq, token, row in appended:
            try:
                self._append_token(seq, token, sample_logprobs.get(row))
            except Exception:
                logger.exception("request %s failed; aborting it", seq.request.request_id)
                self._finish(seq, "abort")
            progressed.setdefault(seq.request.request_id, []).append(seq)
        if verdicts is not None:
            self._end_guided(guided_seqs, verdicts())
        return self._collect(progressed)

    def _end_guided(self, seqs: list[Sequence], ends: list[FinishReason | None]) -> None:
        """Finishes the sequences whose grammar ended them ("stop": terminated, even with ignore_eos; "abort": a
        token refused), unless a stop string, the EOS or a length limit ended them first."""
        for seq, end in zip(seqs, ends, strict=True):
            if end is not None and not seq.is_finished:
                self._finish(seq, end)

    def _record_prompt_logprobs(self, item: ScheduledSeq, entries: list[TokenLogprob]) -> None:
        seq = self.scheduler.seqs.get(item.seq_id)
        if seq is not None and seq.request.prompt_logprobs is not None:
            record_prompt(seq.request.prompt_logprobs, item.start + 1, entries)

    def _collect(self, progressed: dict[str, list[Sequence]]) -> list[Emitted]:
        outputs, emit = [], self._emit
        for request_id, seqs in progressed.items():
            request = seqs[0].request
            if request.finished:
                outputs.append(emit(request, request.seqs if not request.stream else
                                    [s for s in request.seqs if s in seqs or s.has_unsent]))
                self._forget(request_id)
            elif request.stream and (due := [s for s in seqs if self._stream_due(s)]):
                outputs.append(emit(request, due))
        return outputs

    def _stream_due(self, seq: Sequence) -> bool:
        """Whether a streamed sample's progress goes out this step: its first tokens, its end, or once it has
        gathered `stream_interval` tokens."""
        return (seq.is_finished or seq.num_emitted_tokens == 0
                or seq.num_output_tokens - seq.num_emitted_tokens >= self.config.stream_interval)

    def _forget(self, request_id: str) -> Request | None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.num_sync_requests -= request.params.needs_penalties
            self.num_logprob_requests -= wants_logprobs(request.params)
            if request.params.structured_output is not None:
                self.structured.drop(request_id)
        return request

    def _count_prompt_tokens(self, item: ScheduledSeq) -> None:
        self.num_prompt_tokens += max(0, min(item.end, item.spec.num_prompt_tokens) - item.start)

    def _masks(self, sched: SchedulerOutput) -> TokenMasks | None:
        """The structured-output masks of a step's sampling rows, from their sequences' guides now."""
        return self.structured.masks(self._guides(sched))

    def _guides(self, sched: SchedulerOutput) -> list[Guide | None]:
        """The guide of each sampling row of a step (None for a free row)."""
        seqs = self.scheduler.seqs
        return [getattr(seqs.get(item.seq_id), "guide", None) for item in sched.scheduled if item.samples]

    def _start_answer(self, seq: Sequence) -> None:
        """The answer of `seq` begins: under its grammar, if it has one; a sample already in flight was drawn
        without the grammar's mask, so it is dropped and drawn again."""
        if self.structured.start(seq) and seq.num_pending:
            self.scheduler.void_pending(seq)

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        """Appends a sampled token; outside a running guide's answer, it may open or close the reasoning."""
        seq.append_tokens([token], logprob)
        self.num_generation_tokens += 1
        new_ids = [token]
        if seq.guide is None or not seq.guide.running:  # (an answer under its grammar: accepted in `_process`)
            self._follow_reasoning(seq, token, new_ids)
        self._emit_text(seq, new_ids)
        if seq.detokenizer is not None and seq.detokenizer.stop_reason is not None:
            self._finish(seq, "stop", seq.detokenizer.stop_reason)
            return
        reason, stop_token = finish_reason(seq, token, self.eos_token_id, self.max_model_len)
        if reason is not None:
            self._finish(seq, reason, stop_token)

    def _follow_reasoning(self, seq: Sequence, token: int, new_ids: list[int]) -> None:
        """The reasoning opens with `<think>` sampled first, and closes with `</think>` or at its budget."""
        if token == self.tokenizer.think_start_id and seq.num_reasoning_tokens == 0:
            seq.reasoning_open = True  # the model opened its reasoning itself
        elif seq.reasoning_open:
            if token == self.tokenizer.think_end_id:
                seq.reasoning_open = False
                self._start_answer(seq)
            else:
                seq.num_reasoning_tokens += 1
                self._apply_thinking_budget(seq, new_ids)

    def _apply_thinking_budget(self, seq: Sequence, new_ids: list[int]) -> None:
        """Usage rule 7: once the reasoning has used its budget, close it with `\\n</think>\\n\\n` ourselves."""
        budget = seq.params.max_thinking_tokens
        if budget is None or not seq.reasoning_open or seq.num_reasoning_tokens < budget:
            return
        room = seq.request.max_tokens - seq.num_output_tokens
        forced = self.think_close_ids[: max(0, min(room, self.max_model_len - seq.num_tokens))]
        seq.append_tokens(forced)
        self.scheduler.void_pending(seq)  # a sample in flight was drawn for the position the forced tokens now hold
        new_ids.extend(forced)
        seq.reasoning_open = False
        self._start_answer(seq)

    def _emit_text(self, seq: Sequence, new_ids: list[int]) -> None:
        if seq.detokenizer is None or not new_ids or seq.defer_text:
            return
        seq.append_text(seq.detokenizer.add_tokens(new_ids))

    def _finish(self, seq: Sequence, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        if seq.is_finished:
            return
        if seq.defer_text:  # decode the whole output at once
            seq.defer_text = False
            self._emit_text(seq, seq.output_ids)
        if seq.detokenizer is not None and seq.detokenizer.stop_reason is None:
            seq.append_text(seq.detokenizer.finish())
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.request.num_finished += 1
        self.structured.release(seq)
        self.scheduler.finish(seq)

    def _abort_scheduled(self, sched: SchedulerOutput) -> list[Emitted]:
        outputs = []
        for request_id in {s.request_id for s in sched.scheduled}:
            out = self._abort(request_id, self._emit)
            if out is not None:
                outputs.append(out)
        return outputs

    def runtime_info(self) -> dict[str, str]:
        """How the runner runs the model (`ModelRunner.describe`); empty for a runner that does not say."""
        describe = getattr(self.runner, "describe", None)
        return describe() if callable(describe) else {}

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_total_blocks=bm.num_blocks, num_free_blocks=bm.num_free_blocks,
            kv_usage=1.0 - bm.num_free_blocks / bm.num_blocks, num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens, prefix_cache_queries=bm.num_cache_queries,
            prefix_cache_hits=bm.num_cache_hits, num_preemptions=self.scheduler.num_preemptions,
        )



def raise_if_device_failure(error: BaseException) -> None:
    """A failure of the device itself (a CUDA error: the context is unusable after it) ends the engine."""
    if isinstance(error, torch.AcceleratorError) or "CUDA error" in str(error):
        raise EngineDeadError(f"the device failed: {type(error).__name__}: {str(error).splitlines()[0]}") from error
