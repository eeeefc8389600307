"""What a run shows people: the terminal table, `report.md`, `summary.json` and the final reproduction line.

All of them are rendered from the same rows (`result_rows`, `comparison_rows`, `endpoint_comparison_rows`),
so the terminal, the markdown and the JSON never disagree. With one endpoint the tables have no endpoint
column; with several, the results and the policy comparison gain one and an endpoint comparison follows.
The report states what each metric means and what was excluded (failed requests), because an accuracy
without its protocol is the pitfall this evaluation exists to avoid.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from r1serve.eval.metrics import Comparison, EndpointComparison, GroupMetrics, RunMetrics
from r1serve.eval.plots import ACCURACY_PNG, HISTOGRAM_PNG, LENGTH_PNG

RESULT_HEADER = ["task", "policy", "problems", "samples", "pass@1 % (mean ± std)", "95% CI", "pass@n %",
                 "maj@n %", "reasoning tok", "answer tok", "truncated %", "no-think %", "no-answer %",
                 "rep. stops", "errors", "p50 s", "p99 s"]
COMPARISON_HEADER = ["task", "baseline", "policy", "problems", "baseline %", "policy %", "diff (pts)",
                     "95% CI (pts)", "CI excludes 0"]
ENDPOINT_COMPARISON_HEADER = ["task", "policy", "baseline", "endpoint", "problems", "baseline %", "endpoint %",
                              "diff (pts)", "95% CI (pts)", "CI excludes 0"]

METRIC_NOTES = """\
- **pass@1**: per problem, the fraction of its samples graded correct, averaged over problems. `± std` is the
  standard deviation of the accuracy of the sample sets (set j = the j-th sample of every problem), the
  "mean and standard deviation over runs" the usage advice asks for. The 95% CI is a percentile bootstrap
  over problems (fixed seed).
- **pass@n**: the unbiased estimator of Chen et al. (2021), 1 − C(n−c, k)/C(n, k) with k = n samples: the
  chance that at least one of n samples is right. `summary.json` has every k (1, powers of two, n).
