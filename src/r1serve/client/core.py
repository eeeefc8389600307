"""Every client operation written once, free of I/O; `LLMClient` and `AsyncLLMClient` only perform it.

The blocking and the asyncio client do the same things in the same order: ask the server what it is, pick
the model, build the request, retry while the server starts, read the answer, turn failures into typed
errors. Written twice they drift apart, so each operation here is a generator that *yields* the I/O it
needs (`Get`, `CreateChat`, `Sleep`) and is *sent* the result, or *thrown* the exception, by a shell: the
sync shell runs the effect with `openai.OpenAI` and `time.sleep`, the async one awaits `openai.AsyncOpenAI`
and `asyncio.sleep` (the pattern of httpx's auth flows). The shapes of requests and answers are `protocol`;
the decisions (what to retry, how long to wait, which error a failure is) live here.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
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
from r1serve.client.types import ChatResult, MathResult, ServerInfo
from r1serve.prompts import math_prompt

T = TypeVar("T")
# What a failed call may raise: the SDK's and the client's errors, and what a broken answer causes in parsing.
CAUGHT = (openai.OpenAIError, ClientError, OSError, ValueError, TypeError, AttributeError, KeyError)


@dataclass(frozen=True)
class Get:
    """`GET url` through the SDK; the result is the decoded JSON body."""

    url: str


@dataclass(frozen=True)
class CreateChat:
    """`chat.completions.with_raw_response.create(**kwargs)`; the result is the SDK's raw response."""

    kwargs: dict[str, Any]


@dataclass(frozen=True)
class Sleep:
    """Wait `seconds` before going on."""

    seconds: float


Effect = Get | CreateChat | Sleep
Op = Generator[Effect, Any, T]  # an operation: yields effects, is sent their results, returns a T


def math_messages(problem: str, language: str) -> list[dict[str, Any]]:
    """The one user turn of `solve_math`: `problem` in the R1 math prompt ("en" or "zh")."""
    try:
        return [{"role": "user", "content": math_prompt(problem, language)}]
    except ValueError as e:
        raise BadRequestError(str(e)) from e


def simple_messages(user_message: str, system_message: str | None) -> list[dict[str, Any]]:
    """The conversation of `simple_chat`: an optional system turn, then the user's."""
    system = [{"role": "system", "content": system_message}] if system_message is not None else []
    return [*system, {"role": "user", "content": user_message}]


