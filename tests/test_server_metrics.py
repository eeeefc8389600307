"""The server's weighted inter-token-latency histogram exposes what prometheus_client's Histogram would."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from r1serve.server.metrics import ITL_BUCKETS, ServerMetrics, TokenHistogram


def _samples(registry: CollectorRegistry) -> list[str]:
    """The exposition's sample lines, without prometheus_client's `_created` timestamps."""
    return [line for line in generate_latest(registry).decode().splitlines()
            if line and not line.startswith("#") and "_created" not in line]


def test_weighted_observations_equal_one_by_one_observations() -> None:
    observed = [(0.0004, 3), (0.001, 1), (0.0123, 5), (0.3, 2), (2.5, 1), (7.0, 4)]  # bounds included: ≤ bound
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    histogram = TokenHistogram("itl_seconds", "gaps", ITL_BUCKETS)
    ours.register(histogram)
    reference = Histogram("itl_seconds", "gaps", buckets=ITL_BUCKETS, registry=theirs)
    for value, count in observed:
        histogram.observe(value, count)
        for _ in range(count):
            reference.observe(value)
    assert _samples(ours) == _samples(theirs)
    assert 'itl_seconds_bucket{le="0.001"} 4.0' in _samples(ours)
    assert "itl_seconds_count 16.0" in _samples(ours)


def test_request_timer_spreads_an_outputs_gap_over_its_tokens() -> None:
    metrics = ServerMetrics(lambda: None)
    timer = metrics.timer()
    timer.tokens(1)  # the first token: time to first token, no gap
    timer._last -= 0.02  # 20 ms before the next output
    timer.tokens(4)  # 4 tokens in one output: 4 gaps of ~5 ms
    lines = _samples(metrics.registry)
    assert "r1serve_inter_token_latency_seconds_count 4.0" in lines
    assert 'r1serve_inter_token_latency_seconds_bucket{le="0.001"} 0.0' in lines
    assert 'r1serve_inter_token_latency_seconds_bucket{le="0.01"} 4.0' in lines
    assert "r1serve_time_to_first_token_seconds_count 1.0" in lines
