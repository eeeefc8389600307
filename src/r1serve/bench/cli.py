"""`r1serve bench`: the command line of the serving benchmark (flags -> `BenchConfig` -> run -> report).

This module only parses, runs and reports; every figure is computed elsewhere in `r1serve.bench`. Comma
lists make sweeps (`--concurrency 1,16,64,256`, `--request-rate inf,16`), with `--num-prompts` either one
value for every point or one per point. Exit status: 0 when the run finished, 1 when the benchmark could not
run (an unreachable endpoint, no request succeeded), 2 for bad flags, 130 after Ctrl-C (partial results are
still printed and written, marked `"partial": true`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from r1serve.bench.config import BenchConfig
from r1serve.bench.load import LoadPoint
from r1serve.bench.metrics import SLO_METRICS, parse_slos
from r1serve.bench.runner import BenchError, BenchResult, Runner
from r1serve.bench.workloads import WORKLOADS, LengthRange, WorkloadSpec

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_NUM_PROMPTS = 100
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="r1serve bench", description="Measure the serving performance of OpenAI-compatible endpoints.",
        epilog="Example: r1serve bench --url http://127.0.0.1:8000 --tokenizer TOKENIZER_DIR --input-len 512 "
               "--output-len 128 --num-prompts 500 --request-rate inf,16 --output result.json")
    target = p.add_argument_group("endpoints")
    target.add_argument("--url", action="append", help=f"base URL, repeatable to compare (default {DEFAULT_URL})")
    target.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                        help="/v1/completions or /v1/chat/completions (default completions)")
    target.add_argument("--model", help="model name to request (default: the first of /v1/models)")
    target.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="bearer token (default $OPENAI_API_KEY)")
    target.add_argument("--timeout", type=float, default=3600.0, help="seconds per request (default 3600)")
    work = p.add_argument_group("workload")
    work.add_argument("--workload", choices=WORKLOADS, default="random")
    work.add_argument("--tokenizer", help="tokenizer.json or its folder: exact prompt lengths, token counting")
    work.add_argument("--dataset-path", type=Path, help="JSONL for gsm8k / math500 / jsonl (or its folder)")
    work.add_argument("--input-len", default="1024", help="prompt tokens, N or LOW:HIGH (default 1024)")
    work.add_argument("--output-len", help="output tokens, N or LOW:HIGH (default 128 for random and "
                                           "shared-prefix; the model decides for datasets)")
    work.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: prefix tokens (default 1024)")
    work.add_argument("--num-groups", type=int, default=8, help="shared-prefix: prefixes (default 8)")
    work.add_argument("--prompt-template", choices=("auto", "r1", "none"), default="auto",
                      help="completions only: wrap prompts in the R1 chat format (auto: for gsm8k/math500)")
    load = p.add_argument_group("load")
    load.add_argument("--num-prompts", help=f"requests per point, or a comma list, one per point "
                                            f"(default {DEFAULT_NUM_PROMPTS}, or unlimited with --duration)")
    load.add_argument("--duration", type=float, help="seconds per point to keep sending")
    load.add_argument("--concurrency", help="max requests in flight, or a comma list to sweep")
    load.add_argument("--request-rate", default="inf", help="Poisson requests/s (inf: all at once), or a list")
    load.add_argument("--num-warmups", type=int, default=1, help="unmeasured requests before each point")
    load.add_argument("--num-workers", type=int, default=1,
                      help="bench processes sharing each point, for loads one process cannot read (default 1)")
    load.add_argument("--seed", type=int, default=0)
    req = p.add_argument_group("request fields")
    req.add_argument("--temperature", type=float, help="sent only when given (else the server's default)")
    req.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                     help="do not send ignore_eos with random / shared-prefix prompts")
    req.add_argument("--max-thinking-tokens", type=int, help="r1serve extension: reasoning budget")
    req.add_argument("--extra-body", default="{}", help="JSON object merged into every request body")
    out = p.add_argument_group("output")
    out.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS",
                     help=f"SLOs for goodput, NAME one of {', '.join(SLO_METRICS)}")
    out.add_argument("--output", type=Path, help="JSON result file (PNG plots are written beside it)")
    out.add_argument("--no-plots", dest="plots", action="store_false")
    out.add_argument("--no-progress", dest="progress", action="store_false")
    out.add_argument("--save-detailed", action="store_true", help="keep every inter-token gap in the JSON")
    return p


def _numbers(text: str | None, kind: Callable[[str], Any], flag: str) -> list[Any]:
    if text is None:
        return []
    try:
        values = [kind(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"{flag} {text!r}: expected a number or a comma list of numbers") from e
    if not values:
        raise ValueError(f"{flag} {text!r}: no value")
    return values


def load_points(args: argparse.Namespace) -> tuple[tuple[LoadPoint, ...], str | None]:
    """The load points of the flags, and the swept variable (None when there is one point)."""
    concurrencies = _numbers(args.concurrency, int, "--concurrency") or [None]
    rates = _numbers(args.request_rate, float, "--request-rate")
    if len(concurrencies) > 1 and len(rates) > 1:
        raise ValueError("sweep --concurrency or --request-rate, not both")
    sweep = "concurrency" if len(concurrencies) > 1 else "request_rate" if len(rates) > 1 else None
    size = max(len(concurrencies), len(rates))
    default_prompts = None if args.duration else DEFAULT_NUM_PROMPTS
    prompts = _numbers(args.num_prompts, int, "--num-prompts") or [default_prompts]
    if len(prompts) not in (1, size):
        raise ValueError(f"--num-prompts has {len(prompts)} values for {size} load points: give 1 or {size}")
    points = tuple(
        LoadPoint(concurrency=concurrencies[i % len(concurrencies)], request_rate=rates[i % len(rates)],
                  num_prompts=prompts[i % len(prompts)], duration_s=args.duration)
        for i in range(size))
    return points, sweep


def _extra_body(args: argparse.Namespace) -> dict[str, Any]:
    try:
        extra = json.loads(args.extra_body)
    except json.JSONDecodeError as e:
        raise ValueError(f"--extra-body: not valid JSON ({e.msg})") from e
    if not isinstance(extra, dict):
        raise ValueError("--extra-body: expected a JSON object")
    if args.max_thinking_tokens is not None:
        extra["max_thinking_tokens"] = args.max_thinking_tokens
    return extra


def parse_config(argv: Sequence[str]) -> BenchConfig:
    """Flags -> validated `BenchConfig`; bad values raise ValueError naming the flag."""
    args = build_parser().parse_args(list(argv))
    workload = WorkloadSpec(
        name=args.workload, input_len=LengthRange.parse(args.input_len),
        output_len=LengthRange.parse(args.output_len) if args.output_len else None,
        dataset_path=args.dataset_path, prefix_len=args.prefix_len, num_groups=args.num_groups)
    points, sweep = load_points(args)
    return BenchConfig(
        urls=tuple(args.url or [DEFAULT_URL]), points=points, workload=workload, endpoint=args.endpoint,
        sweep=sweep, model=args.model, api_key=args.api_key, tokenizer=args.tokenizer,
        num_warmups=args.num_warmups, num_workers=args.num_workers, seed=args.seed,
        temperature=args.temperature, ignore_eos=args.ignore_eos,
        prompt_template=args.prompt_template, extra_body=_extra_body(args),
        goodput_slos_ms=parse_slos(args.goodput), timeout_s=args.timeout, output=args.output, plots=args.plots,
        progress=args.progress, save_detailed=args.save_detailed)


def _log(text: str) -> None:
    print(f"r1serve bench: {text}", file=sys.stderr, flush=True)


def _progress(desc: str, total: int | None) -> Callable[[int | None], None]:
    """A progress bar on stderr; the returned function takes the number done so far, or None to close it."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)

    def update(num_done: int | None) -> None:
        if num_done is None:
            bar.close()
        elif num_done > bar.n:
            bar.update(num_done - bar.n)

    return update


