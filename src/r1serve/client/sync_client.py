"""`LLMClient`: the blocking client for r1serve and any OpenAI-compatible server, on the `openai` SDK.

It is what the seeds' notebook client should have been: typed results with reasoning apart from answer,
typed exceptions instead of printed errors, retries with backoff while a server starts, and the R1 usage
rules applied on the client side where the server does not apply them itself. What each method does is
written once in `core` (the async twin, `async_client`, runs the same operations); this module only
performs their I/O, blocking: SDK calls on `openai.OpenAI` and `time.sleep`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import Any, TypeVar

import openai

from r1serve.client.core import CAUGHT, ClientBase, CreateChat, Effect, Get, Op, Sleep
from r1serve.client.errors import translate_error
from r1serve.client.protocol import StreamAssembler
from r1serve.client.types import ChatResult, MathResult, ServerInfo, StreamItem

T = TypeVar("T")


class ChatStream(Iterator[StreamItem]):
    """An open streamed chat: iterate for `StreamDelta`s then one `StreamEnd`; `result()` gives the whole
    `ChatResult` (reading the rest of the stream first); `close()` (or leaving a `with` block) stops it."""

    def __init__(self, sdk_stream: Any, assembler: StreamAssembler) -> None:
        self._sdk_stream = sdk_stream
        self._chunks = iter(sdk_stream)
        self._assembler = assembler
        self._queue: deque[StreamItem] = deque()
        self._done = False

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> StreamItem:
        while not self._queue:
            if self._done:
                raise StopIteration
            self._pull()
        return self._queue.popleft()

    def _pull(self) -> None:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self._done = True
            self._queue.extend(self._assembler.end())
            return
        except CAUGHT as exc:
            self.close()
            raise translate_error(exc, self._assembler.url) from exc
        self._queue.extend(self._assembler.on_chunk(chunk))

    def result(self) -> ChatResult:
        for _ in self:
            pass
        return self._assembler.result()

    def close(self) -> None:
        self._done = True
        self._sdk_stream.close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LLMClient(ClientBase):
    """Blocking client. `model=None` uses the server's first model; `fold_system_prompt=None` folds the system
    prompt into the first user turn unless the server is r1serve (which does it itself); `split_reasoning`
    False treats all text as the answer (for models that do not reason)."""

    sdk_class = openai.OpenAI

    def _run(self, op: Op[T]) -> T:
        """Drive a core operation to its end, performing each effect it yields."""
        try:
            effect = next(op)
            while True:
                try:
                    result = self._perform(effect)
                except Exception as exc:
                    effect = op.throw(exc)
                else:
                    effect = op.send(result)
        except StopIteration as stop:
            return stop.value

    def _perform(self, effect: Effect) -> Any:
        if isinstance(effect, Get):
            return self._openai.get(effect.url, cast_to=object)
        if isinstance(effect, CreateChat):
            return self._openai.chat.completions.with_raw_response.create(**effect.kwargs)
        assert isinstance(effect, Sleep)
        time.sleep(effect.seconds)
        return None

    def list_model_details(self) -> list[dict[str, Any]]:
        """The entries of `GET /v1/models` (r1serve's carry `max_model_len`)."""
        return self._run(self._core.list_model_details())

    def list_models(self) -> list[str]:
        """The ids the server serves."""
        return self._run(self._core.list_models())

    def resolve_model(self) -> str:
        """The model requests ask for: the one given, else the first the server lists (asked once)."""
        return self._run(self._core.resolve_model())

    def server_info(self) -> ServerInfo:
        """What `GET /version` says (asked once); a server without that route is simply not r1serve."""
        return self._run(self._core.server_info())

    def chat_completion(
        self,
        messages: list[dict[str, Any]],
        stream: bool = False,
        temperature: float | None = None,
        max_tokens: int | None = None,
        **extra: Any,
    ) -> ChatResult | ChatStream:
        """One chat completion. `extra`: SDK parameters (top_p, seed, stop, ...) and anything else, which
        goes to `extra_body` (max_thinking_tokens, ignore_eos, top_k, ...). `stream=True` returns an open
        `ChatStream` (see `stream_chat`)."""
        kw = {"temperature": temperature, "max_tokens": max_tokens, **extra}
        if stream:
            return self.stream_chat(messages, **kw)
        return self._run(self._core.complete(messages, kw))

    def stream_chat(self, messages: list[dict[str, Any]], **kw: Any) -> ChatStream:
        """A streamed chat completion, opened now (errors raise here): yields `StreamDelta`s of kind
        "reasoning" then "answer", then one `StreamEnd` with finish reason, usage and TTFT."""
        return ChatStream(*self._run(self._core.open_stream(messages, kw)))

    def simple_chat(self, user_message: str, system_message: str | None = None, **kw: Any) -> str:
        """The answer (text after the reasoning) to one user message, with an optional system message."""
        return self._run(self._core.simple_chat(user_message, system_message, kw))

    def solve_math(self, problem: str, language: str = "en", **kw: Any) -> MathResult:
        """Ask `problem` with the R1 math prompt ("en" or "zh"); the answer is the last `\\boxed{}`."""
        return self._run(self._core.solve_math(problem, language, kw))

    def health(self) -> bool:
        """True when `GET /health` answers 200, False on 503 (loading); other failures raise."""
        return self._run(self._core.health())

    def wait_until_ready(self, timeout_s: float = 120.0, poll_s: float = 0.5) -> None:
        """Block until `/health` is 200; `ClientTimeoutError` (with the last problem) after `timeout_s`."""
        self._run(self._core.wait_until_ready(timeout_s, poll_s))

    def close(self) -> None:
        self._openai.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
