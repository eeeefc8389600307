"""Prometheus metrics of one server: HTTP traffic, request latencies, and the engine's own counters.

An operator needs to see whether the deployment is healthy (requests by status), how loaded it is (running
and waiting requests, KV-cache usage and free blocks) and how fast it is (TTFT, inter-token latency,
end-to-end latency, tokens). Each app gets its own `CollectorRegistry` (never the process-global one), so
two apps in one process (tests) never collide. Engine figures are read from `engine.stats()` at scrape time
by a custom collector, so they are never stale and cost nothing between scrapes.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0)

# (metric name, help, EngineStats attribute)
_ENGINE_GAUGES = (
    ("r1serve_num_requests_running", "Requests being prefilled or decoded by the engine", "num_running"),
    ("r1serve_num_requests_waiting", "Requests queued in the engine (including preempted ones)", "num_waiting"),
    ("r1serve_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0-1)", "kv_usage"),
    ("r1serve_kv_cache_free_blocks", "Free KV-cache blocks (including evictable cached ones)", "num_free_blocks"),
    ("r1serve_kv_cache_total_blocks", "KV-cache blocks in all", "num_total_blocks"),
)
_ENGINE_COUNTERS = (
    ("r1serve_prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded)", "num_prompt_tokens"),
    ("r1serve_generation_tokens", "Tokens generated", "num_generation_tokens"),
    ("r1serve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", "prefix_cache_queries"),
    ("r1serve_prefix_cache_hits", "Prompt tokens found in the prefix cache", "prefix_cache_hits"),
    ("r1serve_num_preemptions", "Sequences preempted (recomputed later) for lack of KV blocks", "num_preemptions"),
)


class EngineStatsCollector:
    """Turns `engine.stats()` into gauges and counters at scrape time; nothing while the model loads."""

    def __init__(self, get_stats: Callable[[], Any | None]) -> None:
        self._get_stats = get_stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self._get_stats()
        loaded = GaugeMetricFamily("r1serve_model_loaded", "1 once the model is loaded and serving")
        loaded.add_metric([], 0.0 if stats is None else 1.0)
        yield loaded
        if stats is None:
            return
        for name, help_, attr in _ENGINE_GAUGES:
            gauge = GaugeMetricFamily(name, help_)
            gauge.add_metric([], float(getattr(stats, attr)))
            yield gauge
        for name, help_, attr in _ENGINE_COUNTERS:
            counter = CounterMetricFamily(name, help_)
            counter.add_metric([], float(getattr(stats, attr)))
            yield counter


class TokenHistogram:
    """A histogram fed `count` equal observations at once: the inter-token latency, where an output that brings n
    tokens is n gaps of (time since the last output) / n. prometheus_client's `Histogram.observe` takes a lock and
    searches the buckets once per observation, i.e. once per streamed token, a few µs of the event loop each at
    hundreds of streams; this is one bucket search per output. Written only from the event loop (no lock); a
    scrape reads a copy of the counts. Exposed as a standard histogram (`_bucket`, `_count`, `_sum`)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = list(buckets)
        self._counts = [0] * (len(buckets) + 1)  # the last one: above every bound (+Inf)
        self._sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += count  # a bucket holds values ≤ its bound
        self._sum += value * count

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, count in zip([*map(floatToGoString, self._bounds), "+Inf"], counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], buckets, sum_value=total)
        yield family


class ServerMetrics:
    """The metrics of one app; `render()` is the `/metrics` body."""

    def __init__(self, get_stats: Callable[[], Any | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter("r1serve_http_requests", "HTTP requests by route and status code",
                                     ["route", "status"], registry=self.registry)
        self.requests_finished = Counter("r1serve_requests_finished", "Finished samples by finish reason",
                                         ["finish_reason"], registry=self.registry)
        self.ttft = Histogram("r1serve_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = TokenHistogram("r1serve_inter_token_latency_seconds", "Time between successive output tokens",
                                  ITL_BUCKETS)
        self.registry.register(self.itl)  # type: ignore[arg-type]
        self.e2e = Histogram("r1serve_e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.registry.register(EngineStatsCollector(get_stats))  # type: ignore[arg-type]

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """Latency bookkeeping of one request: call `tokens(n)` for each output that brought n new tokens."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self.arrival = time.perf_counter()
        self._last: float | None = None

    def tokens(self, num_new_tokens: int) -> None:
        if num_new_tokens <= 0:
            return
        now = time.perf_counter()
        if self._last is None:
            self._metrics.ttft.observe(now - self.arrival)
        else:
            self._metrics.itl.observe((now - self._last) / num_new_tokens, num_new_tokens)
        self._last = now

    def finished(self, finish_reasons: list[str]) -> None:
        self._metrics.e2e.observe(time.perf_counter() - self.arrival)
        for reason in finish_reasons:
            self._metrics.requests_finished.labels(finish_reason=reason).inc()


class HTTPMetricsMiddleware:
    """Counts every HTTP response by route template (not raw path: bounded labels) and status code."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                path = getattr(route, "path", None) or "unmatched"
                self.metrics.http_requests.labels(route=path, status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
