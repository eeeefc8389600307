"""The eval's statistics against values computed by hand: pass@k, majority vote with ties, bootstrap bounds on
a fixed seed, paired differences, and the per-(task, policy) metrics built from sample records."""

from __future__ import annotations

import math

import pytest

from r1serve.eval.metrics import compare, group_metrics, run_metrics
from r1serve.eval.records import SampleRecord
from r1serve.eval.stats import (
    bootstrap_ci,
    k_values,
    majority_vote,
    mean_std,
    paired_bootstrap_diff,
    pass_at_k,
    percentile,
)


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),                 # c / n
    (5, 2, 2, 1 - 3 / 10),          # 1 - C(3,2)/C(5,2)
    (4, 1, 2, 0.5),                 # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (10, 3, 5, 1 - 21 / 252),       # 1 - C(7,5)/C(10,5)
    (5, 0, 3, 0.0),
    (5, 3, 3, 1.0),                 # fewer than k wrong samples: always a right one
    (64, 1, 64, 1.0),
])
def test_pass_at_k_hand_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_the_binomial_formula_everywhere() -> None:
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, 2, 0), (5, 2, 6), (3, -1, 1)])
def test_pass_at_k_refuses_impossible_counts(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(n, c, k)


@pytest.mark.parametrize("keys, winner", [
    (["a", "b", "b"], 1),
    (["a", "b", "a", "b"], 0),        # tie: the answer seen first wins
    (["b", "a", "a", "b"], 0),
    (["x", "y", "z"], 0),             # three-way tie
    ([None, "x", None], 1),           # no-answer samples do not vote
    (["a", None, "b", "b"], 2),
    ([None, None], None),
    ([], None),
])
def test_majority_vote(keys: list[str | None], winner: int | None) -> None:
    assert majority_vote(keys) == winner


def test_mean_std() -> None:
    assert mean_std([0.4, 0.6]) == pytest.approx((0.5, math.sqrt(0.02)))
    assert mean_std([1.0]) == (1.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_bootstrap_bounds_by_hand() -> None:
    # Two values 0 and 1: a resample mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4 -> [0, 1].
    assert bootstrap_ci([0.0, 1.0], 10000, seed=0) == (0.0, 1.0)
    # [0,0,0,1]: P(mean=0)=(3/4)^4=.316, P(<=.5)=.949, P(<=.75)=.996 -> 2.5% at 0, 97.5% at 0.75.
    assert bootstrap_ci([0.0, 0.0, 0.0, 1.0], 10000, seed=0) == (0.0, 0.75)
    # Nine 1s and a 0: K zeros ~ Binomial(10, .1); P(K>=4)=.013 < .025 < P(K>=3)=.070 -> low 0.7, high 1.
    assert bootstrap_ci([1.0] * 9 + [0.0], 10000, seed=1) == (pytest.approx(0.7), 1.0)
    assert bootstrap_ci([0.3] * 5, 500, seed=3) == (pytest.approx(0.3), pytest.approx(0.3))


def test_bootstrap_is_seeded_and_close_to_the_normal_interval() -> None:
    values = [float(i % 3 == 0) for i in range(300)]  # mean 1/3
    assert bootstrap_ci(values, 2000, seed=7) == bootstrap_ci(values, 2000, seed=7)
    assert bootstrap_ci(values, 2000, seed=7) != bootstrap_ci(values, 2000, seed=8)
    low, high = bootstrap_ci(values, 4000, seed=7)
    half = 1.96 * math.sqrt((1 / 3) * (2 / 3) / 300)
    assert low == pytest.approx(1 / 3 - half, abs=0.01) and high == pytest.approx(1 / 3 + half, abs=0.01)


def test_paired_bootstrap_difference() -> None:
    diff, low, high = paired_bootstrap_diff([0, 0, 1, 1], [1, 1, 1, 1], 10000, seed=0)
    # differences [1,1,0,0]: P(resample mean=0)=P(=1)=1/16 > 2.5% -> the interval is [0, 1]
    assert (diff, low, high) == (0.5, 0.0, 1.0)
    diff, low, high = paired_bootstrap_diff([0.0] * 10, [1.0] * 9 + [0.0], 10000, seed=1)
    assert diff == pytest.approx(0.9) and low == pytest.approx(0.7) and high == 1.0
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap_diff([1.0], [1.0, 0.0])


def test_percentile_and_k_values() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 99) == 99.0
    assert percentile([], 50) is None
    assert k_values(1) == [1] and k_values(2) == [1, 2] and k_values(5) == [1, 2, 4, 5]
    assert k_values(64) == [1, 2, 4, 8, 16, 32, 64]


def _record(problem: str, index: int, correct: bool, extracted: str | None, **kw: object) -> SampleRecord:
    grade = {"correct": correct, "extracted": extracted, "source": "boxed", "method": "string", "detail": ""}
    return SampleRecord(task="t", policy=str(kw.pop("policy", "paper")), problem_id=problem, sample_index=index,
                        gold="18", seed=index, grade=grade, **kw)  # type: ignore[arg-type]


def _three_problems(policy: str = "paper") -> list[SampleRecord]:
    return [
        _record("p1", 0, True, "18", policy=policy, reasoning="r", reasoning_tokens=100, answer_tokens=10,
                latency_s=1.0, finish_reason="stop"),
        _record("p1", 1, False, "17", policy=policy, reasoning="r", reasoning_tokens=300, answer_tokens=20,
                latency_s=3.0, finish_reason="length"),
        _record("p2", 0, True, "18", policy=policy, reasoning="", reasoning_tokens=0, answer_tokens=30,
                latency_s=2.0, finish_reason="stop"),
        _record("p2", 1, True, "18.0", policy=policy, reasoning="r", reasoning_tokens=200, answer_tokens=40,
                latency_s=4.0, finish_reason="stop"),
        _record("p3", 0, False, None, policy=policy, reasoning="r", reasoning_tokens=400, answer_tokens=0,
                latency_s=5.0, finish_reason="repetition"),
        _record("p3", 1, False, "3", policy=policy, reasoning="r", reasoning_tokens=500, answer_tokens=0,
                latency_s=6.0, finish_reason="length"),
    ]


def test_group_metrics_by_hand() -> None:
    m = group_metrics("t", "paper", _three_problems(), num_errors=2, num_resamples=1000, seed=0)
    assert (m.num_problems, m.num_samples, m.num_errors, m.samples_per_problem) == (3, 6, 2, 2)
    assert m.pass1 == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m.pass1_per_set == pytest.approx([2 / 3, 1 / 3])  # sample 0 of each problem, then sample 1
    assert m.pass1_std == pytest.approx(math.sqrt(2 * (1 / 6) ** 2))
    assert m.pass_at_k == pytest.approx({1: 0.5, 2: 2 / 3})
    # maj@2: p1 ties 18 vs 17 -> 18 (first) right; p2 18 and 18.0 are one answer, right; p3 wrong
    assert m.maj_at_k == pytest.approx({1: 2 / 3, 2: 2 / 3})
    assert m.mean_reasoning_tokens == pytest.approx(1500 / 6) and m.mean_answer_tokens == pytest.approx(100 / 6)
    assert m.truncation_rate == pytest.approx(2 / 6) and m.empty_reasoning_rate == pytest.approx(1 / 6)
    assert m.no_answer_rate == pytest.approx(1 / 6) and m.repetition_stops == 1
    assert m.latency_p50_s == pytest.approx(3.5) and m.latency_p99_s == pytest.approx(5.95)
    assert m.pass1_ci is not None and m.pass1_ci[0] <= m.pass1 <= m.pass1_ci[1]


def test_comparison_is_paired_on_common_problems() -> None:
    better = [_record(p, i, True, "18", policy="system") for p in ("p1", "p2", "p3", "p4") for i in (0, 1)]
    base = group_metrics("t", "paper", _three_problems(), num_errors=0, num_resamples=1000, seed=0)
    other = group_metrics("t", "system", better, num_errors=0, num_resamples=1000, seed=0)
    c = compare(base, other, num_resamples=1000, seed=0)
    assert c is not None and c.num_problems == 3  # p4 has no baseline
    assert c.diff == pytest.approx(1.0 - 0.5)
    assert c.ci_low <= c.diff <= c.ci_high


def test_run_metrics_orders_groups_and_compares_with_the_first_policy() -> None:
    records = _three_problems("paper") + _three_problems("none")
    failed = [SampleRecord(task="t", policy="none", problem_id="p4", sample_index=0, gold="1", seed=0,
                           error="ServerError: boom")]
    result = run_metrics(records, failed, ["t"], ["none", "paper"], num_resamples=500, seed=0)
    assert [(g.task, g.policy) for g in result.groups] == [("t", "none"), ("t", "paper")]
    assert result.groups[0].num_errors == 1 and result.groups[1].num_errors == 0
    (comparison,) = result.comparisons
    assert (comparison.baseline, comparison.policy, comparison.diff) == ("none", "paper", 0.0)
    assert not comparison.excludes_zero
