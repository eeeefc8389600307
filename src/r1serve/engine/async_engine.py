"""`AsyncEngine`: the `LLMEngine` stepped on a thread of this process, streamed to asyncio consumers.

The streams, validation and abort-on-disconnect are `StreamingEngine`'s (engine/frontend.py); this module only
drives the engine: commands from a queue, a step whenever there is work, outputs delivered as they come. It
shares this process's GIL with the event loop; `ProcessEngine` (engine/process_engine.py), the server's default,
runs the same loop in a child process instead.
"""

from __future__ import annotations

import logging
import queue
import threading

from r1serve.config import EngineConfig
from r1serve.engine.frontend import Abort, Add, StreamingEngine
from r1serve.engine.llm_engine import EngineStats, LLMEngine
from r1serve.errors import EngineDeadError

logger = logging.getLogger("r1serve")

__all__ = ["AsyncEngine"]


class AsyncEngine(StreamingEngine):
    """The `LLMEngine` stepped on a background thread of this process."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__()
        self.engine = engine
        self.config = engine.config
        self.model_config = engine.model_config
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self._commands: queue.SimpleQueue[Add | Abort] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(LLMEngine(config))

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="r1serve-engine", daemon=True)
                self._thread.start()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def runtime_info(self) -> dict[str, str]:
        return self.engine.runtime_info()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the loop thread; requests still in flight end with finish_reason "abort"."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for request_id in list(self.engine.requests):
            out = self.engine.abort_request(request_id)
            if out is not None:
                self._deliver([out])

    def _submit(self, command: Add | Abort) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _run(self) -> None:
        while not self._stopping:
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wakeup.wait(timeout=1.0)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except EngineDeadError as e:
                self._die(str(e))
                return
            except Exception as e:  # a bug in the loop: fail what is in flight, keep serving
                logger.exception("engine step failed")
                self._fail_all(e)
                continue
            self._deliver(outputs)

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, Add):
                self._add(command)
            else:
                out = self.engine.abort_request(command.request_id)
                if out is not None:  # a stream still waiting gets its final "abort" output
                    self._deliver([out])

    def _add(self, command: Add) -> None:
        if command.request_id not in self._streams:  # its consumer already left
            return
        try:
            self.engine.add_request(command.prompt, command.params, command.request_id)
        except Exception as e:
            self._deliver_error(command.request_id, e)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.engine.requests):
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("could not abort request %s", request_id)
            self._deliver_error(request_id, RuntimeError(f"engine error: {error}"))

