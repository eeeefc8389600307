"""The report's three figures, written as PNG next to `report.md`: accuracy by policy with its 95% interval,
accuracy against reasoning length, and the histogram of reasoning tokens. With several endpoints each
series is one (endpoint, policy), named `endpoint / policy`.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so the eval
runs on machines without a display and does not disturb a caller that uses matplotlib itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from r1serve.eval.metrics import GroupMetrics
from r1serve.eval.records import SampleRecord

ACCURACY_PNG = "accuracy_by_policy.png"
LENGTH_PNG = "accuracy_vs_reasoning_length.png"
HISTOGRAM_PNG = "reasoning_tokens_hist.png"
NUM_LENGTH_BINS = 6


def _record_series(records: Sequence[SampleRecord]) -> dict[str, list[SampleRecord]]:
    """Records with reasoning token counts by `task / policy` (`task / endpoint / policy` with several)."""
    several = len({r.endpoint for r in records}) > 1
    out: dict[str, list[SampleRecord]] = {}
    for r in sorted(records, key=lambda r: (r.task, r.endpoint, r.policy)):
        if r.reasoning_tokens is not None:
            out.setdefault(f"{r.task} / {_series_name(r.endpoint, r.policy, several)}", []).append(r)
    return out


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _series_name(endpoint: str, policy: str, several_endpoints: bool) -> str:
    return f"{endpoint} / {policy}" if several_endpoints else policy


def plot_accuracy(groups: Sequence[GroupMetrics], path: Path) -> Path:
    """Grouped bars: pass@1 per policy (and endpoint) within each task, with bootstrap 95% intervals."""
    tasks = list(dict.fromkeys(g.task for g in groups))
    several = len({g.endpoint for g in groups}) > 1
    named = [(_series_name(g.endpoint, g.policy, several), g) for g in groups]
    policies = list(dict.fromkeys(name for name, _ in named))
    fig = Figure(figsize=(max(5.0, 1.6 * len(tasks) * len(policies)), 4.0))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(policies))
    for j, policy in enumerate(policies):
        xs, ys, errs = [], [], [[], []]
        for i, task in enumerate(tasks):
            g = next((g for name, g in named if g.task == task and name == policy and g.pass1 is not None), None)
            if g is None:
                continue
            low, high = g.pass1_ci or (g.pass1, g.pass1)
            xs.append(i + (j - (len(policies) - 1) / 2) * width)
            ys.append(100 * g.pass1)
            errs[0].append(100 * (g.pass1 - low))
            errs[1].append(100 * (high - g.pass1))
        ax.bar(xs, ys, width, yerr=errs, capsize=4, label=policy)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("pass@1 (%) with 95% bootstrap interval")
    ax.set_ylim(0, 100)
    ax.legend(title="endpoint / policy" if several else "policy")
    return _save(fig, path)


def _length_bins(tokens: np.ndarray) -> np.ndarray:
    edges = np.unique(np.quantile(tokens, np.linspace(0, 1, NUM_LENGTH_BINS + 1)))
    return edges if len(edges) > 1 else np.array([tokens.min(), tokens.min() + 1.0])


def plot_accuracy_vs_length(records: Sequence[SampleRecord], path: Path) -> Path:
    """Accuracy of samples binned by reasoning tokens (equal-count bins), one line per task and policy."""
    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.add_subplot()
    series = _record_series(records)
    for name, rs in series.items():
        tokens = np.array([r.reasoning_tokens for r in rs], dtype=float)
        correct = np.array([r.correct for r in rs], dtype=float)
        edges = _length_bins(tokens)
        which = np.clip(np.searchsorted(edges, tokens, side="right") - 1, 0, len(edges) - 2)
        xs = [tokens[which == b].mean() for b in range(len(edges) - 1) if (which == b).any()]
        ys = [100 * correct[which == b].mean() for b in range(len(edges) - 1) if (which == b).any()]
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("reasoning tokens (mean of an equal-count bin)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    if series:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_reasoning_histogram(records: Sequence[SampleRecord], path: Path) -> Path:
    """Step histograms of reasoning tokens per sample, one per task and policy."""
    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.add_subplot()
    values = [r.reasoning_tokens for r in records if r.reasoning_tokens is not None]
    bins = np.histogram_bin_edges(values, bins=30) if values else 10
    for name, rs in _record_series(records).items():
        ax.hist([r.reasoning_tokens for r in rs], bins=bins, histtype="step", linewidth=1.5, label=name)
    ax.set_xlabel("reasoning tokens")
    ax.set_ylabel("samples")
    if values:
        ax.legend(fontsize="small")
    return _save(fig, path)


def write_plots(groups: Sequence[GroupMetrics], records: Sequence[SampleRecord], folder: Path) -> list[Path]:
    """All three figures into `folder`; returns their paths."""
    return [
        plot_accuracy(groups, folder / ACCURACY_PNG),
        plot_accuracy_vs_length(records, folder / LENGTH_PNG),
        plot_reasoning_histogram(records, folder / HISTOGRAM_PNG),
    ]
