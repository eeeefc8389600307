"""Turn the records of one run into the figures a serving benchmark reports.

Definitions (the ones `vllm bench serve` uses, so figures compare): TTFT is the time from sending a request
to its first text-bearing chunk; time to first answer token (TTFA) is the time to the first chunk holding
non-blank answer text after the reasoning; TPOT is `(e2e - ttft) / (output_tokens - 1)`, so it excludes the
first token (requests with one output token have none); ITL is every gap between consecutive text chunks of
a request, pooled over all requests; e2e latency runs from sending to the end of the stream. Throughputs
divide by the run's duration, from the first request sent to the last one finished, and count completed
requests only. Percentiles interpolate linearly between the closest ranks, exactly as `numpy.percentile`'s
default: the p-th percentile of n sorted values sits at rank `p/100 * (n - 1)`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from r1serve.bench.request import RequestRecord

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el")


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) of `values` by linear interpolation (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be within 0..100, got {p}")
    ordered = sorted(values)
    rank = p / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency, in milliseconds."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0, None, None, None, None, None)
        ms = [v * 1000.0 for v in values]
        p50, p90, p99 = (percentile(ms, p) for p in PERCENTILES)
        return cls(len(ms), sum(ms) / len(ms), p50, p90, p99, max(ms))


def tpot_s(record: RequestRecord) -> float | None:
    """Time per output token after the first, or None when there is no second token."""
    ttft = record.ttft_s
    if ttft is None or not record.output_tokens or record.output_tokens < 2:
        return None
    return (record.e2e_s - ttft) / (record.output_tokens - 1)


def itl_s(record: RequestRecord) -> list[float]:
    """Each gap between consecutive text-bearing chunks of the request."""
    times = record.chunk_times
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """The most requests in flight at once (one ending as another starts does not overlap it)."""
    events = sorted([(r.start_s, 1) for r in records] + [(r.end_s, -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


@dataclass(frozen=True)
class Goodput:
    """Requests per second that completed within every SLO (milliseconds; a missing one is not checked)."""

    slos_ms: dict[str, float]
    num_good: int
    request_goodput: float
    fraction: float


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    values = {"ttft": record.ttft_s, "tpot": tpot_s(record) or 0.0, "e2el": record.e2e_s}
    for name, limit in slos_ms.items():
        value = values[name]
        if value is None or value * 1000.0 > limit:
            return False
    return True


@dataclass(frozen=True)
class RunSummary:
    """Everything reported about one load point on one endpoint."""

    num_requests: int
    num_completed: int
    num_failed: int
    num_cancelled: int
    errors: dict[str, int]
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    total_input_tokens: int
    total_output_tokens: int
    total_reasoning_tokens: int | None  # None when no response reported reasoning tokens in its usage
    peak_concurrency: int
    mean_concurrency: float
    num_answered: int
    ttft_ms: Distribution
    ttfa_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2el_ms: Distribution
    token_sources: dict[str, int]
    finish_reasons: dict[str, int]
    goodput: Goodput | None = None
    error_examples: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    records: Sequence[RequestRecord], num_cancelled: int = 0, slos_ms: dict[str, float] | None = None
) -> RunSummary:
    """The figures of one run; `num_cancelled` counts requests cut off by an interrupt (not failures)."""
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    duration = (max(r.end_s for r in records) - min(r.start_s for r in records)) if records else 0.0
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    input_tokens = sum(r.prompt_tokens or 0 for r in done)
    output_tokens = sum(r.output_tokens or 0 for r in done)
    goodput = None
    if slos_ms:
        num_good = sum(meets_slos(r, slos_ms) for r in done)
        fraction = num_good / len(records) if records else 0.0
        goodput = Goodput(dict(slos_ms), num_good, per_s(num_good), fraction)
    examples: dict[str, str] = {}
    for r in failed:
        examples.setdefault(str(r.error_type), str(r.error_message))
    return RunSummary(
        num_requests=len(records), num_completed=len(done), num_failed=len(failed),
        num_cancelled=num_cancelled,
        errors=dict(Counter(str(r.error_type) for r in failed)), duration_s=duration,
        request_throughput=per_s(len(done)), output_throughput=per_s(output_tokens),
        total_token_throughput=per_s(input_tokens + output_tokens),
        total_input_tokens=input_tokens, total_output_tokens=output_tokens,
        total_reasoning_tokens=_sum_known([r.reasoning_tokens for r in done]),
        peak_concurrency=peak_concurrency(records), mean_concurrency=per_s(sum(r.e2e_s for r in records)),
        num_answered=sum(r.first_answer_s is not None for r in done),
        ttft_ms=Distribution.of_seconds([t for r in done if (t := r.ttft_s) is not None]),
        ttfa_ms=Distribution.of_seconds([t for r in done if (t := r.first_answer_s) is not None]),
        tpot_ms=Distribution.of_seconds([t for r in done if (t := tpot_s(r)) is not None]),
        itl_ms=Distribution.of_seconds([gap for r in done for gap in itl_s(r)]),
        e2el_ms=Distribution.of_seconds([r.e2e_s for r in done]),
        token_sources=dict(Counter(str(r.token_source) for r in done)),
        finish_reasons=dict(Counter(str(r.finish_reason) for r in done)),
        goodput=goodput, error_examples=examples,
    )


def _sum_known(values: Sequence[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def parse_slos(items: Sequence[str]) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> `{"ttft": 500.0, "tpot": 50.0}` (milliseconds), with clear errors."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput {item!r}: expected NAME:MS, NAME one of {', '.join(SLO_METRICS)}")
        try:
            slos[name] = float(value)
        except ValueError as e:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from e
        if slos[name] <= 0:
            raise ValueError(f"--goodput {item!r}: the limit must be positive")
    return slos
