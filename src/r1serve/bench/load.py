"""When requests are sent: a fixed number in flight, a Poisson arrival rate, or both, until enough were sent.

`run_load` is the load generator of one measurement point. It issues requests in order (cycling through the
prompt list when a `--duration` outlives it), either as soon as a slot is free (`concurrency`), or at
exponentially distributed gaps of mean `1/request_rate` drawn from a seeded generator (a Poisson process, so
the same seed gives the same schedule), or at the rate with at most `concurrency` in flight. It stops sending
after `num_prompts` requests or `duration_s` seconds and waits for those in flight; when `stop` is set
(Ctrl-C) it cancels what is in flight at once and reports the run as partial.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from r1serve.bench.request import RequestRecord
from r1serve.bench.workloads import BenchRequest

# (request, index, run_start) -> record
SendFn = Callable[[BenchRequest, int, float], Awaitable[RequestRecord]]
OnDone = Callable[[RequestRecord], None]


@dataclass(frozen=True)
class LoadPoint:
    """One point of load: at most `concurrency` in flight (None: no limit), arrivals at `request_rate` per
    second (inf: all at once), for `num_prompts` requests and/or `duration_s` seconds."""

    concurrency: int | None = None
    request_rate: float = math.inf
    num_prompts: int | None = None
    duration_s: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if not self.request_rate > 0:
            raise ValueError(f"request rate must be positive (or inf), got {self.request_rate}")
        if self.num_prompts is None and self.duration_s is None:
            raise ValueError("a load point needs --num-prompts or --duration")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be at least 1, got {self.num_prompts}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"--duration must be positive, got {self.duration_s}")
        if self.num_prompts is None and self.concurrency is None and math.isinf(self.request_rate):
            raise ValueError("--duration without --num-prompts needs --concurrency or a finite "
                             "--request-rate (else it would send requests without limit)")

    def label(self) -> str:
        parts = []
        if self.concurrency is not None:
            parts.append(f"concurrency {self.concurrency}")
        if math.isfinite(self.request_rate) or not parts:
            parts.append(f"rate {self.request_rate:g}/s")
        return ", ".join(parts)


@dataclass
class LoadResult:
    records: list[RequestRecord]
    num_cancelled: int
    partial: bool


def arrival_gaps(rate: float, rng: random.Random) -> Callable[[], float]:
    """Seconds to wait before each request: exponential with mean 1/rate (Poisson arrivals), or 0 for inf."""
    if math.isinf(rate):
        return lambda: 0.0
    return lambda: rng.expovariate(rate)


async def run_load(
    send: SendFn, requests: Sequence[BenchRequest], point: LoadPoint, seed: int,
    stop: asyncio.Event | None = None, on_done: OnDone | None = None, start_at: float | None = None,
) -> LoadResult:
    """Run one load point; returns the records of every request that finished (successfully or not).

    `start_at` (a `time.perf_counter()` value, the same clock in every process) makes several processes
    share one time origin; by default the run starts now.
    """
    if not requests:
        raise ValueError("no requests to send")
    stop = stop or asyncio.Event()
    records: list[RequestRecord] = []
    in_flight: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(point.concurrency) if point.concurrency else None
    run_start = time.perf_counter() if start_at is None else start_at
    num_sent = 0

    async def one(request: BenchRequest, index: int) -> None:
        try:
            record = await send(request, index, run_start)
            records.append(record)
            if on_done:
                on_done(record)
        finally:
            if slots:
                slots.release()

    async def dispatch() -> None:
        nonlocal num_sent
        gap = arrival_gaps(point.request_rate, random.Random(seed))
        deadline = run_start + point.duration_s if point.duration_s else math.inf
        index, next_at = 0, run_start
        while point.num_prompts is None or index < point.num_prompts:
            next_at += gap()  # an absolute schedule: sleeping late once does not slow the rate after
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            if slots:
                await slots.acquire()
            if time.perf_counter() >= deadline:
                if slots:
                    slots.release()
                return
            task = asyncio.create_task(one(requests[index % len(requests)], index))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            index += 1
            num_sent = index

    partial = await _until_done_or_stopped(dispatch(), in_flight, stop)
    return LoadResult(records=records, num_cancelled=num_sent - len(records), partial=partial)


async def _until_done_or_stopped(
    dispatch: Awaitable[None], in_flight: set[asyncio.Task[None]], stop: asyncio.Event
) -> bool:
    """Await the dispatcher, then all in flight; if `stop` is set first, cancel all. True if stopped."""
    stopper = asyncio.ensure_future(stop.wait())
    dispatcher = asyncio.ensure_future(dispatch)
    try:
        await asyncio.wait({dispatcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
        while not stop.is_set() and in_flight:
            await asyncio.wait({stopper, *in_flight}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            dispatcher.result()  # re-raise a dispatcher bug rather than hide it
            return False
        pending = list(in_flight)
        for task in [dispatcher, *pending]:
            task.cancel()
        await asyncio.gather(dispatcher, *pending, return_exceptions=True)
        return True
    finally:
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopper
