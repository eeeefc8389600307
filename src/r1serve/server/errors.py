"""OpenAI-shaped errors: one exception type for the handlers to raise, and the glue that answers every failure
with `{"error": {"message", "type", "param", "code"}}` and the right status.

Clients built on the `openai` SDK map statuses to exception classes (400 `BadRequestError`, 401
`AuthenticationError`, 404 `NotFoundError`, 503/500 retried) and show `error.message`, so every failure the
server can produce, including FastAPI's own validation errors, unknown routes and bugs, must take this shape.
An unexpected exception is logged once with its traceback and answered as a plain 500 error: no stack trace
ever reaches the client, and the server keeps serving.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("r1serve.server")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """A failure to answer with an OpenAI-shaped error body."""

    def __init__(self, status_code: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.headers = headers
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or ERROR_TYPES.get(status_code, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    merged = {**(error.headers or {}), **(headers or {})}
    return JSONResponse(error.body(), status_code=error.status_code, headers=merged or None)


def unavailable(message: str, code: str, retry_after_s: int) -> APIError:
    """A 503 that tells the client when to try again (`Retry-After`, seconds)."""
    return APIError(503, message, code=code, headers={"Retry-After": str(retry_after_s)})


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# pydantic names the member of a union it tried (`str`, `list[constrained-int]`, `function-after[...]`, a
# discriminator's tag) in an error's `loc`; those are not fields, and a field name is always an identifier.
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNION_MEMBER_NAMES = frozenset({"str", "int", "float", "bool", "none"})


def _param_of(loc: tuple[Any, ...]) -> str | None:
    """`("body", "messages", 0, "user message", "content", "str")` -> `messages[0].content`."""
    text = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _FIELD_NAME.fullmatch(part) and part not in _UNION_MEMBER_NAMES:
            text += f".{part}" if text else part
    return text or None


def _most_relevant(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Of the errors pydantic reports (one per union member it tried), the one to show: a wrong value rather
    than a wrong type (the member whose type matched), then the deepest (the member that got furthest)."""
    values = [e for e in errors if not str(e.get("type", "")).endswith("_type")]
    candidates = values or errors
    return max(candidates, key=lambda e: len(e.get("loc", ())))  # max keeps the first of equals


def _field_message(error: dict[str, Any], param: str) -> str:
    kind, message = error.get("type"), str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "finite_number":
        return f"{param} must be a finite number, got {error.get('input')!r}"
    if kind == "missing":
        return f"{param} is required"
    return f"{param}: {message}"


def _field_code(kind: str) -> str:
    if kind == "missing":
        return "missing_field"
    return "invalid_type" if kind.endswith("_type") else "invalid_value"


def validation_error(exc: RequestValidationError) -> APIError:
    """The most relevant problem pydantic found, as a 400 that names the field and has a `code`."""
    errors = list(exc.errors())
    if not errors:
        return bad_request("invalid request body", code="invalid_json")
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", first["msg"])
        return bad_request(f"request body is not valid JSON: {reason}", code="invalid_json")
    error = _most_relevant(errors)
    kind = str(error.get("type", ""))
    param = _param_of(tuple(error.get("loc", ())))
    if param is None and kind == "missing":
        return bad_request("a JSON request body is required", code="invalid_json")
    if param is None:
        return bad_request(f"request body must be a JSON object ({error.get('msg')})", code="invalid_json")
    if kind == "invalid_role":  # the messages' discriminator: the role is what is wrong
        param += ".role"
    return bad_request(_field_message(error, param), param=param, code=_field_code(kind))


def body_parse_error(cause: BaseException | None) -> APIError:
    """A body FastAPI could not even decode (it raises a bare 400 for anything but a JSON syntax error)."""
    if isinstance(cause, UnicodeDecodeError):
        return bad_request(f"request body is not valid UTF-8 ({cause.reason} at byte {cause.start})",
                           code="invalid_json")
    if isinstance(cause, RecursionError):
        return bad_request("request body is not valid JSON: nested too deeply", code="invalid_json")
    return bad_request("request body could not be parsed as JSON", code="invalid_json")


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_error(exc))


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = getattr(exc, "headers", None)
    if exc.status_code == 400:  # FastAPI's "There was an error parsing the body"
        return error_response(body_parse_error(exc.__cause__), headers=headers)
    if exc.status_code == 404:
        error = APIError(404, f"no route {request.method} {request.url.path}", code="route_not_found")
    elif exc.status_code == 405:
        error = APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                         code="method_not_allowed")
    else:
        error = APIError(exc.status_code, str(exc.detail))
    return error_response(error, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error FastAPI or a handler raises to an OpenAI-shaped response."""
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)


class CatchUnexpectedMiddleware:
    """Outermost guard: an exception no handler caught is logged once (with traceback) and answered as an
    OpenAI 500 error if the response has not started; a started response (a stream) is simply ended."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("unexpected error while serving %s %s", scope.get("method"), scope.get("path"))
            if started:
                return
            body = json.dumps(error_body("internal server error (logged on the server)",
                                         ERROR_TYPES[500])).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
