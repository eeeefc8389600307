"""What a benchmark leaves behind: a table on the terminal, a JSON result file, and one JSON line.

With one endpoint the table has a column per load point; with several, one table per load point puts the
endpoints side by side with each one's ratio to the first (`x1.25` = 25% more than the first endpoint).
The JSON result holds the command line, every setting (`BenchConfig.to_dict()`), what each endpoint said
about itself, each point's summary and one record per request, and `"partial": true` when the run was
interrupted. The last line on stdout is the same result without the per-request records.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from r1serve import __version__
from r1serve.bench.config import point_dict
from r1serve.bench.metrics import RunSummary, itl_s, tpot_s
from r1serve.bench.request import RequestRecord
from r1serve.bench.runner import BenchResult, PointRun

Getter = Callable[[RunSummary], float | None]
LATENCIES = (("TTFT", "ttft_ms"), ("first answer token", "ttfa_ms"), ("TPOT", "tpot_ms"),
             ("ITL", "itl_ms"), ("E2E latency", "e2el_ms"))
STATS = ("mean", "p50", "p90", "p99", "max")


def _dist(attr: str, stat: str) -> Getter:
    return lambda s: getattr(getattr(s, attr), stat)


def metric_rows() -> list[tuple[str, Getter, str]]:
    """(label, getter, format) of every numeric row of the table, in order."""
    rows: list[tuple[str, Getter, str]] = [
        ("completed requests", lambda s: s.num_completed, "d"),
        ("failed requests", lambda s: s.num_failed, "d"),
        ("duration (s)", lambda s: s.duration_s, ".2f"),
        ("request throughput (req/s)", lambda s: s.request_throughput, ".2f"),
        ("output throughput (tok/s)", lambda s: s.output_throughput, ".1f"),
        ("total throughput (tok/s)", lambda s: s.total_token_throughput, ".1f"),
        ("input tokens", lambda s: s.total_input_tokens, "d"),
        ("output tokens", lambda s: s.total_output_tokens, "d"),
        ("of which reasoning", lambda s: s.total_reasoning_tokens, "d"),
        ("peak concurrency", lambda s: s.peak_concurrency, "d"),
        ("answered (after </think>)", lambda s: s.num_answered, "d"),
    ]
    for label, attr in LATENCIES:
        rows += [(f"{label} {stat} (ms)", _dist(attr, stat), ".1f") for stat in STATS]
    rows.append(("goodput (req/s)", lambda s: s.goodput.request_goodput if s.goodput else None, ".2f"))
    return rows


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return format(int(value), spec) if spec == "d" else format(value, spec)


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return "-"
    return f"x{value / base:.2f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _text_rows(runs: Sequence[PointRun]) -> list[list[str]]:
    rows = [["errors", *[", ".join(f"{k}: {v}" for k, v in r.summary.errors.items()) or "-" for r in runs]],
            ["token counts from", *[", ".join(sorted(r.summary.token_sources)) or "-" for r in runs]],
            ["finish reasons", *[", ".join(f"{k}: {v}" for k, v in sorted(r.summary.finish_reasons.items()))
                                 or "-" for r in runs]],
            ["bench client CPU", *[f"{r.client_cpu:.0%}" for r in runs]]]
    return rows


def point_table(runs: Sequence[PointRun], header: Sequence[str], ratios: bool) -> str:
    """One table: a column per run, plus ratio-to-first columns when `ratios`."""
    rows = []
    for label, get, spec in metric_rows():
        values = [get(r.summary) for r in runs]
        if all(v is None for v in values):
            continue
        row = [label, *[_fmt(v, spec) for v in values]]
        if ratios:
            row += [_ratio(v, values[0]) for v in values[1:]]
        rows.append(row)
    for text_row in _text_rows(runs):
        rows.append(text_row + (["" for _ in runs[1:]] if ratios else []))
    ratio_header = [f"{h} / first" for h in header[1:]] if ratios else []
    return format_table(["metric", *header, *ratio_header], rows)


def render_tables(result: BenchResult) -> str:
    """The terminal report: one table (a column per point), or per point a side-by-side of the endpoints."""
    if not result.runs:
        return "no load point was measured"
    out = []
    if len(result.endpoints) == 1:
        out.append(f"endpoint {result.endpoints[0]['url']} (model {result.endpoints[0]['model']})")
        out.append(point_table(result.runs, [r.point.label() for r in result.runs], ratios=False))
    else:
        out += [f"[{i + 1}] {e['url']} (model {e['model']})" for i, e in enumerate(result.endpoints)]
        for point in dict.fromkeys(r.point for r in result.runs):
            runs = [r for r in result.runs if r.point == point]
            out.append(f"\n{point.label()}")
            out.append(point_table(runs, [f"[{r.endpoint + 1}]" for r in runs], ratios=len(runs) > 1))
    out += [f"note: {n}" for n in result.notes]
    if result.partial:
        out.append("PARTIAL: interrupted before the end; figures cover what finished")
    return "\n".join(out)


def record_dict(record: RequestRecord, detailed: bool) -> dict[str, Any]:
    out = {"index": record.index, "ok": record.ok, "start_s": record.start_s, "e2e_s": record.e2e_s,
           "ttft_s": record.ttft_s, "ttfa_s": record.first_answer_s, "tpot_s": tpot_s(record),
           "prompt_tokens": record.prompt_tokens, "output_tokens": record.output_tokens,
           "reasoning_tokens": record.reasoning_tokens,
           "token_source": record.token_source, "finish_reason": record.finish_reason,
           "error_type": record.error_type, "error_message": record.error_message}
    if detailed:
        out["itl_s"] = itl_s(record)
    return out


def result_dict(result: BenchResult, argv: Sequence[str], with_requests: bool = True) -> dict[str, Any]:
    runs = []
    for run in result.runs:
        entry = {"endpoint": run.endpoint, "url": run.url, "model": run.model, "load": point_dict(run.point),
                 "partial": run.partial, "client_cpu": run.client_cpu, "summary": run.summary.to_dict()}
        if with_requests:
            entry["requests"] = [record_dict(r, result.config.save_detailed) for r in run.records]
        runs.append(entry)
    return {"bench": "r1serve bench", "version": __version__, "started_at": result.started_at,
            "command": shlex.join(["r1serve", "bench", *argv]), "partial": result.partial,
            "settings": result.config.to_dict(), "endpoints": result.endpoints, "notes": result.notes,
            "runs": runs}


def to_json(obj: Any, indent: int | None = None) -> str:
    return json.dumps(_finite(obj), indent=indent, ensure_ascii=False, allow_nan=False)


def _finite(obj: Any) -> Any:
    """JSON has no infinity or NaN: write them as strings rather than produce an unreadable file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_result(result: BenchResult, argv: Sequence[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(result_dict(result, argv), indent=2) + "\n")

