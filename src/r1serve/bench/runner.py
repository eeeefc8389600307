"""Run a whole benchmark: for each endpoint in turn, find its model, probe what it accepts, then warm up and
measure every load point, collecting records and summaries into one `BenchResult`.

This is where the bench meets a real server, so it is also where the bad cases are handled: an endpoint that
cannot be reached stops the run with one clear `BenchError`; one that rejects `ignore_eos` is probed once and
then sent requests without it, with a note in the result; a Ctrl-C (the `stop` event) ends the point being
measured, skips the rest, and marks the result partial. The same prompts go to every endpoint: they are
built once per load point from the seed (a different seed per point, so that a sweep against one server
does not hit its prefix cache with the previous point's prompts).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import httpx

from r1serve.bench.config import BenchConfig
from r1serve.bench.load import LoadPoint, LoadResult, run_load
from r1serve.bench.metrics import RunSummary, summarize
from r1serve.bench.request import Endpoint, RequestRecord, error_message_of, send_request
from r1serve.bench.tokens import BenchTokenizer
from r1serve.bench.workers import WorkerError, make_tasks, num_workers_for, run_load_in_workers
from r1serve.bench.workloads import BenchRequest, build_requests

CLIENT_CPU_WARNING = 0.8  # above this share of one core, the client may be what limits the figures
DURATION_POOL = 1000  # prompts built for a --duration run without --num-prompts (cycled if it lasts longer)
Log = Callable[[str], None]
# (label, total) -> update(number done so far; None closes it)
Progress = Callable[[str, int | None], Callable[[int | None], None]]


class BenchError(Exception):
    """A problem that stops the benchmark: printed as one line, exit status 1."""


@dataclass
class PointRun:
    """One load point measured on one endpoint."""

    endpoint: int  # index into BenchResult.endpoints (the same URL may be given twice)
    url: str
    model: str
    point: LoadPoint
    summary: RunSummary
    records: list[RequestRecord]
    partial: bool
    client_cpu: float = 0.0  # CPU seconds of this bench process per wall second while measuring (1.0 = a core)


@dataclass
class BenchResult:
    config: BenchConfig
    runs: list[PointRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    endpoints: list[dict[str, Any]] = field(default_factory=list)  # per --url: url, model, max_model_len, ...
    partial: bool = False
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


def normalize_url(url: str) -> str:
    """`http://host:8000/v1/` -> `http://host:8000`; a URL without a scheme is an error."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise BenchError(f"--url {url!r}: expected http://HOST:PORT or https://…")
    return url[: -len("/v1")] if url.endswith("/v1") else url


