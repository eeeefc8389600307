"""Benchmark arithmetic against hand-computed timestamps, and the load generator with a fake sender."""

from __future__ import annotations

import asyncio
import math
import random

import numpy as np
import pytest

from r1serve.bench.load import LoadPoint, arrival_gaps, run_load
from r1serve.bench.metrics import itl_s, parse_slos, peak_concurrency, percentile, summarize, tpot_s
from r1serve.bench.request import RequestRecord
from r1serve.bench.workloads import BenchRequest


def _records() -> list[RequestRecord]:
    a = RequestRecord(0, start_s=0.0, end_s=0.4, ok=True, chunk_times=[0.1, 0.15, 0.25, 0.30],
                      prompt_tokens=10, output_tokens=4, token_source="usage", first_answer_s=0.25,
                      reasoning_tokens=3, finish_reason="length")
    b = RequestRecord(1, start_s=0.2, end_s=1.0, ok=True, chunk_times=[0.3, 0.5],  # 5 tokens in 2 chunks
                      prompt_tokens=20, output_tokens=5, token_source="usage", finish_reason="length")
    c = RequestRecord(2, start_s=0.5, end_s=0.6, ok=False, error_type="http_500", error_message="HTTP 500: x")
    d = RequestRecord(3, start_s=0.1, end_s=0.25, ok=True, chunk_times=[0.2],
                      prompt_tokens=30, output_tokens=1, token_source="tokenizer")
    return [a, b, c, d]


def test_per_request_tpot_and_itl() -> None:
    a, b, _, d = _records()
    assert tpot_s(a) == pytest.approx((0.4 - 0.1) / 3)  # excludes the first token
    assert tpot_s(b) == pytest.approx((0.8 - 0.3) / 4)  # from usage tokens, not chunks
    assert tpot_s(d) is None  # one token: no TPOT
    assert itl_s(a) == pytest.approx([0.05, 0.10, 0.05])
    assert itl_s(b) == pytest.approx([0.2])
    assert itl_s(d) == []


def test_summary_by_hand() -> None:
    s = summarize(_records())
    assert (s.num_requests, s.num_completed, s.num_failed) == (4, 3, 1)
    assert s.errors == {"http_500": 1}
    assert s.error_examples == {"http_500": "HTTP 500: x"}
    assert s.duration_s == pytest.approx(1.0)
    assert s.request_throughput == pytest.approx(3.0)
    assert s.output_throughput == pytest.approx(10.0)
    assert s.total_token_throughput == pytest.approx(70.0)
    assert (s.total_input_tokens, s.total_output_tokens, s.total_reasoning_tokens) == (60, 10, 3)
    assert s.peak_concurrency == 3
    assert s.mean_concurrency == pytest.approx((0.4 + 0.8 + 0.1 + 0.15) / 1.0)
    assert s.token_sources == {"usage": 2, "tokenizer": 1}
    assert s.finish_reasons == {"length": 2, "None": 1}
    assert s.num_answered == 1
    assert (s.ttft_ms.count, s.ttft_ms.mean, s.ttft_ms.p50) == (3, pytest.approx(200), pytest.approx(200))
    assert s.ttft_ms.p90 == pytest.approx(280) and s.ttft_ms.p99 == pytest.approx(298)
    assert s.ttft_ms.max == pytest.approx(300)
    assert s.tpot_ms.mean == pytest.approx(112.5) and s.tpot_ms.p90 == pytest.approx(122.5)
    assert s.itl_ms.mean == pytest.approx(100) and s.itl_ms.p50 == pytest.approx(75)
    assert s.itl_ms.p99 == pytest.approx(197)
    assert s.e2el_ms.mean == pytest.approx(450) and s.e2el_ms.max == pytest.approx(800)
    assert s.ttfa_ms.count == 1 and s.ttfa_ms.p50 == pytest.approx(250)


@pytest.mark.parametrize("slos, num_good", [
    ({"ttft": 250}, 2), ({"ttft": 250, "tpot": 110}, 2), ({"tpot": 110}, 2), ({"e2el": 300}, 1),
    ({"ttft": 50}, 0),
])
def test_goodput(slos: dict[str, float], num_good: int) -> None:
    g = summarize(_records(), slos_ms=slos).goodput
    assert g is not None
    assert g.num_good == num_good
    assert g.request_goodput == pytest.approx(num_good / 1.0)
    assert g.fraction == pytest.approx(num_good / 4)


def test_empty_summary() -> None:
    s = summarize([])
    assert s.num_requests == 0 and s.request_throughput == 0.0 and s.ttft_ms.p50 is None
    assert s.total_reasoning_tokens is None


def test_percentile_matches_numpy() -> None:
    rng = random.Random(3)
    for n in (1, 2, 3, 10, 101):
        values = [rng.expovariate(1.0) for _ in range(n)]
        for p in (0, 1, 50, 90, 99, 99.9, 100):
            assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="0..100"):
        percentile([1.0], 101)


