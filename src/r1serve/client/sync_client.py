"""`LLMClient`: the blocking client for r1serve and any OpenAI-compatible server, on the `openai` SDK.

It is what the seeds' notebook client should have been: typed results with reasoning apart from answer,
typed exceptions instead of printed errors, retries with backoff while a server starts, and the R1 usage
rules applied on the client side where the server does not apply them itself. The shapes of requests and
answers live in `protocol`; this module only does the blocking I/O (the async twin is `async_client`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
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
        except _CAUGHT as exc:
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


class LLMClient:
    """Blocking client. `model=None` uses the server's first model; `fold_system_prompt=None` folds the system
    prompt into the first user turn unless the server is r1serve (which does it itself); `split_reasoning`
    False treats all text as the answer (for models that do not reason)."""

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
        self._openai = openai.OpenAI(
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

    def _retrying(self, call: Callable[[], T]) -> T:
        """`call()`, tried again after a backoff while it fails in a retryable way (see `RetryPolicy`)."""
        attempt = 0
        while True:
            try:
                return call()
            except _CAUGHT as exc:
                if not self.settings.retry.should_retry(attempt, is_retryable(exc)):
                    raise translate_error(exc, self.base_url) from exc
                delay = self.settings.retry.delay_s(attempt, retry_after_s(exc))
                log_retry(translate_error(exc, self.base_url), attempt, self.settings.retry, delay)
                time.sleep(delay)
                attempt += 1

    def _get(self, url: str, retry: bool = True) -> Any:
        call = lambda: self._openai.get(url, cast_to=object)
        return self._retrying(call) if retry else call()

    def list_model_details(self) -> list[dict[str, Any]]:
        """The entries of `GET /v1/models` (r1serve's carry `max_model_len`)."""
        return parse_models(self._get(f"{self.base_url}/models"), self.base_url)

    def list_models(self) -> list[str]:
        return [entry["id"] for entry in self.list_model_details()]

    def resolve_model(self) -> str:
        """The model requests ask for: the one given, else the first the server lists (asked once)."""
        if self._model is None:
            self._model = self.list_models()[0]
        return self._model

    def server_info(self) -> ServerInfo:
        """What `GET /version` says (asked once); a server without that route is simply not r1serve."""
        if self._server_info is None:
            try:
                data = self._get(f"{self.settings.root_url}/version")
            except ClientError as e:
                if e.status_code is None or e.status_code >= 500:
                    raise
                data = None
            self._server_info = parse_server_info(data)
        return self._server_info

    def _fold(self) -> bool:
        fold = self.settings.fold_system_prompt
        return (not self.server_info().is_r1serve) if fold is None else fold

    def _request(
        self,
        messages: Any,
        stream: bool,
        temperature: float | None,
        max_tokens: int | None,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        prepared = prepare_messages(messages, self._fold())
        return build_request(
            self.resolve_model(),
            prepared,
            stream=stream,
            temperature=temperature,
            max_tokens=max_tokens,
            extra=extra,
        )

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
        if stream:
            return self.stream_chat(messages, temperature=temperature, max_tokens=max_tokens, **extra)
        started = time.perf_counter()
        kwargs = self._request(messages, False, temperature, max_tokens, extra)
        raw = self._retrying(lambda: self._openai.chat.completions.with_raw_response.create(**kwargs))
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

    def stream_chat(self, messages: list[dict[str, Any]], **kw: Any) -> ChatStream:
        """A streamed chat completion, opened now (errors raise here): yields `StreamDelta`s of kind
        "reasoning" then "answer", then one `StreamEnd` with finish reason, usage and TTFT."""
        started = time.perf_counter()
        temperature, max_tokens = kw.pop("temperature", None), kw.pop("max_tokens", None)
        kwargs = self._request(messages, True, temperature, max_tokens, kw)
        raw = self._retrying(lambda: self._openai.chat.completions.with_raw_response.create(**kwargs))
        assembler = StreamAssembler(
            url=self.base_url,
            started=started,
            policy=raw.headers.get(POLICY_HEADER),
            split=self.settings.split_reasoning,
        )
        return ChatStream(raw.parse(), assembler)

    def simple_chat(self, user_message: str, system_message: str | None = None, **kw: Any) -> str:
        """The answer (text after the reasoning) to one user message, with an optional system message."""
        messages = [{"role": "system", "content": system_message}] if system_message is not None else []
        result = self.chat_completion([*messages, {"role": "user", "content": user_message}], **kw)
        assert isinstance(result, ChatResult)
        return result.content

    def solve_math(self, problem: str, language: str = "en", **kw: Any) -> MathResult:
        """Ask `problem` with the R1 math prompt ("en" or "zh"); the answer is the last `\\boxed{}`."""
        try:
            prompt = math_prompt(problem, language)
        except ValueError as e:
            raise BadRequestError(str(e)) from e
        kw.pop("stream", None)
        result = self.chat_completion([{"role": "user", "content": prompt}], **kw)
        assert isinstance(result, ChatResult)
        return math_result(result)

    def health(self) -> bool:
        """True when `GET /health` answers 200, False on 503 (loading); other failures raise."""
        try:
            self._get(f"{self.settings.root_url}/health", retry=False)
        except _CAUGHT as exc:
            error = translate_error(exc, self.settings.root_url)
            if isinstance(error, ServerError) and error.status_code == 503:
                return False
            raise error from exc
        return True

    def wait_until_ready(self, timeout_s: float = 120.0, poll_s: float = 0.5) -> None:
        """Block until `/health` is 200; `ClientTimeoutError` (with the last problem) after `timeout_s`."""
        deadline, last = time.monotonic() + timeout_s, "no answer"
        while time.monotonic() < deadline:
            try:
                if self.health():
                    return
                last = "503: still loading"
            except ClientError as e:
                if not is_retryable(e):
                    raise
                last = e.message
            time.sleep(poll_s)
        raise ClientTimeoutError(
            f"{self.settings.root_url} not ready after {timeout_s:.0f} s ({last})", url=self.settings.root_url
        )

    def close(self) -> None:
        self._openai.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
