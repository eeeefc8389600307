"""`ProcessEngine`: the `LLMEngine` in a child process, so that the server's event loop and the engine loop
do not take turns on one GIL.

Measured on the H100 (docs/performance.md), with 256 streams of 1,024 tokens through HTTP: on a thread,
5.7k output tokens/s and a 43 ms TPOT; in a child process, 8.7k tokens/s and 28 ms, because each step's SSE
chunks and the step itself no longer share one interpreter. Here the child owns the model, the scheduler and
the detokenizers. The parent only validates requests, which needs the tokenizer but not the model, and keeps
the streams. Commands go down one pipe (`Add`, `Abort`, `Shutdown`: engine/frontend.py's messages). One
`Outputs` per step comes back up the other, carrying only what is new for each sample (text, token ids, finish
reason), built straight from the engine's sequences (`LLMEngine.step_deltas`), and the engine's stats. The
deltas go to the streams as they are; a consumer merges what queued up behind it and rebuilds one cumulative
output from the merged delta, so a step never pickles a whole output, and a stream that fell behind costs one
output per event rather than one per token.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from r1serve.config import EngineConfig
from r1serve.engine.async_engine import AsyncEngine
from r1serve.engine.frontend import (
    Abort,
    Add,
    Command,
    Dead,
    Error,
    LoadFailed,
    Outputs,
    Ready,
    RequestDelta,
    SampleDelta,
    Shutdown,
    Stream,
    StreamingEngine,
    delta_finished,
    delta_request_id,
)
from r1serve.engine.llm_engine import EngineStats, LLMEngine, ModelFiles
from r1serve.errors import EngineDeadError
from r1serve.logs import LogConfig
from r1serve.outputs import CompletionOutput, FinishReason, Logprobs, RequestOutput, TextBuffer

logger = logging.getLogger("r1serve")


def _merge_deltas(deltas: list[RequestDelta]) -> RequestDelta:
    """Consecutive deltas of one request as one: each sample's text, token ids (and logprobs) joined in order,
    its finish and stop reasons where one arrived, the last delta's finished flag and cached-token count, the
    prompt logprobs of the delta that had them."""
    if len(deltas) == 1:
        return deltas[0]
    texts: dict[int, list[str]] = {}
    token_ids: dict[int, list[int]] = {}
    logprobs: dict[int, Logprobs] = {}
    ends: dict[int, tuple[FinishReason | None, str | int | None]] = {}
    for _, _, _, samples, _ in deltas:
        for index, text, ids, finish_reason, stop_reason, entries in samples:
            texts.setdefault(index, []).append(text)
            token_ids.setdefault(index, []).extend(ids)
            if entries is not None:
                logprobs.setdefault(index, []).extend(entries)
            if finish_reason is not None:
                ends[index] = (finish_reason, stop_reason)
    request_id, finished, num_cached, _, _ = deltas[-1]
    prompt_logprobs = next((d[4] for d in deltas if d[4] is not None), None)
    merged: list[SampleDelta] = [(i, "".join(texts[i]), token_ids[i], *ends.get(i, (None, None)), logprobs.get(i))
                                 for i in sorted(texts)]
    return request_id, finished, num_cached, merged, prompt_logprobs


def _child_main(config: EngineConfig, commands: Connection, results: Connection,
                build_engine: Callable[[EngineConfig], LLMEngine], log: LogConfig) -> None:
    """The child: build the engine, then step while there is work and wait on the pipe while there is none."""
    log.apply()
    try:
        engine = build_engine(config)
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent, which explains it
        results.send(LoadFailed(_picklable(e)))
        return
    results.send(Ready(engine.stats(), engine.runtime_info()))
    try:
        _serve(engine, commands, results)
    except EngineDeadError as e:  # the parent reads the reason, then sees the pipe close
        results.send(Dead(str(e)))
        raise SystemExit(1) from e


def _serve(engine: LLMEngine, commands: Connection, results: Connection) -> None:
    """Step while there is work, wait on the pipe while there is none, until told to shut down."""
    while True:
        if not engine.has_unfinished():
            commands.poll(None)
        deltas: list[RequestDelta] = []
        while commands.poll(0):
            command = commands.recv()
            if isinstance(command, Shutdown):  # every request ends with "abort"
                aborted = [engine.abort_delta(request_id) for request_id in list(engine.requests)]
                results.send(Outputs(deltas + [d for d in aborted if d is not None], engine.stats()))
                return
            deltas.extend(_apply(engine, command, results))
        if engine.has_unfinished():
            deltas.extend(engine.step_deltas())
        results.send(Outputs(deltas, engine.stats()))


def _apply(engine: LLMEngine, command: Add | Abort, results: Connection) -> list[RequestDelta]:
    if isinstance(command, Abort):
        delta = engine.abort_delta(command.request_id)
        return [delta] if delta is not None else []
    try:
        engine.add_request(command.prompt_ids or command.prompt, command.params, command.request_id)
    except Exception as e:  # already validated in the parent; anything left is this request's alone
        results.send(Error(command.request_id, _picklable(e)))
    return []


def _picklable(error: BaseException) -> BaseException:
    import pickle

    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


@dataclass
class _Sample:
    text: TextBuffer = field(default_factory=TextBuffer)
    token_ids: list[int] = field(default_factory=list)
    logprobs: Logprobs | None = None  # when the request asked


@dataclass
class _RequestState:
    prompt: str | None
    prompt_token_ids: list[int]
    samples: dict[int, _Sample] = field(default_factory=dict)


class ProcessEngine(StreamingEngine):
    """The engine in a spawned child process; the same interface as `AsyncEngine`. `build_engine` makes the
    child's engine from the config (a picklable callable: benchmarks pass one that stubs the model out)."""

    def __init__(self, config: EngineConfig, build_engine: Callable[[EngineConfig], LLMEngine] = LLMEngine,
                 log: LogConfig | None = None) -> None:
        super().__init__()
        self.config = config
        files = ModelFiles.load(config)  # the child loads the same again, with the weights
        self.model_config, self.tokenizer, self.max_model_len = files.model_config, files.tokenizer, files.max_model_len
        self._requests: dict[str, _RequestState] = {}
        self._send_lock = threading.Lock()
        ctx = mp.get_context("spawn")  # CUDA cannot be forked
        child_commands, self._commands = ctx.Pipe(duplex=False)  # (receiving end, sending end)
        self._results, child_results = ctx.Pipe(duplex=False)
        child_args = (config, child_commands, child_results, build_engine, log or LogConfig())
        self._process = ctx.Process(target=_child_main, args=child_args, name="r1serve-engine", daemon=True)
        self._process.start()
        child_commands.close()  # the child holds its own ends; ours closing lets EOF reach the reader
        child_results.close()
        self._wait_ready()
        self._reader = threading.Thread(target=self._read, name="r1serve-engine-reader", daemon=True)
        self._reader.start()

    @classmethod
    def from_config(cls, config: EngineConfig, log: LogConfig | None = None) -> ProcessEngine:
        return cls(config, log=log)

    def _wait_ready(self) -> None:
        while not self._results.poll(0.5):
            if not self._process.is_alive():
                raise RuntimeError(f"the engine process exited with code {self._process.exitcode} while loading")
        message: Ready | LoadFailed = self._results.recv()
        if isinstance(message, LoadFailed):
            self._process.join(5)
            raise message.error
        self._stats = message.stats
        self._runtime = message.runtime

    def start(self) -> None:
        """The child starts with the engine; nothing to do."""

    def stats(self) -> EngineStats:
        return self._stats

    def runtime_info(self) -> dict[str, str]:
        return dict(self._runtime)

    def _submit(self, command: Add | Abort) -> None:
        if isinstance(command, Add):
            self._requests[command.request_id] = _RequestState(
                command.prompt if isinstance(command.prompt, str) else None, list(command.prompt_ids or []))
        self._send(command)

    def _send(self, message: Command) -> None:
        try:
            with self._send_lock:
                self._commands.send(message)
        except (OSError, ValueError):  # the child is gone; the reader fails the streams
            pass

    def _read(self) -> None:
        while True:
            try:
                message = self._results.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, Outputs):
                self._stats = message.stats
                self._route([(delta_request_id(delta), delta) for delta in message.deltas])
            elif isinstance(message, Error):  # its consumer raises it, and then forgets the request (`_closed`)
                self._deliver_error(message.request_id, message.error)
            elif isinstance(message, Dead):
                self._die(message.reason)
        if self._stopping:
            self._fail_remaining()
        else:
            self._process.join(2)
            self._die(f"the engine process exited unexpectedly (exit code {self._process.exitcode})")

    def _open_stream(self) -> Stream:
        return Stream(asyncio.get_running_loop(), self._build, delta_finished)

    def _closed(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def _build(self, deltas: list[RequestDelta]) -> RequestOutput:
        """What a consumer gets for the deltas queued for it: one output, rebuilt once (on its event loop)."""
        return self._rebuild(_merge_deltas(deltas))

    def _rebuild(self, delta: RequestDelta) -> RequestOutput:
        request_id, finished, num_cached, samples, prompt_logprobs = delta
        state = self._requests.get(request_id) or _RequestState(None, [])  # (forgotten: only this delta's text)
        outputs = []
        for index, text, token_ids, finish_reason, stop_reason, entries in samples:
            sample = state.samples.setdefault(index, _Sample())
            sample.text.append(text)
            sample.token_ids.extend(token_ids)
            if entries is not None:
                sample.logprobs = sample.logprobs if sample.logprobs is not None else []
                sample.logprobs.extend(entries)
            outputs.append(CompletionOutput(index, sample.text, sample.token_ids, finish_reason, stop_reason,
                                            text, token_ids, sample.logprobs, entries))
        if finished:
            self._requests.pop(request_id, None)
        return RequestOutput(request_id, state.prompt, state.prompt_token_ids, outputs, finished, num_cached,
                             prompt_logprobs)

    def _fail_remaining(self) -> None:
        """The child has shut down: streams still open end with finish_reason "abort"."""
        for request_id in list(self._requests):
            aborted: RequestDelta = (request_id, True, 0, [(0, "", [], "abort", None, None)], None)
            self._route([(request_id, aborted)])

    def shutdown(self, timeout: float = 10.0) -> None:
        """Asks the child to abort what is in flight and exit; waits for it, then makes sure it is gone."""
        self._stopping = True
        self._send(Shutdown())
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._reader.join(timeout)


def make_engine(config: EngineConfig, in_process: bool = False, log: LogConfig | None = None) -> StreamingEngine:
    """The server's engine: in a child process by default (logging as `log` says), or on a thread of this one."""
    if in_process:
        return AsyncEngine.from_config(config)
    return ProcessEngine.from_config(config, log)
