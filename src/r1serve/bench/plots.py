"""PNG plots of a benchmark result, written next to the JSON file.

Two figures: latency CDFs (TTFT, TPOT, ITL, end-to-end; one curve per endpoint and load point), which show
the tails a table of percentiles summarizes; and, for a sweep, throughput and latency against the swept
concurrency or request rate, one line per endpoint. matplotlib is imported here only, with the Agg backend,
so that the rest of the bench starts fast and plotting works without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from r1serve.bench.metrics import itl_s, tpot_s
from r1serve.bench.request import RequestRecord
from r1serve.bench.runner import BenchResult, PointRun

MAX_CDF_POINTS = 2000  # a CDF of 500k inter-token gaps draws the same with 2k quantiles


def _cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    if len(ordered) > MAX_CDF_POINTS:
        step = (len(ordered) - 1) / (MAX_CDF_POINTS - 1)
        ordered = [ordered[round(i * step)] for i in range(MAX_CDF_POINTS)]
    n = len(ordered)
    return ordered, [(i + 1) / n for i in range(n)]


def _latencies(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    done = [r for r in records if r.ok]
    return {
        "TTFT (ms)": [r.ttft_s * 1000 for r in done if r.ttft_s is not None],
        "TPOT (ms)": [t * 1000 for r in done if (t := tpot_s(r)) is not None],
        "ITL (ms)": [g * 1000 for r in done for g in itl_s(r)],
        "E2E latency (s)": [r.e2e_s for r in done],
    }


def _endpoint_label(run: PointRun) -> str:
    return f"[{run.endpoint + 1}] {run.url.split('://', 1)[-1]}"


def _run_label(run: PointRun, num_endpoints: int) -> str:
    return f"{_endpoint_label(run)} {run.point.label()}" if num_endpoints > 1 else run.point.label()


def plot_latency_cdfs(result: BenchResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_urls = len(result.endpoints)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for run in result.runs:
        for ax, (name, values) in zip(axes.flat, _latencies(run.records).items(), strict=True):
            if values:
                xs, ys = _cdf(values)
                ax.plot(xs, ys, label=_run_label(run, num_urls))
            ax.set_xlabel(name)
            ax.set_ylabel("fraction of requests" if "ITL" not in name else "fraction of gaps")
            ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    fig.suptitle("latency CDFs" + (" (partial run)" if result.partial else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(result: BenchResult, path: Path) -> Path:
    """Output throughput, p50 TPOT and p99 TTFT against the swept variable (categorical x: inf included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result.config.sweep or "concurrency"
    points = list(dict.fromkeys(r.point for r in result.runs))
    labels = [str(p.concurrency if sweep == "concurrency" else f"{p.request_rate:g}") for p in points]
    panels = (("output throughput (tok/s)", lambda r: r.summary.output_throughput),
              ("TPOT p50 (ms)", lambda r: r.summary.tpot_ms.p50),
              ("TTFT p99 (ms)", lambda r: r.summary.ttft_ms.p99))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for index in dict.fromkeys(r.endpoint for r in result.runs):
        runs = {r.point: r for r in result.runs if r.endpoint == index}
        for ax, (name, get) in zip(axes, panels, strict=True):
            xs = [i for i, p in enumerate(points) if p in runs and get(runs[p]) is not None]
            label = _endpoint_label(next(iter(runs.values())))
            ax.plot(xs, [get(runs[points[i]]) for i in xs], marker="o", label=label)
            ax.set_xticks(range(len(points)), labels)
            ax.set_xlabel("concurrency" if sweep == "concurrency" else "request rate (req/s)")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(result: BenchResult, json_path: Path) -> list[Path]:
    """The PNGs for `result` beside `json_path` (`X.json` -> `X.latency_cdf.png`, `X.sweep.png`)."""
    if not result.runs:
        return []
    stem = json_path.with_suffix("")
    paths = [plot_latency_cdfs(result, Path(f"{stem}.latency_cdf.png"))]
    if len({r.point for r in result.runs}) > 1:
        paths.append(plot_sweep(result, Path(f"{stem}.sweep.png")))
    return paths
