"""What the async engines share: `StreamingEngine`, the per-request `Stream`, and the messages of the wire.

An async engine runs the `LLMEngine` elsewhere (a thread: `AsyncEngine`; a child process: `ProcessEngine`) and
streams its outputs to asyncio consumers. `StreamingEngine.generate()` validates a request, registers a stream
for it and hands an `Add` to the back end; outputs come back in batches with one `call_soon_threadsafe` per
event loop; a stream whose consumer goes away (aclose, cancellation, a client that disconnected) sends an
`Abort`, which frees its KV blocks. The messages are named here once, for both engines: `Add`, `Abort` and
`Shutdown` go down to the engine; `Ready` or `LoadFailed`, then `Outputs`, `Error` and `Dead` come up from a
child. A step's `Outputs` carries one `RequestDelta` per request with one `SampleDelta` per sample: plain tuples,
the cheapest to pickle, which the engine builds straight from its sequences (`LLMEngine.step_deltas`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from r1serve.config import EngineConfig, ModelConfig
from r1serve.engine.llm_engine import EngineStats
from r1serve.engine.validation import check_request, encode_prompt
from r1serve.errors import EngineDeadError
from r1serve.outputs import RequestDelta, RequestOutput, SampleDelta, merge_outputs
from r1serve.sampling_params import SamplingParams
from r1serve.tokenizer import Tokenizer

logger = logging.getLogger("r1serve")

__all__ = ["Abort", "Add", "Command", "Dead", "Error", "LoadFailed", "Outputs", "Ready", "RequestDelta",
           "SampleDelta", "Shutdown", "Stream", "StreamingEngine", "delta_finished", "delta_request_id"]


# ---- down: from the frontend to the engine ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    prompt_ids: list[int] | None = None  # the validated token ids (the child process uses them as they are)


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Abort every request in flight (each ends with finish_reason "abort"), then stop."""


Command = Add | Abort | Shutdown


# ---- up: from the engine's child process to the frontend ----------------------------------------------------


# `RequestDelta` and `SampleDelta` (r1serve/outputs.py) are the shapes `Outputs` carries; read them here by name.


def delta_request_id(delta: RequestDelta) -> str:
    return delta[0]


def delta_finished(delta: RequestDelta) -> bool:
    return delta[1]


@dataclass(frozen=True, slots=True)
class Ready:
    """The child built its engine; these are its first stats, and how it runs the model."""

    stats: EngineStats
    runtime: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LoadFailed:
    """The child could not build its engine (the parent raises `error`)."""

    error: BaseException


@dataclass(frozen=True, slots=True)
class Outputs:
    """One step: what is new for each request that progressed, and the engine's stats after it."""

    deltas: list[RequestDelta]
    stats: EngineStats


@dataclass(frozen=True, slots=True)
class Error:
    """A request failed on its own in the child (its consumer raises `error`)."""

    request_id: str
    error: BaseException


@dataclass(frozen=True, slots=True)
class Dead:
    """The engine failed for good (a device failure); the child exits after sending this."""

    reason: str



# ---- the frontend -------------------------------------------------------------------------------------------


def _output_finished(output: RequestOutput) -> bool:
    return output.finished


@dataclass
class Stream:
    """One request's outputs on their way to its consumer, on the consumer's event loop. A deque and the one
    waiter's future rather than an `asyncio.Queue`: a put is once per token per stream, and the queue's
    bookkeeping (unfinished-task counts, a list of waiting getters) was a visible share of the event loop at
    hundreds of streams. The items are the engine's own (`RequestOutput`s, or `ProcessEngine`'s deltas);
    `merge` turns those queued together into the one `RequestOutput` the consumer gets, and `is_final` says
    which item ends the request."""

    loop: asyncio.AbstractEventLoop
    merge: Callable[[list[Any]], RequestOutput] = merge_outputs
    is_final: Callable[[Any], bool] = _output_finished
    pending: deque[Any] = field(default_factory=deque)
    waiter: asyncio.Future[None] | None = None  # set while the consumer waits for the next item
    error: BaseException | None = None  # queued behind outputs that were merged: raised on the next call

    def put(self, item: Any) -> None:
        """Queues an output or an error (on the event loop's thread) and wakes the consumer if it waits."""
        self.pending.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next_output(self) -> RequestOutput:
        """The next output, merged with those queued behind it: a consumer that fell behind the engine sends one
        SSE event for several steps (one JSON encoding, one socket write) rather than catching up event by
        event. An error is raised once the outputs queued before it have been delivered."""
        item = self.error
        self.error = None
        if item is None:
            while not self.pending:
                self.waiter = self.loop.create_future()
                try:
                    await self.waiter
                finally:
                    self.waiter = None
            item = self.pending.popleft()
        if isinstance(item, BaseException):
            raise item
        items = [item]
        while not self.is_final(items[-1]) and self.pending:
            following = self.pending.popleft()
            if isinstance(following, BaseException):
                self.error = following
                break
            items.append(following)
        return self.merge(items)


class StreamingEngine(ABC):
    """Async streams over an engine that runs elsewhere (a thread or a process)."""

    config: EngineConfig
    model_config: ModelConfig
    tokenizer: Tokenizer
    max_model_len: int

    def __init__(self) -> None:
        self._streams: dict[str, Stream] = {}
        self._stopping = False
        self.dead_reason: str | None = None  # set once, when the engine has stopped for good
        self._death_callbacks: list[Callable[[str], None]] = []

    def on_death(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` (on the engine's thread) when the engine dies; at once if it is dead already."""
        self._death_callbacks.append(callback)
        if self.dead_reason is not None:
            callback(self.dead_reason)

    def _die(self, reason: str) -> None:
        """The engine is gone for good: say so in one line, fail every open stream with `EngineDeadError` and
        tell whoever registered `on_death` (the server, which then reports it and exits)."""
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        logger.error("the engine died: %s; failing %d open requests", reason, len(self._streams))
        for request_id in list(self._streams):
            self._deliver_error(request_id, EngineDeadError(reason))
        for callback in self._death_callbacks:
            callback(reason)

    @abstractmethod
    def _submit(self, command: Add | Abort) -> None:
        """Hands a command to the engine's back end (never blocks on it)."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stats(self) -> EngineStats: ...

    @abstractmethod
    def runtime_info(self) -> dict[str, str]:
        """How the model runs (device, dtype, kernels, quantization, KV-cache dtype: `ModelRunner.describe`)."""

    @abstractmethod
    def shutdown(self, timeout: float = 10.0) -> None: ...

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; raises ValueError (naming the field) before yielding if it is invalid."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if self._stopping:
            raise RuntimeError("the engine is shutting down")
        request_id = request_id or uuid.uuid4().hex
        prompt_ids = encode_prompt(self.tokenizer, self.model_config.vocab_size, prompt)
        check_request(prompt_ids, params, self.max_model_len, self.config.max_num_seqs,
                      self.model_config.vocab_size)
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stream = self._open_stream()
        self._streams[request_id] = stream
        self.start()
        self._submit(Add(request_id, prompt if isinstance(prompt, str) else prompt_ids, params, prompt_ids))
        finished = False
        try:
            while not finished:
                item = await stream.next_output()
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit(Abort(request_id))
            self._closed(request_id)

    async def abort(self, request_id: str) -> None:
        self._submit(Abort(request_id))

    def _open_stream(self) -> Stream:
        """The stream of a new request, on the running loop; its items are `RequestOutput`s."""
        return Stream(asyncio.get_running_loop())

    def _closed(self, request_id: str) -> None:
        """The request's consumer is done with it (finished or not): nothing to forget here."""
        return None

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        self._route([(out.request_id, out) for out in outputs])

    def _route(self, items: list[tuple[str, Any]]) -> None:
        """(request id, item) pairs to their streams: one `call_soon_threadsafe` per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Stream, Any]]] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that event loop is closed
                pass

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.put, error)
            except RuntimeError:
                pass


def _put_all(items: list[tuple[Stream, Any]]) -> None:
    """`Stream.put` of each item, written out: it runs once per token per stream."""
    for stream, out in items:
        stream.pending.append(out)
        waiter = stream.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