def test_peak_concurrency_touching_intervals_do_not_overlap() -> None:
    recs = [RequestRecord(i, start_s=float(i), end_s=float(i + 1), ok=True) for i in range(3)]
    assert peak_concurrency(recs) == 1


def test_parse_slos() -> None:
    assert parse_slos(["ttft:500", "tpot:50.5", "e2el:2000"]) == {"ttft": 500.0, "tpot": 50.5, "e2el": 2000.0}
    for bad, msg in [("ttft=5", "NAME:MS"), ("itl:5", "NAME:MS"), ("ttft:abc", "not a number"), ("ttft:0", "positive")]:
        with pytest.raises(ValueError, match=msg):
            parse_slos([bad])


# --- the load generator, with a fake sender (no network) ---

REQ = BenchRequest(prompt="x", prompt_len=1, max_tokens=1, fixed_output=True)


def _sender(latency_s: float, started: list[float]):
    async def send(request: BenchRequest, index: int, run_start: float) -> RequestRecord:
        loop = asyncio.get_running_loop()
        start = loop.time()
        started.append(start)
        await asyncio.sleep(latency_s)
        return RequestRecord(index, start_s=start, end_s=loop.time(), ok=True, chunk_times=[0.0],
                             output_tokens=1)
    return send


def test_concurrency_limit_is_held_and_reached() -> None:
    started: list[float] = []
    result = asyncio.run(run_load(_sender(0.02, started), [REQ] * 3, LoadPoint(concurrency=4, num_prompts=20), 0))
    assert len(result.records) == 20 and not result.partial and result.num_cancelled == 0
    assert sorted(r.index for r in result.records) == list(range(20))
    assert peak_concurrency(result.records) == 4


def test_unlimited_rate_sends_everything_at_once() -> None:
    started: list[float] = []
    result = asyncio.run(run_load(_sender(0.05, started), [REQ], LoadPoint(num_prompts=10), 0))
    assert peak_concurrency(result.records) == 10
    assert max(started) - min(started) < 0.04


def test_poisson_gaps_are_seeded_with_the_right_mean() -> None:
    first = arrival_gaps(50.0, random.Random(7))
    second = arrival_gaps(50.0, random.Random(7))
    gaps = [first() for _ in range(20000)]
    assert gaps[:100] == [second() for _ in range(100)]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50.0, rel=0.03)
    assert arrival_gaps(math.inf, random.Random(0))() == 0.0


def test_request_rate_spreads_arrivals() -> None:
    started: list[float] = []
    asyncio.run(run_load(_sender(0.0, started), [REQ], LoadPoint(request_rate=200.0, num_prompts=20), 1))
    span = max(started) - min(started)
    gap = arrival_gaps(200.0, random.Random(1))  # the seeded schedule run_load follows
    gaps = [gap() for _ in range(20)]
    assert span == pytest.approx(sum(gaps[1:]), abs=0.015)  # the first gap comes before the first start
    assert span > 0.03


def test_duration_stops_sending() -> None:
    started: list[float] = []
    point = LoadPoint(concurrency=2, duration_s=0.2)
    result = asyncio.run(run_load(_sender(0.02, started), [REQ] * 3, point, 0))
    assert 6 <= len(result.records) <= 24  # about 0.2 s / 0.02 s * 2 slots = 20
    assert max(started) - min(started) < 0.25


def test_stop_event_cancels_in_flight_and_marks_partial() -> None:
    async def go():
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.15, stop.set)
        return await run_load(_sender(0.1, []), [REQ], LoadPoint(concurrency=3, num_prompts=100), 0, stop)

    result = asyncio.run(go())
    assert result.partial
    assert len(result.records) == 3  # the first wave finished at 0.1 s, the second was cut at 0.15 s
    assert result.num_cancelled == 3


@pytest.mark.parametrize("kwargs, msg", [
    ({"concurrency": 0, "num_prompts": 1}, "concurrency"),
    ({"request_rate": 0.0, "num_prompts": 1}, "rate"),
    ({}, "--num-prompts or --duration"),
    ({"duration_s": 1.0}, "without limit"),
    ({"num_prompts": 0}, "--num-prompts"),
])
def test_bad_load_points(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        LoadPoint(**kwargs)


def test_split_point_over_workers() -> None:
    from r1serve.bench.workers import num_workers_for, split_point

    shares = split_point(LoadPoint(concurrency=7, request_rate=16.0, num_prompts=10), 3)
    assert [s.concurrency for s in shares] == [3, 2, 2]
    assert [s.num_prompts for s in shares] == [4, 3, 3]
    assert all(s.request_rate == pytest.approx(16.0 / 3) for s in shares)
    unlimited = split_point(LoadPoint(num_prompts=5), 2)
    assert [(s.concurrency, s.request_rate, s.num_prompts) for s in unlimited] == [(None, math.inf, 3),
                                                                                  (None, math.inf, 2)]
    assert num_workers_for(LoadPoint(concurrency=1, num_prompts=100), 4) == 1
    assert num_workers_for(LoadPoint(num_prompts=3), 8) == 3
    assert num_workers_for(LoadPoint(concurrency=64, duration_s=5.0), 4) == 4
