"""A soak run: minutes of mixed traffic against one server, to see that it stays up, leaks nothing and answers
every request as documented.

    python benchmarks/soak.py --minutes 5                       # starts a tiny dummy-weight server on 127.0.0.1
    python benchmarks/soak.py --minutes 60 --url http://127.0.0.1:8000 --pid 1234   # a server already running

The traffic, from `--concurrency` clients at once: full chat and text completions, streams read to the end,
streams dropped after a few events (the server must abort them and free their KV blocks), and bad requests
(they must get a 4xx). Printed: requests by kind, answers by class (ok, expected 4xx, unexpected 4xx or 2xx,
unexpected 5xx including errors inside streams, connection errors), latency percentiles of the requests that
ran to their end, the server's RSS (with its engine process) at the start and the end, and the engine's
running requests and free / total KV blocks once the traffic stopped, read from /metrics. A table, then one
JSON line with every setting. Only loopback servers are accepted as targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from r1serve.config import R1_DISTILL_QWEN_1_5B_CONFIG

MODEL = "DeepSeek-R1-Distill-Qwen-1.5B"
TINY = {**R1_DISTILL_QWEN_1_5B_CONFIG, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "torch_dtype": "float32"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
KINDS = {"chat": 3, "completion": 2, "chat_stream": 3, "completion_stream": 2, "disconnect": 2, "bad": 2}
MESSAGE = [{"role": "user", "content": "What is 7 * 8? Please reason step by step."}]
BAD_BODIES = [
    {"model": MODEL, "messages": []},
    {"model": MODEL, "messages": [{"role": "user"}]},
    {"model": MODEL, "messages": MESSAGE, "temperature": "hot"},
    {"model": MODEL, "messages": MESSAGE, "stop": [""]},
    {"model": MODEL, "messages": MESSAGE, "stop_token_ids": [True]},
    {"model": MODEL, "messages": MESSAGE, "max_tokens": 10**9},
    {"model": MODEL, "messages": MESSAGE, "top_logprobs": 3},  # without logprobs: true
    {"model": "no-such-model", "messages": MESSAGE},
    {"model": MODEL, "prompt": [10**9]},
    {"model": MODEL, "prompt": ""},
]
BAD_RAW = [b'{"model": ', b'{"model": "\xff"}', b"[" * 5000 + b"]" * 5000,
           b'{"model": "M", "messages": [{"role": "user", "content": "x\\ud800"}]}',
           b'{"model": "M", "prompt": "x", "temperature": NaN}']


@dataclass
class Tally:
    """What the clients saw, over the whole run."""

    sent: Counter[str] = field(default_factory=Counter)  # by kind
    classes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, requests that ran to their end
    examples: dict[str, str] = field(default_factory=dict)  # class -> one example, for whoever debugs

    def record(self, kind: str, outcome: str, seconds: float | None = None, detail: str = "") -> None:
        self.sent[kind] += 1
        self.classes[outcome] += 1
        if seconds is not None:
            self.latencies.append(seconds)
        if outcome not in ("ok", "expected_4xx", "disconnected") and outcome not in self.examples:
            self.examples[outcome] = f"{kind}: {detail[:300]}"


def body_of(kind: str, rng: random.Random, max_tokens: int) -> tuple[str, dict]:
    chat = kind.startswith("chat") or (kind == "disconnect" and rng.random() < 0.5)
    body: dict = {"model": MODEL, "max_tokens": rng.randint(1, max_tokens), "ignore_eos": rng.random() < 0.5,
                  "seed": rng.randrange(2**31), "temperature": rng.choice([0.0, 0.6, 1.0])}
    body.update({"messages": MESSAGE} if chat else {"prompt": f"Soak {rng.randrange(10**6)}: the answer is"})
    if kind.endswith("stream") or kind == "disconnect":
        body.update(stream=True, stream_options={"include_usage": rng.random() < 0.5})
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


def classify(status: int, bad: bool) -> str:
    if status >= 500:
        return "unexpected_5xx"
    if bad:
        return "expected_4xx" if 400 <= status < 500 else "bad_request_accepted"
    return "ok" if status < 300 else "unexpected_4xx"


async def full_request(client: httpx.AsyncClient, kind: str, rng: random.Random, args: argparse.Namespace,
                       tally: Tally) -> None:
    path, body = body_of(kind, rng, args.max_tokens)
    start = time.perf_counter()
    response = await client.post(path, json=body)
    tally.record(kind, classify(response.status_code, False), time.perf_counter() - start, response.text)


async def stream_request(client: httpx.AsyncClient, kind: str, rng: random.Random, args: argparse.Namespace,
                         tally: Tally) -> None:
    path, body = body_of(kind, rng, args.max_tokens)
    drop_after = rng.randint(1, 4) if kind == "disconnect" else None
    start, events, last = time.perf_counter(), 0, ""
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            tally.record(kind, classify(response.status_code, False), None, (await response.aread()).decode())
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            events, last = events + 1, line
            if '"internal_server_error"' in line:
                tally.record(kind, "unexpected_5xx", None, line)
                return
            if drop_after is not None and events >= drop_after:
                tally.record(kind, "disconnected")
                return  # leaving the block closes the connection mid-stream
    outcome = "ok" if last.strip() == "data: [DONE]" else "stream_not_done"
    tally.record(kind, outcome, time.perf_counter() - start, last)


async def bad_request(client: httpx.AsyncClient, kind: str, rng: random.Random, args: argparse.Namespace,
                      tally: Tally) -> None:
    if rng.random() < 0.6:
        body = rng.choice(BAD_BODIES)
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        response = await client.post(path, json=body)
    else:
        raw = rng.choice(BAD_RAW).replace(b'"M"', f'"{MODEL}"'.encode())
        response = await client.post(rng.choice(["/v1/chat/completions", "/v1/completions"]), content=raw,
                                     headers={"content-type": "application/json"})
    tally.record(kind, classify(response.status_code, True), None, response.text)


SENDERS = {"chat": full_request, "completion": full_request, "chat_stream": stream_request,
           "completion_stream": stream_request, "disconnect": stream_request, "bad": bad_request}


async def worker(url: str, deadline: float, budget: list[int], seed: int, args: argparse.Namespace,
                 tally: Tally) -> None:
    rng = random.Random(seed)
    kinds, weights = list(KINDS), list(KINDS.values())
    timeout = httpx.Timeout(args.request_timeout)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            kind = rng.choices(kinds, weights)[0]
            try:
                await SENDERS[kind](client, kind, rng, args, tally)
            except httpx.TransportError as exc:
                tally.record(kind, "connection_error", None, repr(exc))


async def drive(url: str, args: argparse.Namespace) -> Tally:
    tally, budget = Tally(), [args.max_requests]
    deadline = time.monotonic() + args.minutes * 60
    await asyncio.gather(*(worker(url, deadline, budget, args.seed + i, args, tally)
                           for i in range(args.concurrency)))
    return tally


def rss_mib(pid: int | None) -> float | None:
    """Resident memory of `pid` and its children (the engine process), MiB; None without a pid."""
    if pid is None:
        return None
    pids, total_kib = [pid], 0
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for one in pids:
        status = Path(f"/proc/{one}/status")
        match = re.search(r"^VmRSS:\s+(\d+) kB", status.read_text(), re.MULTILINE) if status.exists() else None
        total_kib += int(match.group(1)) if match else 0
    return total_kib / 1024


def engine_gauges(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    names = {"running": "r1serve_num_requests_running", "waiting": "r1serve_num_requests_waiting",
             "free_blocks": "r1serve_kv_cache_free_blocks", "total_blocks": "r1serve_kv_cache_total_blocks"}
    found = {key: re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE) for key, name in names.items()}
    return {key: float(match.group(1)) for key, match in found.items() if match}


def settle(url: str, timeout_s: float = 30.0) -> dict[str, float]:
    """The engine's gauges once it is idle (aborted requests take a step or two to leave), or at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        gauges = engine_gauges(url)
        idle = gauges.get("running") == gauges.get("waiting") == 0
        if (idle and gauges.get("free_blocks") == gauges.get("total_blocks")) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str, Path]:
    """A tiny dummy-weight server on a free loopback port; returns it, its URL and its log file."""
    folder = Path(tempfile.mkdtemp(prefix="r1serve-soak-"))
    (folder / "config.json").write_text(json.dumps(TINY))
    port, log = free_port(), folder / "server.log"
    command = [sys.executable, "-m", "r1serve.server", "--model", str(folder), "--load-format", "dummy",
               "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
               "--kv-cache-space", str(args.kv_cache_space), "--no-access-log",
               *(["--tokenizer", args.tokenizer] if args.tokenizer else [])]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit(f"the server did not start; its log:\n{log.read_text(errors='replace')[-3000:]}")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def print_report(report: dict) -> None:
    rows = [("requests", report["requests"]), *((f"  kind {k}", v) for k, v in sorted(report["by_kind"].items())),
            *((f"  answer {k}", v) for k, v in sorted(report["by_class"].items())),
            ("requests/s", f"{report['requests_per_s']:.1f}"),
            *((f"latency {k} (s)", "-" if v is None else f"{v:.3f}") for k, v in report["latency_s"].items()),
            ("server RSS start / end (MiB)", f"{report['rss_start_mib']} / {report['rss_end_mib']}"),
            ("engine running / waiting at end", f"{report['engine_end'].get('running')} / "
                                                 f"{report['engine_end'].get('waiting')}"),
            ("KV blocks free / total at end", f"{report['engine_end'].get('free_blocks')} / "
                                               f"{report['engine_end'].get('total_blocks')}"),
            ("server alive at end", report["server_alive"])]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for outcome, example in report["examples"].items():
        print(f"example {outcome}: {example}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long the traffic runs")
    parser.add_argument("--url", help="an already running loopback server (default: start a tiny one)")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for its RSS")
    parser.add_argument("--concurrency", type=int, default=8, help="clients at once")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    parser.add_argument("--max-tokens", type=int, default=16, help="most output tokens a request asks for")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=256, help="started server only")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="started server only")
    parser.add_argument("--kv-cache-space", type=float, default=0.05, help="started server only (GiB)")
    parser.add_argument("--tokenizer", help="started server only (default: the byte-level fallback)")
    args = parser.parse_args(argv)
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        parser.error(f"--url must be a loopback address ({', '.join(sorted(LOOPBACK))}), got {args.url}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    process, log = None, None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        process, url, log = start_server(args)
        pid = process.pid
    try:
        rss_start = rss_mib(pid)
        start = time.monotonic()
        tally = asyncio.run(drive(url, args))
        elapsed = time.monotonic() - start
        engine_end = settle(url)
        alive = httpx.get(f"{url}/health", timeout=10).status_code == 200
        rss_end = rss_mib(pid)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    requests = sum(tally.sent.values())
    report = {"requests": requests, "by_kind": dict(tally.sent), "by_class": dict(tally.classes),
              "requests_per_s": requests / elapsed if elapsed else 0.0,
              "latency_s": {"p50": percentile(tally.latencies, 0.50), "p99": percentile(tally.latencies, 0.99)},
              "rss_start_mib": None if rss_start is None else round(rss_start, 1),
              "rss_end_mib": None if rss_end is None else round(rss_end, 1),
              "engine_end": engine_end, "server_alive": alive, "examples": tally.examples}
    print_report(report)
    settings = dict(vars(args))
    print(json.dumps({**report, "settings": settings, "elapsed_s": round(elapsed, 1),
                      "server": "started" if process is not None else "given", "model": MODEL,
                      "server_exit_code": None if process is None else process.returncode,
                      "log": None if log is None else str(log), "cpu_count": os.cpu_count()}))
    unexpected = sum(n for c, n in tally.classes.items() if c not in ("ok", "expected_4xx", "disconnected"))
    return 0 if alive and not unexpected else 1


if __name__ == "__main__":
    raise SystemExit(main())
