"""`AsyncLLMClient`: the asyncio twin of `LLMClient`, on `openai.AsyncOpenAI`, for many requests at once.

The eval harness and the benchmark send hundreds of concurrent requests; they need the same typed results,
errors, retries and reasoning split as the blocking client, without a thread per request. Both clients run
the same operations of `core`; this module only awaits their I/O (`openai.AsyncOpenAI`, `asyncio.sleep`).
`stream_chat` returns an `AsyncChatStream` that can be used directly (`async for d in client.stream_chat(m)`)
or awaited first (`stream = await client.stream_chat(m)`) to open it, and see connection errors, at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any, TypeVar

import openai

from r1serve.client.core import CAUGHT, ClientBase, CreateChat, Effect, Get, Op, Sleep
from r1serve.client.errors import translate_error
from r1serve.client.protocol import StreamAssembler
from r1serve.client.types import ChatResult, MathResult, ServerInfo, StreamItem

T = TypeVar("T")
Opener = Callable[[], Awaitable[tuple[Any, StreamAssembler]]]


class AsyncChatStream(AsyncIterator[StreamItem]):
    """A streamed chat: `async for` it (it opens on first use) or `await` it to open it now. Yields
    `StreamDelta`s then one `StreamEnd`; `await result()` gives the whole `ChatResult`; `await close()`
    (or `aclose()`, or leaving an `async with` block) stops it."""

    def __init__(self, opener: Opener) -> None:
        self._opener = opener
        self._sdk_stream: Any = None
        self._chunks: AsyncIterator[Any] | None = None
        self._assembler: StreamAssembler | None = None
        self._queue: deque[StreamItem] = deque()
        self._done = False

    async def _open(self) -> AsyncChatStream:
        if self._assembler is None:
            self._sdk_stream, self._assembler = await self._opener()
            self._chunks = self._sdk_stream.__aiter__()
        return self

    def __await__(self) -> Generator[Any, None, AsyncChatStream]:
        return self._open().__await__()

    def __aiter__(self) -> AsyncChatStream:
        return self

    async def __anext__(self) -> StreamItem:
        await self._open()
        while not self._queue:
            if self._done:
                raise StopAsyncIteration
            await self._pull()
        return self._queue.popleft()

    async def _pull(self) -> None:
        assert self._chunks is not None and self._assembler is not None
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self._done = True
            self._queue.extend(self._assembler.end())
            return
        except CAUGHT as exc:
            await self.aclose()
            raise translate_error(exc, self._assembler.url) from exc
        self._queue.extend(self._assembler.on_chunk(chunk))

    async def result(self) -> ChatResult:
        async for _ in self:
            pass
        assert self._assembler is not None
        return self._assembler.result()

    async def aclose(self) -> None:
        self._done = True
        if self._sdk_stream is not None:
            await self._sdk_stream.close()

    close = aclose  # the name `ChatStream` has

    async def __aenter__(self) -> AsyncChatStream:
        return await self._open()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncLLMClient(ClientBase):
    """Async client with the constructor, methods, arguments and results of `LLMClient` (each method
    awaited; `stream_chat` returns a stream that opens on first use or when awaited)."""

    sdk_class = openai.AsyncOpenAI

    async def _run(self, op: Op[T]) -> T:
        """Drive a core operation to its end, awaiting each effect it yields."""
        try:
            effect = next(op)
            while True:
                try:
                    result = await self._perform(effect)
                except Exception as exc:
                    effect = op.throw(exc)
                else:
                    effect = op.send(result)
        except StopIteration as stop:
            return stop.value

    async def _perform(self, effect: Effect) -> Any:
        if isinstance(effect, Get):
            return await self._openai.get(effect.url, cast_to=object)
        if isinstance(effect, CreateChat):
            return await self._openai.chat.completions.with_raw_response.create(**effect.kwargs)
        assert isinstance(effect, Sleep)
        await asyncio.sleep(effect.seconds)
        return None

    async def list_model_details(self) -> list[dict[str, Any]]:
        """The entries of `GET /v1/models` (r1serve's carry `max_model_len`)."""
        return await self._run(self._core.list_model_details())

    async def list_models(self) -> list[str]:
        """The ids the server serves."""
        return await self._run(self._core.list_models())

    async def resolve_model(self) -> str:
        """The model requests ask for: the one given, else the first the server lists (asked once)."""
        return await self._run(self._core.resolve_model())

    async def server_info(self) -> ServerInfo:
        """What `GET /version` says (asked once); a server without that route is simply not r1serve."""
        return await self._run(self._core.server_info())

    async def chat_completion(
        self,
        messages: list[dict[str, Any]],
        stream: bool = False,
        temperature: float | None = None,
        max_tokens: int | None = None,
        **extra: Any,
    ) -> ChatResult | AsyncChatStream:
        """As `LLMClient.chat_completion`; `stream=True` returns an already opened `AsyncChatStream`."""
        kw = {"temperature": temperature, "max_tokens": max_tokens, **extra}
        if stream:
            return await self.stream_chat(messages, **kw)
        return await self._run(self._core.complete(messages, kw))

    def stream_chat(self, messages: list[dict[str, Any]], **kw: Any) -> AsyncChatStream:
        """A streamed chat (not yet opened): `async for item in client.stream_chat(messages)`."""
        return AsyncChatStream(lambda: self._run(self._core.open_stream(messages, kw)))

    async def simple_chat(self, user_message: str, system_message: str | None = None, **kw: Any) -> str:
        """The answer (text after the reasoning) to one user message, with an optional system message."""
        return await self._run(self._core.simple_chat(user_message, system_message, kw))

    async def solve_math(self, problem: str, language: str = "en", **kw: Any) -> MathResult:
        """Ask `problem` with the R1 math prompt ("en" or "zh"); the answer is the last `\\boxed{}`."""
        return await self._run(self._core.solve_math(problem, language, kw))

    async def health(self) -> bool:
        """True when `GET /health` answers 200, False on 503 (loading); other failures raise."""
        return await self._run(self._core.health())

    async def wait_until_ready(self, timeout_s: float = 120.0, poll_s: float = 0.5) -> None:
        """Wait until `/health` is 200; `ClientTimeoutError` (with the last problem) after `timeout_s`."""
        await self._run(self._core.wait_until_ready(timeout_s, poll_s))

    async def close(self) -> None:
        await self._openai.close()

    async def __aenter__(self) -> AsyncLLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
