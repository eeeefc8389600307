"""Spread one load point over several bench processes, for loads one Python process cannot read fast enough.

Reading a token stream costs the client tens of microseconds of CPU per chunk (the event loop, HTTP parsing,
JSON), so one process tops out at some tens of thousands of chunks per second, less on a busy host; past
that the bench, not the server, would set the figures. `run_load_in_workers` splits the point: worker `i`
of `W` sends requests `i, i + W, i + 2W, ...` with concurrency `C // W` (the remainder to the first ones)
and, for a request rate `R`, its own Poisson process of rate `R / W` (a sum of independent Poisson
processes is the Poisson process of the summed rate, so the arrivals are as one process would send them).
All processes share one time origin (`time.perf_counter` reads the system's monotonic clock), so their
records merge into one run. Workers are started with `spawn` (never a fork of a running event loop); a
Ctrl-C reaching the parent is forwarded to them and each returns what finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import queue
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import httpx

from r1serve.bench.load import LoadPoint, LoadResult, run_load
from r1serve.bench.request import Endpoint, RequestRecord, send_request
from r1serve.bench.workloads import BenchRequest

START_DELAY_S = 0.05  # time origin a little after the go signal, so that every worker is waiting for it
POLL_S = 0.1


class WorkerError(RuntimeError):
    """A worker process died without returning its records."""


@dataclass(frozen=True)
class WorkerTask:
    """What worker `worker` of `num_workers` sends: its share of the requests and of the load."""

    worker: int
    num_workers: int
    endpoint: Endpoint
    requests: list[BenchRequest]
    point: LoadPoint
    seed: int
    tokenizer: str | None


def num_workers_for(point: LoadPoint, requested: int) -> int:
    """No more workers than requests in flight or requests to send allow (each needs at least one)."""
    return max(1, min(requested, point.concurrency or requested, point.num_prompts or requested))


def split_point(point: LoadPoint, num_workers: int) -> list[LoadPoint]:
    """The share of each worker: concurrency, rate and number of prompts divided as the module says."""
    shares = []
    for i in range(num_workers):
        concurrency = None
        if point.concurrency is not None:
            base, extra = divmod(point.concurrency, num_workers)
            concurrency = base + (1 if i < extra else 0)
        num_prompts = len(range(i, point.num_prompts, num_workers)) if point.num_prompts else None
        shares.append(replace(point, concurrency=concurrency, request_rate=point.request_rate / num_workers,
                              num_prompts=num_prompts))
    return shares


def make_tasks(endpoint: Endpoint, requests: list[BenchRequest], point: LoadPoint, seed: int,
               tokenizer: str | None, num_workers: int) -> list[WorkerTask]:
    return [WorkerTask(i, num_workers, endpoint, requests[i::num_workers] or requests, share, seed * 1000 + i,
                       tokenizer)
            for i, share in enumerate(split_point(point, num_workers))]


async def run_load_in_workers(
    tasks: list[WorkerTask], stop: asyncio.Event, on_progress: Callable[[int], None] | None = None,
) -> tuple[LoadResult, float]:
    """Run `tasks` in as many processes; returns the merged result and the busiest worker's CPU share."""
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    go, origin, done = ctx.Event(), ctx.Value("d", 0.0), ctx.Value("i", 0)
    processes = [ctx.Process(target=_worker_main, args=(t, results, go, origin, done), daemon=True) for t in tasks]
    for process in processes:
        process.start()
    try:
        await _collect(processes, results, len(tasks), "ready", stop)
        if stop.is_set():  # interrupted while the workers started: nothing was sent
            return LoadResult(records=[], num_cancelled=0, partial=True), 0.0
        origin.value = time.perf_counter() + START_DELAY_S
        go.set()
        outcomes = await _collect(processes, results, len(tasks), "result", stop, done, on_progress)
    finally:
        for process in processes:
            if not go.is_set():
                process.kill()
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    records: list[RequestRecord] = [r for o in outcomes for r in o["records"]]
    records.sort(key=lambda r: r.start_s)
    merged = LoadResult(records=records, num_cancelled=sum(o["num_cancelled"] for o in outcomes),
                        partial=any(o["partial"] for o in outcomes))
    return merged, max(o["cpu"] for o in outcomes)


async def _collect(
    processes: list[Any], results: Any, count: int, kind: str, stop: asyncio.Event,
    done: Any = None, on_progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Gather `count` messages of `kind` from the workers, forwarding a stop and reporting progress."""
    messages: list[dict[str, Any]] = []
    while len(messages) < count:
        with contextlib.suppress(queue.Empty):
            message = results.get_nowait()
            if message["kind"] == "error":
                raise WorkerError(f"bench worker {message['worker']} failed: {message['error']}")
            messages.append(message)
            continue
        if stop.is_set() and kind == "result":  # again at each poll: a worker may not have listened yet
            for process in processes:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGINT)
        dead = [p for p in processes if p.exitcode not in (None, 0)]
        if dead:
            raise WorkerError(f"a bench worker exited with code {dead[0].exitcode} before it reported")
        if on_progress and done is not None:
            on_progress(done.value)
        await asyncio.sleep(POLL_S)
    if on_progress and done is not None:
        on_progress(done.value)
    return messages


def _worker_main(task: WorkerTask, results: Any, go: Any, origin: Any, done: Any) -> None:
    """Process entry point: report ready, wait for the common start, run the share, send the records back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # until the event loop takes over: the parent forwards Ctrl-C
    try:
        results.put({"kind": "ready", "worker": task.worker})
        go.wait()
        results.put({"kind": "result", **asyncio.run(_worker_run(task, origin.value, done))})
    except Exception as e:  # report it: the parent turns it into one clear error
        results.put({"kind": "error", "worker": task.worker, "error": f"{type(e).__name__}: {e}"})


async def _worker_run(task: WorkerTask, start_at: float, done: Any) -> dict[str, Any]:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    counter = None
    if task.tokenizer:
        from r1serve.bench.tokens import BenchTokenizer

        counter = BenchTokenizer(task.tokenizer).count
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(task.endpoint.timeout_s)) as client:

        async def send(request: BenchRequest, index: int, run_start: float) -> RequestRecord:
            record = await send_request(client, task.endpoint, request, index, run_start, counter)
            record.index = task.worker + index * task.num_workers  # the index in the whole point
            return record

        def tick(_record: RequestRecord) -> None:
            with done.get_lock():
                done.value += 1

        cpu_start = time.process_time()
        load = await run_load(send, task.requests, task.point, task.seed, stop, on_done=tick, start_at=start_at)
        cpu = (time.process_time() - cpu_start) / max(time.perf_counter() - start_at, 1e-9)
    return {"worker": task.worker, "records": load.records, "num_cancelled": load.num_cancelled,
            "partial": load.partial, "cpu": cpu}
