"""Metrics of a run, per task, policy and endpoint, computed from its sample records, and the comparisons.

This is where the numbers in `summary.json` and the report come from, and nothing else computes them. For
each (task, policy): pass@1 as the mean over problems of the fraction of correct samples, its standard
deviation over the sample sets (set j = the j-th sample of every problem) and a bootstrap interval over
problems; pass@k and maj@k; mean reasoning and answer tokens; truncation, skipped-thinking and no-answer
rates; repetition stops; latency percentiles; errors (excluded from accuracy, counted). When several policies
run on a task, each is compared with the first at each endpoint; when several endpoints run, each is
compared with the first for each policy. Both comparisons are the same paired bootstrap over the problems
both sides finished (`_paired`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from r1serve.eval.grading import vote_key
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


@dataclass(frozen=True)
class GroupMetrics:
    """The metrics of one (task, policy, endpoint); accuracies are fractions in [0, 1], None where undefined."""

    task: str
    policy: str
    num_problems: int
    num_samples: int
    num_errors: int
    samples_per_problem: int
    pass1: float | None
    pass1_std: float | None
    pass1_ci: tuple[float, float] | None
    pass1_per_set: list[float]
    pass_at_k: dict[int, float]
    maj_at_k: dict[int, float]
    mean_reasoning_tokens: float | None
    mean_answer_tokens: float | None
    truncation_rate: float | None
    empty_reasoning_rate: float | None
    no_answer_rate: float | None
    repetition_stops: int
    latency_p50_s: float | None
    latency_p99_s: float | None
    grader_methods: dict[str, int]
    per_problem: dict[str, float] = field(repr=False)  # problem id -> fraction correct
    endpoint: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("per_problem")
        data["pass_at_k"] = {str(k): v for k, v in self.pass_at_k.items()}
        data["maj_at_k"] = {str(k): v for k, v in self.maj_at_k.items()}
        return data


class _PairedInterval:
    """What a comparison row says of its paired interval [ci_low, ci_high] on the difference."""

    ci_low: float
    ci_high: float

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low > 0.0 or self.ci_high < 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "excludes_zero": self.excludes_zero}  # type: ignore[call-overload]


@dataclass(frozen=True)
class Comparison(_PairedInterval):
    """pass@1 of `policy` minus that of `baseline` (policies) at one endpoint, with a paired interval."""

    task: str
    baseline: str
    policy: str
    num_problems: int
    baseline_pass1: float
    policy_pass1: float
    diff: float
    ci_low: float
    ci_high: float
    endpoint: str = ""


@dataclass(frozen=True)
class EndpointComparison(_PairedInterval):
    """pass@1 at `endpoint` minus that at `baseline` (endpoint labels) for one policy, with a paired interval."""

    task: str
    policy: str
    baseline: str
    endpoint: str
    num_problems: int
    baseline_pass1: float
    endpoint_pass1: float
    diff: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class _Paired:
    num_problems: int
    baseline_pass1: float
    other_pass1: float
    diff: float
    ci_low: float
    ci_high: float


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _by_problem(records: Sequence[SampleRecord]) -> dict[str, list[SampleRecord]]:
    grouped: dict[str, list[SampleRecord]] = defaultdict(list)
    for r in records:
        grouped[r.problem_id].append(r)
    return {pid: sorted(rs, key=lambda r: r.sample_index) for pid, rs in grouped.items()}


def _set_accuracies(problems: dict[str, list[SampleRecord]]) -> list[float]:
    by_set: dict[int, list[bool]] = defaultdict(list)
    for samples in problems.values():
        for r in samples:
            by_set[r.sample_index].append(r.correct)
    return [sum(v) / len(v) for _, v in sorted(by_set.items())]


def _k_metrics(problems: dict[str, list[SampleRecord]], n: int) -> tuple[dict[int, float], dict[int, float]]:
    """pass@k and maj@k for each reported k, over the problems that have at least k samples."""
    pass_k, maj_k = {}, {}
    for k in k_values(n):
        eligible = [s for s in problems.values() if len(s) >= k]
        if not eligible:
            continue
        pass_k[k] = sum(pass_at_k(len(s), sum(r.correct for r in s), k) for s in eligible) / len(eligible)
        wins = []
        for samples in eligible:
            winner = majority_vote([vote_key(r.extracted) for r in samples[:k]])
            wins.append(winner is not None and samples[winner].correct)
        maj_k[k] = sum(wins) / len(eligible)
    return pass_k, maj_k


def group_metrics(task: str, policy: str, records: Sequence[SampleRecord], *, num_errors: int,
                  num_resamples: int, seed: int, endpoint: str = "") -> GroupMetrics:
    """The metrics of one (task, policy, endpoint) from its successful records (`num_errors` failed ones)."""
    problems = _by_problem(records)
    per_problem = {pid: sum(r.correct for r in s) / len(s) for pid, s in problems.items()}
    n = max((len(s) for s in problems.values()), default=0)
    sets = _set_accuracies(problems)
    pass_k, maj_k = _k_metrics(problems, n) if n else ({}, {})
    values = list(per_problem.values())
    latencies = [r.latency_s for r in records if r.latency_s is not None]
    return GroupMetrics(
        task=task, policy=policy, num_problems=len(problems), num_samples=len(records), num_errors=num_errors,
        samples_per_problem=n,
        pass1=_mean(values),
        pass1_std=mean_std(sets)[1] if sets else None,
        pass1_ci=bootstrap_ci(values, num_resamples, seed) if values else None,
        pass1_per_set=sets, pass_at_k=pass_k, maj_at_k=maj_k,
        mean_reasoning_tokens=_mean([r.reasoning_tokens for r in records if r.reasoning_tokens is not None]),
        mean_answer_tokens=_mean([r.answer_tokens for r in records if r.answer_tokens is not None]),
        truncation_rate=_rate([r.finish_reason == "length" for r in records]),
        empty_reasoning_rate=_rate([not r.reasoning.strip() for r in records]),
        no_answer_rate=_rate([r.extracted is None for r in records]),
        repetition_stops=sum(r.finish_reason == "repetition" for r in records),
        latency_p50_s=percentile(latencies, 50), latency_p99_s=percentile(latencies, 99),
        grader_methods=dict(Counter(str((r.grade or {}).get("method")) for r in records)),
        per_problem=per_problem, endpoint=endpoint,
    )


def _paired(baseline: GroupMetrics, other: GroupMetrics, num_resamples: int, seed: int) -> _Paired | None:
    """pass@1 of `other` minus `baseline` on their common problems, paired-bootstrapped (None: none common)."""
    common = sorted(set(baseline.per_problem) & set(other.per_problem))
    if not common:
        return None
    a = [baseline.per_problem[p] for p in common]
    b = [other.per_problem[p] for p in common]
    diff, low, high = paired_bootstrap_diff(a, b, num_resamples, seed)
    return _Paired(len(common), sum(a) / len(a), sum(b) / len(b), diff, low, high)


def compare(baseline: GroupMetrics, other: GroupMetrics, *, num_resamples: int, seed: int) -> Comparison | None:
    """The paired comparison of two policies on one task at one endpoint (None if they share no problem)."""
    p = _paired(baseline, other, num_resamples, seed)
    if p is None:
        return None
    return Comparison(task=baseline.task, baseline=baseline.policy, policy=other.policy,
                      num_problems=p.num_problems, baseline_pass1=p.baseline_pass1, policy_pass1=p.other_pass1,
                      diff=p.diff, ci_low=p.ci_low, ci_high=p.ci_high, endpoint=baseline.endpoint)


def compare_endpoints(baseline: GroupMetrics, other: GroupMetrics, *, num_resamples: int,
                      seed: int) -> EndpointComparison | None:
    """The paired comparison of two endpoints on one task and policy (None if they share no problem)."""
    p = _paired(baseline, other, num_resamples, seed)
    if p is None:
        return None
    return EndpointComparison(task=baseline.task, policy=baseline.policy, baseline=baseline.endpoint,
                              endpoint=other.endpoint, num_problems=p.num_problems,
                              baseline_pass1=p.baseline_pass1, endpoint_pass1=p.other_pass1, diff=p.diff,
                              ci_low=p.ci_low, ci_high=p.ci_high)


@dataclass(frozen=True)
class RunMetrics:
    groups: list[GroupMetrics]
    comparisons: list[Comparison]  # policies, within each endpoint
    endpoint_comparisons: list[EndpointComparison] = field(default_factory=list)  # endpoints, within each policy


def _first_against_rest(groups: Sequence[GroupMetrics], fn: Callable[..., Any], num_resamples: int,
                        seed: int) -> list[Any]:
    found = [fn(groups[0], other, num_resamples=num_resamples, seed=seed) for other in groups[1:]]
    return [c for c in found if c is not None]


def run_metrics(ok: Sequence[SampleRecord], failed: Sequence[SampleRecord], tasks: Sequence[str],
                policies: Sequence[str], *, num_resamples: int, seed: int,
                endpoints: Sequence[str] = ("",)) -> RunMetrics:
    """Metrics of every (task, policy, endpoint) in the given order; then, per task, each policy against the
    first at each endpoint, and each endpoint against the first for each policy."""
    groups: list[GroupMetrics] = []
    for task in tasks:
        for policy in policies:
            for endpoint in endpoints:
                recs = [r for r in ok if (r.task, r.policy, r.endpoint) == (task, policy, endpoint)]
                errors = sum(1 for r in failed if (r.task, r.policy, r.endpoint) == (task, policy, endpoint))
                if recs or errors:
                    groups.append(group_metrics(task, policy, recs, num_errors=errors,
                                                num_resamples=num_resamples, seed=seed, endpoint=endpoint))
    comparisons, endpoint_comparisons = [], []
    for task in tasks:
        for endpoint in endpoints:
            same = [g for g in groups if (g.task, g.endpoint) == (task, endpoint)]
            comparisons += _first_against_rest(same, compare, num_resamples, seed)
        for policy in policies:
            same = [g for g in groups if (g.task, g.policy) == (task, policy)]
            endpoint_comparisons += _first_against_rest(same, compare_endpoints, num_resamples, seed)
    return RunMetrics(groups, comparisons, endpoint_comparisons)