class ClientCore:
    """The state a client keeps between calls (settings, the model, what the server is) and its operations."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.model = settings.model
        self.info: ServerInfo | None = None

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    def retrying(self, effect: Effect) -> Op[Any]:
        """`effect`, performed again after a backoff while it fails in a retryable way (see `RetryPolicy`)."""
        attempt = 0
        while True:
            try:
                return (yield effect)
            except CAUGHT as exc:
                delay = self._retry_delay(exc, attempt)
            yield Sleep(delay)
            attempt += 1

    def _retry_delay(self, exc: BaseException, attempt: int) -> float:
        """Seconds to wait before trying again after `exc`; raises its `ClientError` when it is not retried."""
        policy = self.settings.retry
        if not policy.should_retry(attempt, is_retryable(exc)):
            raise translate_error(exc, self.base_url) from exc
        delay = policy.delay_s(attempt, retry_after_s(exc))
        log_retry(translate_error(exc, self.base_url), attempt, policy, delay)
        return delay

    def list_model_details(self) -> Op[list[dict[str, Any]]]:
        data = yield from self.retrying(Get(f"{self.base_url}/models"))
        return parse_models(data, self.base_url)

    def list_models(self) -> Op[list[str]]:
        return [entry["id"] for entry in (yield from self.list_model_details())]

    def resolve_model(self) -> Op[str]:
        if self.model is None:
            self.model = (yield from self.list_models())[0]
        return self.model

    def server_info(self) -> Op[ServerInfo]:
        if self.info is None:
            try:
                data = yield from self.retrying(Get(f"{self.settings.root_url}/version"))
            except ClientError as e:
                if e.status_code is None or e.status_code >= 500:
                    raise
                data = None
            self.info = parse_server_info(data)
        return self.info

    def _fold(self) -> Op[bool]:
        """Whether to fold the system prompt: as set, or (auto) unless the server is r1serve."""
        fold = self.settings.fold_system_prompt
        return (not (yield from self.server_info()).is_r1serve) if fold is None else fold

    def _request(self, messages: Any, stream: bool, kw: dict[str, Any]) -> Op[dict[str, Any]]:
        extra = {key: value for key, value in kw.items() if key not in ("stream", "temperature", "max_tokens")}
        prepared = prepare_messages(messages, (yield from self._fold()))
        return build_request((yield from self.resolve_model()), prepared, stream=stream,
                             temperature=kw.get("temperature"), max_tokens=kw.get("max_tokens"), extra=extra)

    def complete(self, messages: Any, kw: dict[str, Any]) -> Op[ChatResult]:
        """A chat completion, not streamed (a `stream` keyword is ignored)."""
        started = time.perf_counter()
        kwargs = yield from self._request(messages, False, kw)
        raw = yield from self.retrying(CreateChat(kwargs))
        try:
            response = raw.parse()
        except CAUGHT as exc:
            raise translate_error(exc, self.base_url) from exc
        return parse_completion(response, url=self.base_url, policy=raw.headers.get(POLICY_HEADER),
                                latency_s=time.perf_counter() - started, split=self.settings.split_reasoning)

    def open_stream(self, messages: Any, kw: dict[str, Any]) -> Op[tuple[Any, StreamAssembler]]:
        """A streamed chat completion opened (retried until it is): the SDK's stream and its assembler."""
        started = time.perf_counter()
        kwargs = yield from self._request(messages, True, kw)
        raw = yield from self.retrying(CreateChat(kwargs))
        assembler = StreamAssembler(url=self.base_url, started=started, policy=raw.headers.get(POLICY_HEADER),
                                    split=self.settings.split_reasoning)
        return raw.parse(), assembler

    def simple_chat(self, user_message: str, system_message: str | None, kw: dict[str, Any]) -> Op[str]:
        return (yield from self.complete(simple_messages(user_message, system_message), kw)).content

    def solve_math(self, problem: str, language: str, kw: dict[str, Any]) -> Op[MathResult]:
        return math_result((yield from self.complete(math_messages(problem, language), kw)))

    def health(self) -> Op[bool]:
        """True when `/health` answers 200, False on 503 (loading); other failures raise. Never retried."""
        root = self.settings.root_url
        try:
            yield Get(f"{root}/health")
        except CAUGHT as exc:
            error = translate_error(exc, root)
            if isinstance(error, ServerError) and error.status_code == 503:
                return False
            raise error from exc
        return True

    def wait_until_ready(self, timeout_s: float, poll_s: float) -> Op[None]:
        """Poll `health` until it is 200; `ClientTimeoutError` (with the last problem) after `timeout_s`."""
        deadline, last = time.monotonic() + timeout_s, "no answer"
        while time.monotonic() < deadline:
            try:
                if (yield from self.health()):
                    return
                last = "503: still loading"
            except ClientError as e:
                if not is_retryable(e):
                    raise
                last = e.message
            yield Sleep(poll_s)
        root = self.settings.root_url
        raise ClientTimeoutError(f"{root} not ready after {timeout_s:.0f} s ({last})", url=root)


class ClientBase:
    """What both clients share: the constructor (settings validated once, the SDK client built with its own
    retries off, since the core retries), `base_url`, and the `ClientCore` their methods run."""

    sdk_class: Any  # openai.OpenAI or openai.AsyncOpenAI

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
        self._core = ClientCore(self.settings)
        self._openai = self.sdk_class(base_url=self.settings.base_url, api_key=self.settings.api_key,
                                      timeout=timeout, max_retries=0, http_client=http_client)

    @property
    def base_url(self) -> str:
        return self.settings.base_url
