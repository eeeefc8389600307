"""The statistics of repeated sampling: pass@k, majority voting, bootstrap intervals, paired differences.

These are pure functions on numbers so that each can be checked against values computed by hand. pass@k is
the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k) for n samples of which c are correct.
Majority voting (maj@k, the paper's cons@k) ignores samples without an answer and breaks ties in favour of
the answer that appeared first, a rule that does not depend on how answers sort. Intervals are percentile
bootstraps over problems with a fixed seed, so a report is reproducible; a difference between two policies is
bootstrapped paired (the same resampled problems for both), which is what makes small differences testable.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) as a product, stable for large n
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def majority_vote(keys: Sequence[Hashable | None]) -> int | None:
    """Index of the sample whose answer wins the vote: the most frequent key; on a tie, the key seen first.
    Samples with key None (no answer) do not vote; None when no sample has an answer."""
    counts: dict[Hashable, int] = {}
    first_seen: dict[Hashable, int] = {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first_seen.setdefault(key, i)
    if not counts:
        return None
    winner = max(counts, key=lambda key: (counts[key], -first_seen[key]))
    return first_seen[winner]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _check_bootstrap(num_resamples: int, confidence: float) -> None:
    if num_resamples < 1:
        raise ValueError(f"bootstrap resamples must be at least 1, got {num_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_ci(
    values: Sequence[float], num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one value per problem)."""
    _check_bootstrap(num_resamples, confidence)
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("bootstrap_ci of no values")
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(num_resamples, arr.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_bootstrap_diff(
    a: Sequence[float], b: Sequence[float], num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[float, float, float]:
    """(mean(b) - mean(a), low, high): the difference and its interval, resampling problems jointly."""
    if len(a) != len(b):
        raise ValueError(f"paired bootstrap needs equal lengths, got {len(a)} and {len(b)}")
    diffs = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    low, high = bootstrap_ci(diffs.tolist(), num_resamples, seed, confidence)
    return float(diffs.mean()), low, high


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation between order statistics); None for no values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def k_values(num_samples: int) -> list[int]:
    """The k reported for pass@k: 1, the powers of two below n, and n."""
    ks = [1]
    while ks[-1] * 2 < num_samples:
        ks.append(ks[-1] * 2)
    if num_samples > 1:
        ks.append(num_samples)
    return ks
