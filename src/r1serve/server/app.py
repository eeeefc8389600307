"""`create_app(engine, settings)`: the FastAPI application of `r1serve serve`, its routes and its guards.

The app is built before the model is loaded, so that the port opens at once and `/health` can answer
"loading"; the loader attaches the engine to the app's `ServerState` when it is ready (`engine=None` here
means "not yet"). The routes are thin: authentication and the model name are checked here, the work is done
by `serving_chat` / `serving_completion`. Every response that is not a success is an OpenAI-shaped error.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.params import Depends as DependsParam
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from r1serve import __version__
from r1serve.model.quant.config import declared_quantization
from r1serve.server.docs import install_docs
from r1serve.server.errors import APIError, CatchUnexpectedMiddleware, install_error_handlers
from r1serve.server.limits import BodySizeLimit, MiB
from r1serve.server.metrics import HTTPMetricsMiddleware
from r1serve.server.openapi import (
    HEALTH_RESPONSES,
    METRICS_RESPONSES,
    VersionResponse,
    generation_responses,
    install_openapi,
    json_responses,
    models_responses,
)
from r1serve.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from r1serve.server.protocol_responses import ResponseObject, ResponsesRequest, ResponsesStreamEvent
from r1serve.server.serving_chat import create_chat_completion
from r1serve.server.serving_common import ClientDisconnected
from r1serve.server.serving_completion import create_completion
from r1serve.server.serving_responses import create_response
from r1serve.server.serving_tokenize import create_detokenize, create_tokenize
from r1serve.server.settings import ServerSettings
from r1serve.server.state import EngineClient, ServerState

logger = logging.getLogger("r1serve.server")

RUNTIME_FIELDS = ("device", "dtype", "attention", "kernels", "kv_cache_dtype")  # of /version, from the engine
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"; nobody reads it


def server_state(app: FastAPI) -> ServerState:
    """The `ServerState` of an app made by `create_app` (where the loader attaches the engine)."""
    return app.state.server


def _api_key_guard(settings: ServerSettings) -> list[DependsParam]:
    """The dependencies of the /v1 routes: with `--api-key`, one that demands `Authorization: Bearer <key>`
    (compared in constant time) and declares the bearer scheme in the OpenAPI document; without, none."""
    if not settings.api_key:
        return []
    expected = settings.api_key.encode()
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key")

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        token = credentials.credentials.strip().encode() if credentials is not None else b""
        if not hmac.compare_digest(token, expected):
            raise APIError(401, "missing or invalid API key: send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key")

    return [Depends(check)]


def _add_system_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", summary="200 once the model is loaded; 503 while it loads, after the engine died, or "
                                 "while the server shuts down", response_model=None, responses=HEALTH_RESPONSES)
    async def health() -> JSONResponse:
        if state.load_error is not None:
            return JSONResponse({"status": "failed", "error": state.load_error}, status_code=503)
        if state.engine_dead is not None:
            return JSONResponse({"status": "engine dead", "error": state.engine_dead}, status_code=503)
        if state.shutting_down:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version", summary="r1serve's version, how the model was loaded and how it runs")
    async def version() -> VersionResponse:
        settings = state.settings
        runtime = getattr(state.engine, "runtime_info", None)
        described = {k: v for k, v in (runtime() if callable(runtime) else {}).items()
                     if k in RUNTIME_FIELDS}
        return VersionResponse(version=__version__, model=settings.model, served_model_names=state.model_names,
                               load_format=settings.load_format, dummy_weights=settings.load_format == "dummy",
                               quantization=declared_quantization(settings.quantization, settings.model), **described)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
             responses=METRICS_RESPONSES)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _add_api_routes(app: FastAPI, state: ServerState) -> None:
    guard = _api_key_guard(state.settings)
    with_auth = bool(guard)

    @app.get("/v1/models", dependencies=guard, response_model=ModelList, responses=models_responses(with_auth))
    async def list_models() -> ModelList:
        engine = state.require_engine()
        cards = [ModelCard(id=name, created=state.created, root=state.settings.model,
                           max_model_len=engine.max_model_len) for name in state.model_names]
        return ModelList(data=cards)

    @app.post("/v1/chat/completions", dependencies=guard, response_model=ChatCompletionResponse,
              responses=generation_responses(ChatCompletionResponse, ChatCompletionChunk, with_auth))
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await create_chat_completion(request, raw_request, state)

    @app.post("/v1/responses", dependencies=guard, response_model=ResponseObject,
              responses=generation_responses(ResponseObject, ResponsesStreamEvent, with_auth),
              summary="OpenAI's Responses API: text in; reasoning and answer out as output items")
    async def responses(request: ResponsesRequest, raw_request: Request) -> Response:
        return await create_response(request, raw_request, state)

    @app.post("/v1/completions", dependencies=guard, response_model=CompletionResponse,
              responses=generation_responses(CompletionResponse, CompletionChunk, with_auth))
    async def completions(request: CompletionRequest, raw_request: Request) -> Response:
        return await create_completion(request, raw_request, state)


def _add_tokenizer_routes(app: FastAPI, state: ServerState) -> None:
    guard = _api_key_guard(state.settings)
    responses = json_responses(bool(guard))

    @app.post("/tokenize", dependencies=guard, response_model=TokenizeResponse, responses=responses,
              summary="token ids of a prompt, or of a conversation's chat prompt (vLLM's route)")
    async def tokenize(request: TokenizeRequest) -> Response:
        return await create_tokenize(request, state)

    @app.post("/detokenize", dependencies=guard, response_model=DetokenizeResponse, responses=responses,
              summary="the text of token ids (vLLM's route)")
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        return await create_detokenize(request, state)


async def _client_disconnected(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def create_app(engine: EngineClient | None, settings: ServerSettings) -> FastAPI:
    """The app serving `engine` under `settings`; with `engine=None` it answers 503 "loading" until the
    engine is attached with `server_state(app).engine = engine`."""
    app = FastAPI(title="r1serve", version=__version__, docs_url=None,
                  redoc_url=None,
                  description="OpenAI-compatible server for DeepSeek-R1-Distill-Qwen models, with the R1 usage "
                              "rules built in (see the x-r1serve-policy response header).")
    state = ServerState(settings=settings, engine=engine)
    app.state.server = state
    install_error_handlers(app)
    install_openapi(app)
    install_docs(app)
    app.add_exception_handler(ClientDisconnected, _client_disconnected)
    _add_system_routes(app, state)
    _add_api_routes(app, state)
    _add_tokenizer_routes(app, state)
    app.add_middleware(CatchUnexpectedMiddleware)
    app.add_middleware(BodySizeLimit, max_bytes=int(settings.max_request_body_mb * MiB))
    if settings.allowed_origins:  # CORS, answered before the routes (preflights carry no API key)
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                           allow_methods=settings.allowed_methods, allow_headers=settings.allowed_headers,
                           allow_credentials=settings.allow_credentials)
    app.add_middleware(HTTPMetricsMiddleware, metrics=state.metrics)  # outermost: also counts the 500s and 413s
    return app
