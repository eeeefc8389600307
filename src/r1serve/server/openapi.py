"""What the OpenAPI document (`/openapi.json`, `/docs`) says beyond what FastAPI infers from the routes.

FastAPI documents a route's success model and a 422 validation error; r1serve never sends a 422 (validation
errors are OpenAI-shaped 400s, errors.py), and it does send 400, 401, 404, 413, 500 and 503, streams as
`text/event-stream` and serves `/metrics` as Prometheus text. The `responses` of each route are declared here,
in one place, so that the document describes what the server sends and clients or fuzzers generated from it
(`tests/test_api_fuzz.py`) can hold the server to it.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

Responses = dict[int | str, dict[str, Any]]


class ErrorInfo(BaseModel):
    message: str = Field(description="what went wrong, for a person")
    type: str = Field(description="OpenAI's error class, e.g. invalid_request_error")
    param: str | None = Field(description="the request field at fault, e.g. messages[0].content")
    code: str | None = Field(description="a stable machine-readable reason, e.g. invalid_value")


class ErrorResponse(BaseModel):
    """Every error the server sends: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorInfo


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "shutting down", "failed"]
    error: str | None = Field(None, description="why loading failed (status 'failed' only)")


class VersionResponse(BaseModel):
    version: str
    model: str
    served_model_names: list[str]
    load_format: str
    dummy_weights: bool
    quantization: str
    # How the loaded model runs (None while it loads): `ModelRunner.describe`.
    device: str | None = None
    dtype: str | None = None
    attention: str | None = None
    kernels: str | None = None
    kv_cache_dtype: str | None = None


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if headers:
        response["headers"] = headers
    return response


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying (overload, engine restart)",
                               "schema": {"type": "integer", "minimum": 0}}}

UNAUTHORIZED: Responses = {401: _error("`--api-key` is set and the bearer key is missing or wrong "
                                       "(code `invalid_api_key`)")}

UNAVAILABLE: Responses = {503: _error("the model is loading, the server is shutting down or overloaded, or the "
                                      "engine died (codes `model_loading`, `shutting_down`, `overloaded`)",
                                      RETRY_AFTER)}

SSE_DESCRIPTION = ("with `\"stream\": true`: server-sent events, `data: {chunk}` lines ending with "
                   "`data: [DONE]`; an error after the stream started is a `data: {\"error\": {...}}` event")


def sse_event_schema(chunk_model: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event: its `data` is `[DONE]` or JSON, a chunk or an error (OpenAPI 3.1 reads a
    text/event-stream schema as the schema of each event)."""
    chunk = {"$ref": f"#/components/schemas/{chunk_model.__name__}"}
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    json_data = {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [chunk, error]}}
    return {"type": "object", "required": ["data"], "description": SSE_DESCRIPTION,
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}

GENERATION_ERRORS: Responses = {
    400: _error("invalid request: malformed JSON, a wrong type or value (`param` names the field), a prompt over "
                "the context window, an unsupported feature (codes `invalid_json`, `invalid_type`, "
                "`invalid_value`, `missing_field`, `context_length_exceeded`, `unsupported`)"),
    404: _error("unknown model (code `model_not_found`, `param` `model`)"),
    413: _error("request body over the server's size limit"),
    500: _error("the engine failed while serving this request (logged on the server)"),
    **UNAVAILABLE,
}


def generation_responses(response_model: type[BaseModel], chunk_model: type[BaseModel],
                         with_auth: bool) -> Responses:
    """The `responses` of `POST /v1/chat/completions` and `POST /v1/completions`."""
    success = {"model": response_model, "description": "the full answer, or a stream (see text/event-stream)",
               "content": {"text/event-stream": {"schema": sse_event_schema(chunk_model)}}}
    return {200: success, **GENERATION_ERRORS, **(UNAUTHORIZED if with_auth else {})}


TOKENIZE_ERRORS: Responses = {
    400: _error("invalid request: malformed JSON, a wrong type or value (`param` names the field), neither or both "
                "of `prompt` and `messages`, a text over the context window, a token id outside the vocabulary "
                "(codes `invalid_json`, `invalid_type`, `invalid_value`, `missing_field`, "
                "`context_length_exceeded`, `invalid_token_id`, `unsupported`)"),
    404: _error("unknown model (code `model_not_found`, `param` `model`)"),
    413: _error("request body over the server's size limit"),
    500: _error("the server failed while serving this request (logged on the server)"),
    **UNAVAILABLE,
}


def json_responses(with_auth: bool) -> Responses:
    """The error `responses` of the POST routes that answer JSON only (`/tokenize`, `/detokenize`)."""
    return {**TOKENIZE_ERRORS, **(UNAUTHORIZED if with_auth else {})}


def models_responses(with_auth: bool) -> Responses:
    """The error `responses` of `GET /v1/models`."""
    return {**UNAVAILABLE, **(UNAUTHORIZED if with_auth else {})}


HEALTH_RESPONSES: Responses = {
    200: {"model": HealthResponse, "description": "the model is loaded and serving"},
    503: {"model": HealthResponse, "description": "loading, shutting down, or failed to load (with `error`)"},
}

METRICS_RESPONSES: Responses = {
    200: {"description": "Prometheus text exposition format",
          "content": {"text/plain": {"schema": {"type": "string"}}}},
}


def install_openapi(app: FastAPI) -> None:
    """Generate the document without FastAPI's 422 (and its schemas), which this server never sends."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description,
                                   routes=app.routes)
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = document.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
