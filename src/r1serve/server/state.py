"""What one running server knows: its settings, its engine (once loaded), its metrics, its in-flight requests.

The HTTP port opens before the model is loaded (so `/health` can say "loading"), and SIGTERM must be able to
abort what is still running after the grace period: both need one object that the routes, the loader thread
and the shutdown logic share. `ServerState` is that object; `EngineClient` is the slice of `AsyncEngine` the
server uses, written as a protocol so tests can serve from a scripted engine too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from r1serve.outputs import RequestOutput
from r1serve.sampling_params import SamplingParams
from r1serve.server.errors import APIError, unavailable
from r1serve.server.metrics import ServerMetrics
from r1serve.server.policy import PolicyConfig
from r1serve.server.settings import ServerSettings

logger = logging.getLogger("r1serve.server")


RETRY_AFTER_S = 1  # what a 503 for load or overload asks the client to wait
RETRY_AFTER_DEAD_S = 10  # a dead engine: the supervisor restarts the server meanwhile


class EngineClient(Protocol):
    """The part of `r1serve.engine.async_engine.AsyncEngine` the server relies on."""

    tokenizer: Any
    max_model_len: int
    dead_reason: str | None  # set when the engine has stopped for good

    def generate(self, prompt: str | list[int], params: SamplingParams,
                 request_id: str | None = None) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> Any: ...

    def shutdown(self) -> None: ...


@dataclass
class ServerState:
    """Shared by the routes, the loader thread and the shutdown logic of one app."""

    settings: ServerSettings
    engine: EngineClient | None = None
    load_error: str | None = None
    shutting_down: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: set[str] = field(default_factory=set)  # engine request ids being served
    metrics: ServerMetrics = field(init=False)
    policy: PolicyConfig = field(init=False)
    model_names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.engine_stats)
        self.policy = self.settings.policy_config()
        self.model_names = self.settings.model_names()

    def engine_stats(self) -> Any | None:
        return None if self.engine is None else self.engine.stats()

    @property
    def engine_dead(self) -> str | None:
        """Why the engine stopped for good, or None while it lives (or has not been loaded yet)."""
        return None if self.engine is None else getattr(self.engine, "dead_reason", None)

    def require_engine(self) -> EngineClient:
        """The engine, or the 503 a client should retry later (with `Retry-After`)."""
        if self.engine_dead is not None:
            raise unavailable(f"the engine has stopped ({self.engine_dead}); the server is exiting so that its "
                              "supervisor restarts it", "engine_dead", RETRY_AFTER_DEAD_S)
        if self.shutting_down:
            raise unavailable("the server is shutting down", "shutting_down", RETRY_AFTER_DEAD_S)
        if self.engine is None:
            message = "the model is still loading; retry shortly (GET /health says when it is ready)"
            raise unavailable(message, "model_loading", RETRY_AFTER_S)
        return self.engine

    def admit(self, request_id: str) -> None:
        """Count a request as pending from the moment it is accepted (until `release`), or refuse it with a 503
        when `--max-pending-requests` are pending already: streamed or not, tokenizing, queued or running."""
        if len(self.in_flight) >= self.settings.max_pending_requests:
            raise unavailable(f"server overloaded: {len(self.in_flight)} requests in progress "
                              f"(--max-pending-requests {self.settings.max_pending_requests}); retry later",
                              "overloaded", RETRY_AFTER_S)
        self.in_flight.add(request_id)

    def release(self, request_id: str) -> None:
        """The request's response is over (any way it ended): it no longer counts as pending."""
        self.in_flight.discard(request_id)

    def check_model(self, name: str) -> None:
        """404 unless `name` is one of the names the model answers to."""
        if name not in self.model_names:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                                f"{', '.join(repr(n) for n in self.model_names)} (GET /v1/models)",
                           param="model", code="model_not_found")

    async def abort_all(self) -> int:
        """End every in-flight request now (shutdown after the grace period): the engine is shut down, which
        finishes each of them with finish_reason "abort", so their responses still end properly. Returns how
        many there were."""
        engine, num_in_flight = self.engine, len(self.in_flight)
        if engine is None or not num_in_flight:
            return 0
        await asyncio.to_thread(engine.shutdown)
        return num_in_flight
