"""Server-sent events as OpenAI streams them, and a streaming response that never leaks a request.

OpenAI streams are `data: <json>\\n\\n` events ending with `data: [DONE]\\n\\n`. A stream's events differ mostly in
one text (a token's worth of reasoning or answer), so `EventTemplate` serialises such an event once and fills in the
escaped text, byte for byte the event `sse_event` makes of a fresh dict at a small part of its cost (figures in
docs/performance.md). `SSEResponse` adds what the plain `StreamingResponse` leaves to chance: whatever ends the
response (the stream finishing, the client disconnecting, the server shutting down), the event generator is
closed right away, so the engine request it wraps is aborted and its KV blocks come back now rather than
whenever the garbage collector runs.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from json.encoder import encode_basestring  # what json.dumps(ensure_ascii=False) writes for a str
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: dict[str, Any]) -> str:
    """One `data:` event of compact JSON (non-ASCII kept as is, so Chinese text is not six bytes a char)."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


TEXT_SLOT = "\x00r1serve text slot\x00"
"""Where an `EventTemplate`'s text goes (no text of ours holds NULs around these words)."""


class EventTemplate:
    """`sse_event(data)` for data whose only variable is one text (in one or more places, written `TEXT_SLOT`):
    serialised once here; `fill(text)` is then the event with `text` in the slots, byte for byte what
    `sse_event` gives for that data."""

    __slots__ = ("_parts",)

    def __init__(self, data: dict[str, Any]) -> None:
        self._parts = sse_event(data).split(encode_basestring(TEXT_SLOT))
        if len(self._parts) < 2:
            raise ValueError("the template's data has no TEXT_SLOT")

    def fill(self, text: str) -> str:
        return encode_basestring(text).join(self._parts)


def parse_sse_data(lines: list[str]) -> list[dict[str, Any] | str]:
    """The payloads of an SSE body's `data:` lines: decoded JSON objects, and the `[DONE]` marker as a str."""
    payloads: list[dict[str, Any] | str] = []
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


class SSEResponse(StreamingResponse):
    """A `text/event-stream` response whose body generator is always closed when the response ends."""

    def __init__(self, content: AsyncIterator[str], headers: dict[str, str] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})
        self._events = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):  # also when the response itself was cancelled
                    await aclose()
            if self._on_close is not None:  # e.g. the request stops counting as pending
                self._on_close()