- **maj@n** (the paper's cons@n): majority vote over the n samples' extracted answers (numbers by value,
  other answers by normalized LaTeX); samples without an answer do not vote; a tie goes to the answer that
  appeared first; correct if the winning answer was graded correct.
- **reasoning / answer tok**: mean completion tokens before / after `</think>` (the server's count, or an
  estimate from character lengths where it does not count reasoning tokens).
- **truncated**: `finish_reason` = length. **no-think**: empty reasoning (the model skipped thinking).
  **no-answer**: no gradable answer (no box, or the reasoning never closed: an answer that only appears
  inside the reasoning does not count). **rep. stops**: `finish_reason` = repetition (r1serve's guard).
- **errors**: requests that failed; they are excluded from the accuracies above and retried on a rerun.
- **comparison**: each policy against the first, pass@1 difference in percentage points on the problems
  both finished, with a paired bootstrap interval; "CI excludes 0" means the difference is unlikely to be
  sampling noise at the 95% level.
- **endpoint comparison** (several `--url`): each endpoint against the first, for each policy, the same
  way: the same problems, seeds and sampling settings were sent to every endpoint.
"""


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def _num(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _several_endpoints(groups: Sequence[GroupMetrics]) -> bool:
    return len({g.endpoint for g in groups}) > 1


def _with_column(header: Sequence[str], rows: Sequence[list[str]], at: int, name: str,
                 values: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """`header` and `rows` with a column inserted at index `at`."""
    return ([*header[:at], name, *header[at:]],
            [[*row[:at], value, *row[at:]] for row, value in zip(rows, values, strict=True)])


def result_rows(groups: Sequence[GroupMetrics]) -> list[list[str]]:
    rows = []
    for g in groups:
        n = g.samples_per_problem
        ci = f"[{_pct(g.pass1_ci[0])}, {_pct(g.pass1_ci[1])}]" if g.pass1_ci else "-"
        rows.append([
            g.task, g.policy, str(g.num_problems), str(g.num_samples),
            f"{_pct(g.pass1)} ± {_pct(g.pass1_std)}", ci,
            _pct(g.pass_at_k.get(n)), _pct(g.maj_at_k.get(n)),
            _num(g.mean_reasoning_tokens), _num(g.mean_answer_tokens),
            _pct(g.truncation_rate), _pct(g.empty_reasoning_rate), _pct(g.no_answer_rate),
            str(g.repetition_stops), str(g.num_errors), _num(g.latency_p50_s, 2), _num(g.latency_p99_s, 2),
        ])
    return rows


def _diff_cells(diff: float, low: float, high: float, excludes_zero: bool) -> list[str]:
    return [f"{100 * diff:+.1f}", f"[{100 * low:+.1f}, {100 * high:+.1f}]", "yes" if excludes_zero else "no"]


def comparison_rows(comparisons: Sequence[Comparison]) -> list[list[str]]:
    return [[c.task, c.baseline, c.policy, str(c.num_problems), _pct(c.baseline_pass1), _pct(c.policy_pass1),
             *_diff_cells(c.diff, c.ci_low, c.ci_high, c.excludes_zero)] for c in comparisons]


def endpoint_comparison_rows(comparisons: Sequence[EndpointComparison]) -> list[list[str]]:
    return [[c.task, c.policy, c.baseline, c.endpoint, str(c.num_problems), _pct(c.baseline_pass1),
             _pct(c.endpoint_pass1), *_diff_cells(c.diff, c.ci_low, c.ci_high, c.excludes_zero)]
            for c in comparisons]


def tables(metrics: RunMetrics) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each table to show: results, then the comparisons there are."""
    results = (RESULT_HEADER, result_rows(metrics.groups))
    policies = (COMPARISON_HEADER, comparison_rows(metrics.comparisons))
    if _several_endpoints(metrics.groups):
        results = _with_column(*results, 2, "endpoint", [g.endpoint for g in metrics.groups])
        policies = _with_column(*policies, 1, "endpoint", [c.endpoint for c in metrics.comparisons])
    out = [("Results", *results)]
    if metrics.comparisons:
        out.append(("Policy comparison", *policies))
    if metrics.endpoint_comparisons:
        out.append(("Endpoint comparison", ENDPOINT_COMPARISON_HEADER,
                    endpoint_comparison_rows(metrics.endpoint_comparisons)))
    return [(title, list(header), rows) for title, header, rows in out]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A fixed-width table for the terminal."""
    widths = [max(len(str(cell)) for cell in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    escape = lambda cell: str(cell).replace("|", "\\|")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(escape(c) for c in r) + " |" for r in rows])


def terminal_report(metrics: RunMetrics) -> str:
    return "\n\n".join(text_table(header, rows) for _, header, rows in tables(metrics))


def _settings_lines(settings: dict[str, Any]) -> list[str]:
    keys = ("base_url", "model", "max_model_len", "endpoints", "task", "policy", "num_samples", "temperature",
            "top_p", "max_tokens", "max_thinking_tokens", "seed", "limit", "data_sources", "started", "r1serve_version")
    return [f"- **{k}**: `{_setting(settings[k])}`" for k in keys if k in settings]


def _setting(value: Any) -> str:
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], dict):
        return "; ".join(", ".join(f"{k}: {v}" for k, v in item.items()) for item in value)
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return "; ".join(f"{k}: {v}" for k, v in value.items())
    return str(value)


def markdown_report(metrics: RunMetrics, settings: dict[str, Any], notes: Sequence[str] = ()) -> str:
    """The whole `report.md`."""
    parts = ["# r1serve eval report", "", "## Settings", "", *_settings_lines(settings), ""]
    if notes:
        parts += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    for title, header, rows in tables(metrics):
        parts += [f"## {title}", "", markdown_table(header, rows), ""]
    parts += ["## Plots", "", f"![accuracy by policy]({ACCURACY_PNG})", "",
              f"![accuracy against reasoning length]({LENGTH_PNG})", "",
              f"![reasoning tokens]({HISTOGRAM_PNG})", "", "## What the columns mean", "", METRIC_NOTES]
    return "\n".join(parts)


def summary_dict(metrics: RunMetrics, settings: dict[str, Any], notes: Sequence[str] = ()) -> dict[str, Any]:
    return {"settings": settings, "notes": list(notes), "results": [g.to_dict() for g in metrics.groups],
            "comparisons": [c.to_dict() for c in metrics.comparisons],
            "endpoint_comparisons": [c.to_dict() for c in metrics.endpoint_comparisons]}


def reproduction_line(metrics: RunMetrics, settings: dict[str, Any]) -> str:
    """One JSON line: every setting needed to rerun, and the headline numbers."""
    headline = [{"task": g.task, "policy": g.policy, "endpoint": g.endpoint, "pass@1": g.pass1, "pass@1_ci": g.pass1_ci,
                 "pass@n": g.pass_at_k.get(g.samples_per_problem), "maj@n": g.maj_at_k.get(g.samples_per_problem),
                 "errors": g.num_errors} for g in metrics.groups]
    return json.dumps({"eval": settings, "results": headline}, ensure_ascii=False)


def write_outputs(folder: Path, metrics: RunMetrics, settings: dict[str, Any], notes: Sequence[str]) -> None:
    """`summary.json` and `report.md` into `folder`."""
    (folder / "summary.json").write_text(json.dumps(summary_dict(metrics, settings, notes), indent=2,
                                                    ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(markdown_report(metrics, settings, notes), encoding="utf-8")