async def discover(client: httpx.AsyncClient, url: str, api_key: str | None) -> dict[str, Any]:
    """GET /v1/models: the served model ids and `max_model_len` when given. Unreachable -> BenchError."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = await client.get(f"{url}/v1/models", headers=headers, timeout=10.0)
    except httpx.ConnectError as e:
        raise BenchError(f"cannot reach {url}: {e or 'connection refused'} (is the server running?)") from e
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {url}: {type(e).__name__}: {e}") from e
    if response.status_code != 200:
        return {"models": [], "error": error_message_of(response.content, response.status_code)}
    try:
        data = response.json().get("data") or []
    except (ValueError, AttributeError):
        data = []
    models = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
    return {"models": [m["id"] for m in models],
            "max_model_len": models[0].get("max_model_len") if models else None}


async def probe_ignore_eos(client: httpx.AsyncClient, endpoint: Endpoint, log: Log) -> Endpoint:
    """Send one tiny request with `ignore_eos`; if the endpoint answers 400 and accepts it without, drop it."""
    probe = BenchRequest(prompt="Hello", prompt_len=None, max_tokens=1, fixed_output=True)
    record = await send_request(client, endpoint, probe, -1, time.perf_counter())
    if record.ok or record.error_type != "http_400":
        return endpoint
    plain = Endpoint(**{**endpoint.__dict__, "ignore_eos": False})
    if not (await send_request(client, plain, probe, -1, time.perf_counter())).ok:
        return endpoint
    log(f"{endpoint.url} rejects ignore_eos ({record.error_message}); sending without it, so outputs may end "
        "before --output-len")
    return plain


class Runner:
    """Runs `config` against each URL; `stop` set (Ctrl-C) ends it early with what was measured."""

    def __init__(self, config: BenchConfig, stop: asyncio.Event, log: Log, progress: Progress | None = None) -> None:
        self.config = config
        self.stop = stop
        self.log = log
        self.progress = progress
        self.tokenizer = BenchTokenizer(config.tokenizer) if config.tokenizer else None
        self.result = BenchResult(config)
        self._prompts: dict[int, list[BenchRequest]] = {}

    async def run(self) -> BenchResult:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(self.config.timeout_s)) as client:
            endpoints = [await self._endpoint(client, normalize_url(url)) for url in self.config.urls]
            for i, endpoint in enumerate(endpoints):
                for k, point in enumerate(self.config.points):
                    if self.stop.is_set():
                        self.result.partial = True
                        return self.result
                    await self._run_point(client, i, endpoint, k, point)
        return self.result

    async def _endpoint(self, client: httpx.AsyncClient, url: str) -> Endpoint:
        info = await discover(client, url, self.config.api_key)
        model = self.config.model or (info["models"][0] if info["models"] else None)
        if model is None:
            raise BenchError(f"{url} lists no model ({info.get('error', 'empty /v1/models')}); pass --model")
        endpoint = Endpoint(
            url=url, kind=self.config.endpoint, model=model, api_key=self.config.api_key,
            ignore_eos=self.config.ignore_eos, temperature=self.config.temperature,
            prompt_template=self.config.completion_template(), extra_body=dict(self.config.extra_body),
            timeout_s=self.config.timeout_s,
        )
        num_probes = 0
        if endpoint.ignore_eos and self.config.workload.fixed_output:
            probed = await probe_ignore_eos(client, endpoint, self._note)
            num_probes = 1 if probed is endpoint else 2
            endpoint = probed
        self.result.endpoints.append({"url": url, "model": model, "max_model_len": info.get("max_model_len"),
                                      "ignore_eos": endpoint.ignore_eos, "num_probe_requests": num_probes})
        return endpoint

    def _note(self, text: str) -> None:
        self.result.notes.append(text)
        self.log(text)

    def prompts(self, k: int, point: LoadPoint) -> list[BenchRequest]:
        """The prompts of load point `k` (measured first, then the warm-ups), the same for every endpoint."""
        if k not in self._prompts:
            count = (point.num_prompts or DURATION_POOL) + self.config.num_warmups
            self._prompts[k] = build_requests(self.config.workload, count, self.config.seed + k, self.tokenizer)
        return self._prompts[k]

    async def _run_point(
        self, client: httpx.AsyncClient, i: int, endpoint: Endpoint, k: int, point: LoadPoint
    ) -> None:
        prompts = self.prompts(k, point)
        num_measured = len(prompts) - self.config.num_warmups
        self._check_lengths(i, prompts)
        counter = self.tokenizer.count if self.tokenizer else None

        async def send(request: BenchRequest, index: int, run_start: float) -> RequestRecord:
            return await send_request(client, endpoint, request, index, run_start, counter)

        if self.config.num_warmups:
            await self._warm_up(send, prompts[num_measured:], point)
        if self.stop.is_set():
            self.result.partial = True
            return
        update = self.progress(f"{_host(endpoint.url)} {point.label()}", point.num_prompts) if self.progress else None
        try:
            if num_workers_for(point, self.config.num_workers) > 1:
                load, client_cpu = await self._measure_in_workers(endpoint, prompts[:num_measured], k, point, update)
            else:
                load, client_cpu = await self._measure(send, prompts[:num_measured], k, point, update)
        finally:
            if update:
                update(None)
        summary = summarize(load.records, load.num_cancelled, self.config.goodput_slos_ms or None)
        self.result.runs.append(PointRun(i, endpoint.url, endpoint.model, point, summary, load.records,
                                         load.partial, client_cpu))
        self.result.partial = self.result.partial or load.partial
        if client_cpu > CLIENT_CPU_WARNING:
            self._note(f"[{i + 1}] {point.label()}: a bench process used {client_cpu:.0%} of a CPU core; "
                       "figures may be limited by the client (use more --num-workers, or free cores)")

    async def _measure(
        self, send: Any, requests: list[BenchRequest], k: int, point: LoadPoint, update: Any
    ) -> tuple[LoadResult, float]:
        """The point in this process; returns the records and this process's CPU share while measuring."""
        done = [0]

        def on_done(_record: RequestRecord) -> None:
            done[0] += 1
            if update:
                update(done[0])

        cpu_start, wall_start = time.process_time(), time.perf_counter()
        load = await run_load(send, requests, point, self.config.seed + k, self.stop, on_done=on_done)
        return load, (time.process_time() - cpu_start) / max(time.perf_counter() - wall_start, 1e-9)

    async def _measure_in_workers(
        self, endpoint: Endpoint, requests: list[BenchRequest], k: int, point: LoadPoint, update: Any
    ) -> tuple[LoadResult, float]:
        """The point spread over `--num-workers` processes (see workers.py)."""
        tasks = make_tasks(endpoint, requests, point, self.config.seed + k, self.config.tokenizer,
                           num_workers_for(point, self.config.num_workers))
        try:
            return await run_load_in_workers(tasks, self.stop, on_progress=update)
        except WorkerError as e:
            raise BenchError(str(e)) from e

    async def _warm_up(self, send: Any, warmups: list[BenchRequest], point: LoadPoint) -> None:
        size = min(point.concurrency or len(warmups), len(warmups))
        load = await run_load(send, warmups, LoadPoint(concurrency=size, num_prompts=len(warmups)),
                              self.config.seed, self.stop)
        failed = [r for r in load.records if not r.ok]
        if failed:
            self._note(f"warm-up: {len(failed)} of {len(warmups)} requests failed ({failed[0].error_message})")

    def _check_lengths(self, i: int, prompts: list[BenchRequest]) -> None:
        url, limit = self.result.endpoints[i]["url"], self.result.endpoints[i].get("max_model_len")
        if not isinstance(limit, int):
            return
        longest = max(((p.prompt_len or 0) + (p.max_tokens or 0)) for p in prompts)
        if longest > limit:
            self._note(f"{url}: prompts plus --output-len reach {longest} tokens, over its max_model_len "
                       f"{limit}; those requests will fail")


def _host(url: str) -> str:
    return url.split("://", 1)[-1]