async def _run(config: BenchConfig) -> tuple[BenchResult, bool]:
    """Run with a SIGINT handler that stops the bench gracefully; returns (result, interrupted)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_sigint() -> None:
        _log("interrupted: finishing with partial results (Ctrl-C again to quit at once)")
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (NotImplementedError, RuntimeError):  # no signal handlers here (Windows, or not the main thread)
        pass
    runner = Runner(config, stop, _log, _progress if config.progress else None)
    try:
        return await runner.run(), stop.is_set()
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def report(result: BenchResult, argv: Sequence[str]) -> None:
    from r1serve.bench.report import render_tables, result_dict, to_json, write_result

    print(render_tables(result))
    config = result.config
    if config.output:
        write_result(result, argv, config.output)
        _log(f"result written to {config.output}")
        if config.plots:
            from r1serve.bench.plots import write_plots

            for path in write_plots(result, config.output):
                _log(f"plot written to {path}")
    print(to_json(result_dict(result, argv, with_requests=False)), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parse_config(argv)
    except ValueError as e:
        _log(f"error: {e}")
        return 2
    try:
        result, interrupted = asyncio.run(_run(config))
    except BenchError as e:
        _log(f"error: {e}")
        return 1
    except ValueError as e:  # e.g. an unreadable --tokenizer or dataset
        _log(f"error: {e}")
        return 2
    except KeyboardInterrupt:  # the second Ctrl-C: quit without a report
        _log("interrupted again: quitting without results")
        return EXIT_INTERRUPTED
    report(result, argv)
    if interrupted:
        return EXIT_INTERRUPTED
    if not any(r.summary.num_completed for r in result.runs):
        _log("error: no request succeeded (see the errors above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
