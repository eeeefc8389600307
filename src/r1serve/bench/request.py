"""Send one streaming request to an OpenAI-compatible endpoint and time every chunk of its answer.

The body is read as raw bytes through `httpx` and parsed by the bench's own SSE parser, so each chunk's
arrival time is the moment its bytes left the socket, not when a client library chose to yield it. Every
outcome becomes a `RequestRecord`: a success with its timings and token counts, or a failure with an error
type (`http_429`, `connect_error`, `timeout`, `stream_error`, `incomplete_stream`, ...) and the message, so
that a server failing some requests is measured and counted, never a crash of the run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from r1serve.bench.sse import SSEParser
from r1serve.bench.stream import StreamError, StreamState
from r1serve.bench.workloads import BenchRequest

EndpointKind = Literal["completions", "chat"]
ROUTES: dict[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
# The R1 chat format without BOS (servers add BOS to completion prompts), ending in forced thinking.
R1_TEMPLATE = "<｜User｜>{prompt}<｜Assistant｜><think>\n"


@dataclass(frozen=True)
class Endpoint:
    """Where and how to send: base URL (no `/v1`), route, model, and the fields every request shares."""

    url: str
    kind: EndpointKind
    model: str
    api_key: str | None = None
    ignore_eos: bool = True  # send `ignore_eos` for fixed-output workloads (off when the server rejects it)
    temperature: float | None = None
    prompt_template: str | None = None  # completions only: e.g. R1_TEMPLATE; None sends the prompt as is
    extra_body: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 3600.0

    @property
    def route_url(self) -> str:
        return self.url + ROUTES[self.kind]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class RequestRecord:
    """The outcome of one request. Seconds; `start_s` and `end_s` count from the start of the run."""

    index: int
    start_s: float
    end_s: float
    ok: bool
    error_type: str | None = None
    error_message: str | None = None
    chunk_times: list[float] = field(default_factory=list)  # seconds since this request was sent
    first_answer_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None  # of output_tokens, when the server's usage says
    token_source: str | None = None  # "usage", "tokenizer" or "chunks"
    finish_reason: str | None = None

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None


TokenCounter = Callable[[str], int]


def build_payload(endpoint: Endpoint, request: BenchRequest) -> dict[str, Any]:
    """The JSON body for `request` on `endpoint`, streaming with usage in the last chunk."""
    payload: dict[str, Any] = {"model": endpoint.model, "stream": True,
                               "stream_options": {"include_usage": True}}
    if endpoint.kind == "chat":
        payload["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        template = endpoint.prompt_template
        payload["prompt"] = template.format(prompt=request.prompt) if template else request.prompt
    if request.max_tokens is not None:
        payload["max_tokens"] = request.max_tokens
    if request.fixed_output and endpoint.ignore_eos:
        payload["ignore_eos"] = True
    if endpoint.temperature is not None:
        payload["temperature"] = endpoint.temperature
    payload.update(endpoint.extra_body)
    return payload


async def send_request(
    client: httpx.AsyncClient, endpoint: Endpoint, request: BenchRequest, index: int, run_start: float,
    count_tokens: TokenCounter | None = None,
) -> RequestRecord:
    """Send `request`, read its stream to the end, return what happened (server faults never raise)."""
    start = time.perf_counter()
    state = StreamState()
    record = RequestRecord(index=index, start_s=start - run_start, end_s=0.0, ok=False)
    try:
        await _stream(client, endpoint, build_payload(endpoint, request), state, start)
        record.ok = True
    except StreamError as e:
        record.error_type, record.error_message = e.error_type, str(e)
    except httpx.TimeoutException as e:
        record.error_type, record.error_message = "timeout", f"{type(e).__name__}: {e}"
    except httpx.ConnectError as e:
        record.error_type, record.error_message = "connect_error", str(e) or type(e).__name__
    except httpx.HTTPError as e:
        record.error_type, record.error_message = "connection_error", f"{type(e).__name__}: {e}"
    record.end_s = time.perf_counter() - run_start
    record.chunk_times = state.chunk_times
    record.first_answer_s = state.first_answer_time
    record.finish_reason = state.finish_reason
    if record.ok:
        _count_tokens(record, state, request, count_tokens)
    return record


async def _stream(
    client: httpx.AsyncClient, endpoint: Endpoint, payload: dict[str, Any], state: StreamState, start: float
) -> None:
    parser = SSEParser()
    async with client.stream("POST", endpoint.route_url, json=payload, headers=endpoint.headers(),
                             timeout=endpoint.timeout_s) as response:
        if response.status_code != 200:
            body = await response.aread()
            raise StreamError(f"http_{response.status_code}", error_message_of(body, response.status_code))
        async for chunk in response.aiter_bytes():
            now = time.perf_counter() - start
            for event in parser.feed(chunk):
                if event.is_done:
                    return
                state.on_data(event.data, now)
        now = time.perf_counter() - start
        for event in parser.close():
            if event.is_done:
                return
            state.on_data(event.data, now)
    raise StreamError("incomplete_stream", "the stream ended without `data: [DONE]`")


def _count_tokens(
    record: RequestRecord, state: StreamState, request: BenchRequest, count_tokens: TokenCounter | None
) -> None:
    """Token counts from the server's usage block, else the tokenizer, else one token per text chunk."""
    prompt_tokens, output_tokens = state.usage_tokens()
    if output_tokens is not None:
        record.token_source = "usage"
    elif count_tokens is not None:
        record.token_source, output_tokens = "tokenizer", count_tokens(state.output_text)
    else:
        record.token_source, output_tokens = "chunks", len(state.chunk_times)
    if prompt_tokens is None:
        prompt_tokens = request.prompt_len
    record.prompt_tokens, record.output_tokens = prompt_tokens, output_tokens
    record.reasoning_tokens = state.reasoning_tokens()


def error_message_of(body: bytes, status: int) -> str:
    """The `error.message` of an OpenAI-shaped error body, else the start of the body."""
    text = body.decode("utf-8", errors="replace")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return f"HTTP {status}: {text[:200]}".strip()
    error = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return f"HTTP {status}: {error['message']}"
    if isinstance(obj, dict) and obj.get("detail"):
        return f"HTTP {status}: {obj['detail']}"
    return f"HTTP {status}: {text[:200]}"
