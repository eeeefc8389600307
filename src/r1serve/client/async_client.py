"""`AsyncLLMClient`: the asyncio twin of `LLMClient`, on `openai.AsyncOpenAI`, for many requests at once.

The eval harness and the benchmark send hundreds of concurrent requests; they need the same typed results,
errors, retries and reasoning split as the blocking client, without a thread per request. Request and
answer shapes come from `protocol`, so the two clients cannot drift apart; only the awaiting lives here.
`stream_chat` returns an `AsyncChatStream` that can be used directly (`async for d in client.stream_chat(m)`)
or awaited first (`stream = await client.stream_chat(m)`) to open it, and see connection errors, at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any, TypeVar

import openai

from r1serve.client.boxed import math_result
from r1serve.client.errors import (
    BadRequestError,
    ClientError,
    ClientTimeoutError,
    ServerError,
    is_retryable,
    retry_after_s,
    translate_error,
)
from r1serve.client.protocol import (
    POLICY_HEADER,
    StreamAssembler,
    build_request,
    parse_completion,
    parse_models,
    parse_server_info,
    prepare_messages,
)
from r1serve.client.retry import log_retry
from r1serve.client.settings import DEFAULT_BASE_URL, ClientSettings
from r1serve.client.types import ChatResult, MathResult, ServerInfo, StreamItem
from r1serve.prompts import math_prompt

T = TypeVar("T")
_CAUGHT = (openai.OpenAIError, ClientError, OSError, ValueError, TypeError, AttributeError, KeyError)
Opener = Callable[[], Awaitable[tuple[Any, StreamAssembler]]]


class AsyncChatStream(AsyncIterator[StreamItem]):
    """A streamed chat: `async for` it (it opens on first use) or `await` it to open it now. Yields
    `StreamDelta`s then one `StreamEnd`; `await result()` gives the whole `ChatResult`; `aclose()` stops
    it."""

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
        except _CAUGHT as exc:
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

    async def __aenter__(self) -> AsyncChatStream:
        return await self._open()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncLLMClient:
    """Async client with the methods, arguments and results of `LLMClient` (each method awaited)."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 3,
        fold_system_prompt: bool | None = None,
        split_reasoning: bool = True,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        http_client: Any = None,
    ) -> None:
        self.settings = ClientSettings.build(
            base_url,
            api_key=api_key,
            model=model,
            timeout=timeout,
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            fold_system_prompt=fold_system_prompt,
            split_reasoning=split_reasoning,
        )
        self._openai = openai.AsyncOpenAI(
            base_url=self.settings.base_url,
            api_key=self.settings.api_key,
            timeout=timeout,
            max_retries=0,
            http_client=http_client,
        )
        self._model = model
        self._server_info: ServerInfo | None = None

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await call()
            except _CAUGHT as exc:
                if not self.settings.retry.should_retry(attempt, is_retryable(exc)):
                    raise translate_error(exc, self.base_url) from exc
                delay = self.settings.retry.delay_s(attempt, retry_after_s(exc))
                log_retry(translate_error(exc, self.base_url), attempt, self.settings.retry, delay)
                await asyncio.sleep(delay)
                attempt += 1

    async def _get(self, url: str, retry: bool = True) -> Any:
        call = lambda: self._openai.get(url, cast_to=object)
        return await (self._retrying(call) if retry else call())

    async def list_model_details(self) -> list[dict[str, Any]]:
        return parse_models(await self._get(f"{self.base_url}/models"), self.base_url)

    async def list_models(self) -> list[str]:
        return [entry["id"] for entry in await self.list_model_details()]

    async def resolve_model(self) -> str:
        """The model requests ask for: the one given, else the first the server lists (asked once)."""
        if self._model is None:
            self._model = (await self.list_models())[0]
        return self._model

    async def server_info(self) -> ServerInfo:
        if self._server_info is None:
            try:
                data = await self._get(f"{self.settings.root_url}/version")
            except ClientError as e:
                if e.status_code is None or e.status_code >= 500:
                    raise
                data = None
            self._server_info = parse_server_info(data)
        return self._server_info

    async def _request(
        self,
        messages: Any,
        stream: bool,
        temperature: float | None,
        max_tokens: int | None,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        fold = self.settings.fold_system_prompt
        if fold is None:
            fold = not (await self.server_info()).is_r1serve
        prepared = prepare_messages(messages, fold)
        return build_request(
            await self.resolve_model(),
            prepared,
            stream=stream,
            temperature=temperature,
            max_tokens=max_tokens,
            extra=extra,
        )

    async def chat_completion(
        self,
        messages: list[dict[str, Any]],
        stream: bool = False,
        temperature: float | None = None,
        max_tokens: int | None = None,
        **extra: Any,
    ) -> ChatResult | AsyncChatStream:
        """As `LLMClient.chat_completion`; `stream=True` returns an already opened `AsyncChatStream`."""
        if stream:
            return await self.stream_chat(messages, temperature=temperature, max_tokens=max_tokens, **extra)
        started = time.perf_counter()
        kwargs = await self._request(messages, False, temperature, max_tokens, extra)
        raw = await self._retrying(lambda: self._openai.chat.completions.with_raw_response.create(**kwargs))
        try:
            response = raw.parse()
        except _CAUGHT as exc:
            raise translate_error(exc, self.base_url) from exc
        return parse_completion(
            response,
            url=self.base_url,
            policy=raw.headers.get(POLICY_HEADER),
            latency_s=time.perf_counter() - started,
            split=self.settings.split_reasoning,
        )

    def stream_chat(self, messages: list[dict[str, Any]], **kw: Any) -> AsyncChatStream:
        """A streamed chat (not yet opened): `async for item in client.stream_chat(messages)`."""

        async def opener() -> tuple[Any, StreamAssembler]:
            started = time.perf_counter()
            temperature, max_tokens = kw.pop("temperature", None), kw.pop("max_tokens", None)
            kwargs = await self._request(messages, True, temperature, max_tokens, kw)
            raw = await self._retrying(
                lambda: self._openai.chat.completions.with_raw_response.create(**kwargs)
            )
            assembler = StreamAssembler(
                url=self.base_url,
                started=started,
                policy=raw.headers.get(POLICY_HEADER),
                split=self.settings.split_reasoning,
            )
            return raw.parse(), assembler

        return AsyncChatStream(opener)

    async def simple_chat(self, user_message: str, system_message: str | None = None, **kw: Any) -> str:
        messages = [{"role": "system", "content": system_message}] if system_message is not None else []
        result = await self.chat_completion([*messages, {"role": "user", "content": user_message}], **kw)
        assert isinstance(result, ChatResult)
        return result.content

    async def solve_math(self, problem: str, language: str = "en", **kw: Any) -> MathResult:
        try:
            prompt = math_prompt(problem, language)
        except ValueError as e:
            raise BadRequestError(str(e)) from e
        kw.pop("stream", None)
        result = await self.chat_completion([{"role": "user", "content": prompt}], **kw)
        assert isinstance(result, ChatResult)
        return math_result(result)

    async def health(self) -> bool:
        try:
            await self._get(f"{self.settings.root_url}/health", retry=False)
        except _CAUGHT as exc:
            error = translate_error(exc, self.settings.root_url)
            if isinstance(error, ServerError) and error.status_code == 503:
                return False
            raise error from exc
        return True

    async def wait_until_ready(self, timeout_s: float = 120.0, poll_s: float = 0.5) -> None:
        deadline, last = time.monotonic() + timeout_s, "no answer"
        while time.monotonic() < deadline:
            try:
                if await self.health():
                    return
                last = "503: still loading"
            except ClientError as e:
                if not is_retryable(e):
                    raise
                last = e.message
            await asyncio.sleep(poll_s)
        raise ClientTimeoutError(
            f"{self.settings.root_url} not ready after {timeout_s:.0f} s ({last})", url=self.settings.root_url
        )

    async def close(self) -> None:
        await self._openai.close()

    async def __aenter__(self) -> AsyncLLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
