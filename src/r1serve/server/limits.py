"""The limits that keep one client from holding the server: a request body size cap (413) and a deadline for
a connection to send its request head.

`BodySizeLimit` answers 413 in OpenAI's error shape for a body over `--max-request-body-mb`: at once from the
`Content-Length` header, or as soon as a chunked body grows past the cap, before the body is parsed. uvicorn
closes a keep-alive connection left idle after a response (`--timeout-keep-alive`), but not one that never
sends a request, or sends its headers a byte at a time; `guarded_h11_protocol` closes those after
`--timeout-request-header` seconds.
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from r1serve.server.errors import error_body

MiB = 1 << 20


class BodyTooLarge(Exception):
    """Raised from `receive` once the body has passed the cap."""


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` gets a 413 and is never read whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        exceeded = refused = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal refused
            if not exceeded:
                await send(message)
            elif not refused:  # the app answered its parse failure: answer 413 instead
                refused = True
                await self._refuse(send)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            if not refused:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        message = (f"request body too large: the limit is {self.max_bytes / MiB:g} MiB (--max-request-body-mb)")
        body = json.dumps(error_body(message, "invalid_request_error", code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request head has not fully arrived in time."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._head_deadline is None and self._awaiting_head():
            self._arm()  # a new request on a kept-alive connection
        super().data_received(data)
        if self._head_deadline is not None and not self._awaiting_head():
            self._head_deadline.cancel()
            self._head_deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        super().connection_lost(exc)

    def _awaiting_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _expire(self) -> None:
        self._head_deadline = None
        if self._awaiting_head() and not self.transport.is_closing():
            self.transport.close()


def guarded_h11_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """The protocol class for `uvicorn.Config(http=...)` with this request-head deadline."""
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), {"header_timeout_s": header_timeout_s})
