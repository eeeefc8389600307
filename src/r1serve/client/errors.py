"""Typed client errors, and the one place that turns the `openai` SDK's and the transport's errors into them.

The seeds' client printed errors and returned None; callers could not tell a server that is down from a
wrong key or a bad request. Here every failure is an exception of a precise type whose message is one line
that names the URL, what went wrong and, where there is one, the fix. `is_retryable` decides which failures
are worth another try (connection refused, 503 while the server loads, 429/502/504), never a 4xx that
would fail the same way again.
"""

from __future__ import annotations

from typing import Any

import openai

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
_TRANSPORT_MODULES = ("httpx", "httpx2", "httpcore", "httpcore2", "h11", "anyio")


class ClientError(Exception):
    """Base of every error the r1serve client raises. `status_code` is the HTTP status, if there was one."""

    def __init__(
        self, message: str, *, url: str | None = None, status_code: int | None = None, body: Any = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.url = url
        self.status_code = status_code
        self.body = body


class ClientConnectionError(ClientError):
    """The server could not be reached (refused, reset, DNS) or dropped the connection mid-stream."""


class ClientTimeoutError(ClientError):
    """The server did not answer within the client's timeout."""


class BadRequestError(ClientError, ValueError):
    """The request was refused as invalid (400/422), or was found invalid before it was sent."""


class AuthenticationError(ClientError):
    """The server refused the API key (401/403)."""


class ModelNotFoundError(ClientError):
    """The server does not serve the requested model (404 with an OpenAI-shaped error), or serves none."""


class ServerError(ClientError):
    """The server failed (5xx), is overloaded (429/503) or sent an error event in a stream."""


class NotOpenAICompatibleError(ClientError):
    """Something answered, but not as an OpenAI-compatible API does (wrong URL, other service)."""


def _server_message(exc: openai.APIStatusError) -> str | None:
    """The `message` of an OpenAI-shaped error body, or None when the body is not one."""
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return None


def _status_error(exc: openai.APIStatusError, url: str) -> ClientError:
    status, message = exc.status_code, _server_message(exc)
    kw: dict[str, Any] = {"url": url, "status_code": status, "body": exc.body}
    detail = message or f"HTTP {status}"
    if status in (400, 422):
        return BadRequestError(f"bad request ({status}): {detail}", **kw)
    if status in (401, 403):
        return AuthenticationError(
            f"{url} refused the API key ({status}): pass the server's key (api_key=..., --api-key or "
            "R1SERVE_API_KEY)",
            **kw,
        )
    if message is None and status in (404, 405, 415):
        return NotOpenAICompatibleError(
            f"{url} answered {status} without an OpenAI-shaped error: not an OpenAI-compatible API "
            "(the URL should end in /v1)",
            **kw,
        )
    if status == 404:
        return ModelNotFoundError(f"model not found on {url}: {message}", **kw)
    if status == 503:
        return ServerError(f"{url} is starting or overloaded (503): {detail}", **kw)
    if status >= 500 or status == 429:
        return ServerError(f"server error ({status}) from {url}: {detail}", **kw)
    return ClientError(f"unexpected answer ({status}) from {url}: {detail}", **kw)


def is_transport_error(exc: BaseException) -> bool:
    """True for errors of the HTTP transport (httpx, httpcore...), which the SDK does not always wrap."""
    return type(exc).__module__.split(".")[0] in _TRANSPORT_MODULES


def translate_error(exc: BaseException, url: str) -> ClientError:
    """The `ClientError` that stands for `exc` (an SDK, transport or parsing error) on a call to `url`."""
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return ClientTimeoutError(
            f"{url} did not answer in time (timeout); raise timeout= or check the server", url=url
        )
    if isinstance(exc, openai.APIConnectionError | ConnectionError) or is_transport_error(exc):
        cause = exc.__cause__ or exc
        return ClientConnectionError(
            f"cannot connect to {url}: {_short(cause)} (is the server running? start it with `r1serve serve`)",
            url=url,
        )
    if isinstance(exc, openai.APIStatusError):
        return _status_error(exc, url)
    if isinstance(exc, openai.APIError):  # an error event inside a stream
        return ServerError(f"server error from {url}: {exc.message}", url=url, body=exc.body)
    return NotOpenAICompatibleError(
        f"{url} did not answer like an OpenAI-compatible API ({type(exc).__name__}: {_short(exc)})", url=url
    )


def is_retryable(exc: BaseException) -> bool:
    """Connection failures and 429/502/503/504 are worth retrying; timeouts, 4xx and 500 are not."""
    if isinstance(exc, openai.APITimeoutError | ClientTimeoutError):
        return False
    if isinstance(
        exc, openai.APIConnectionError | ClientConnectionError | ConnectionError
    ) or is_transport_error(exc):
        return True
    status = getattr(exc, "status_code", None)
    return status in RETRYABLE_STATUS


def retry_after_s(exc: BaseException) -> float | None:
    """The server's `Retry-After` (seconds) on a status error, if it sent one that parses."""
    response = getattr(exc, "response", None)
    value = getattr(response, "headers", {}).get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
