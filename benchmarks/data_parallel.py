"""Data-parallel replicas behind vllm-router on a CPU: throughput and prefix-cache hit rate of one replica
against two, and of round-robin against cache-aware routing, in one run.

    PYTHONPATH=src python benchmarks/data_parallel.py [--tokenizer ../shared/data/tokenizer] \
        [--num-prefixes 4] [--requests-per-prefix 8] [--concurrency 8] [--max-tokens 16]

Two tiny-model replicas (`--load-format dummy`, one CPU thread each) start as `r1serve serve
--data-parallel-size 2` starts them (`server/data_parallel.py`), then three vllm-routers: one in front of
replica 0 alone, one round robin and one cache-aware in front of both. Each router gets the same workload
with prefixes of its own (nothing cached from an earlier configuration): `--num-prefixes` long shared
prefixes, each followed by `--requests-per-prefix` different questions, in a seeded random order,
`--concurrency` at a time, `--max-tokens` output tokens each (ignore_eos). The hit rate is the prefix-cache
hits over queries (tokens) summed from the replicas' /metrics; the throughput is output tokens per second of
wall time. The tiny model makes the prefill of a shared prefix cheap, so the hit rate is the figure that
carries over to a real model; the throughput mostly shows the router's and the servers' host costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from r1serve.server.data_parallel import (  # noqa: E402
    DataParallelServer,
    find_router,
    plan_replicas,
    router_command,
)
from r1serve.server.settings import ServerSettings  # noqa: E402

MODEL = "DeepSeek-R1-Distill-Qwen-1.5B"
TINY = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "float32"}


def free_ports(count: int) -> int:
    """The first of `count` consecutive loopback ports free now (other servers may share this machine)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = int(probe.getsockname()[1])
        try:
            for sock in [socket.create_server(("127.0.0.1", first + i)) for i in range(count)]:
                sock.close()
        except OSError:
            continue
        return first
    raise RuntimeError("no free consecutive ports")


def start_replicas(args: argparse.Namespace) -> tuple[DataParallelServer, list[str]]:
    folder = Path(tempfile.mkdtemp()) / MODEL
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    argv = ["--model", str(folder), "--load-format", "dummy", "--kv-cache-space", "0.25", "--max-num-seqs", "64",
            "--num-cpu-threads", "1", "--log-level", "warning", "--no-access-log"]
    if args.tokenizer:
        argv += ["--tokenizer", args.tokenizer]
    settings = ServerSettings(model=str(folder), port=free_ports(4), data_parallel_size=2)
    specs = plan_replicas(settings, argv, cuda=False, environ={}, num_cores=2)
    server = DataParallelServer(settings, specs, find_router())
    try:
        for spec in specs:
            server.start_replica(spec)
        server.wait_replicas_ready()
    except BaseException:
        server.stop()
        raise
    return server, [spec.url for spec in specs]


def start_router(urls: list[str], policy: str, port: int) -> subprocess.Popen[bytes]:
    settings = ServerSettings(model="m", port=port, data_parallel_size=1, data_parallel_base_port=port,
                              router_policy=policy, log_level="warning")  # type: ignore[arg-type]
    process = subprocess.Popen(router_command(find_router(), settings, urls), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the {policy} router on port {port} did not become healthy")


def replica_counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {}
    for name, pattern in (("hits", r"^r1serve_prefix_cache_hits_total (\S+)$"),
                          ("queries", r"^r1serve_prefix_cache_queries_total (\S+)$"),
                          ("requests", r'^r1serve_http_requests_total\{route="/v1/completions",status="200"\} (\S+)$')):
        match = re.search(pattern, text, re.M)
        found[name] = float(match.group(1)) if match else 0.0
    return found


def workload(args: argparse.Namespace, seed: int) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for k in range(args.num_prefixes):
        prefix = " ".join(f"s{seed}p{k}w{j}" for j in range(args.prefix_words))
        prompts += [f"{prefix} question {q}: what follows?" for q in range(args.requests_per_prefix)]
    rng.shuffle(prompts)
    return prompts


async def send_all(url: str, prompts: list[str], args: argparse.Namespace) -> int:
    """Every prompt, `concurrency` at a time; returns the output tokens."""
    limit = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(prompt: str) -> int:
            async with limit:
                body = {"model": MODEL, "prompt": prompt, "max_tokens": args.max_tokens, "ignore_eos": True}
                response = await client.post(f"{url}/v1/completions", json=body)
                try:
                    return int(response.json()["usage"]["completion_tokens"])
                except (ValueError, KeyError) as exc:
                    raise RuntimeError(f"{url}: {response.status_code} {response.text[:300]!r}") from exc
        return sum(await asyncio.gather(*(one(p) for p in prompts)))


def measure(name: str, router_url: str, replicas: list[str], args: argparse.Namespace, seed: int) -> dict:
    prompts = workload(args, seed)
    before = [replica_counters(url) for url in replicas]
    started = time.perf_counter()
    tokens = asyncio.run(send_all(router_url, prompts, args))
    wall = time.perf_counter() - started
    after = [replica_counters(url) for url in replicas]
    delta = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
    hits, queries = sum(d["hits"] for d in delta), sum(d["queries"] for d in delta)
    return {"config": name, "requests": len(prompts), "wall_s": round(wall, 2),
            "output_tok_s": round(tokens / wall, 1), "requests_s": round(len(prompts) / wall, 2),
            "prefix_hit_rate": round(hits / queries, 3) if queries else 0.0,
            "requests_per_replica": [int(d["requests"]) for d in delta]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_tokenizer = REPO.parent / "shared" / "data" / "tokenizer"
    parser.add_argument("--tokenizer", default=str(default_tokenizer) if default_tokenizer.is_dir() else None)
    parser.add_argument("--num-prefixes", type=int, default=4)
    parser.add_argument("--requests-per-prefix", type=int, default=8)
    parser.add_argument("--prefix-words", type=int, default=150)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    server, replicas = start_replicas(args)
    routers = []
    try:
        configs = [("1 replica", replicas[:1], "round_robin"), ("2 replicas, round robin", replicas, "round_robin"),
                   ("2 replicas, cache aware", replicas, "cache_aware")]
        rows = []
        for seed, (name, urls, policy) in enumerate(configs):
            port = free_ports(2)  # the router, its metrics
            routers.append(start_router(urls, policy, port))
            rows.append(measure(name, f"http://127.0.0.1:{port}", replicas, args, seed))
    finally:
        for router in routers:
            router.terminate()
        server.stop()
    print(f"{'config':<26} {'requests':>8} {'wall s':>7} {'out tok/s':>9} {'req/s':>6} {'hit rate':>8}  per replica")
    for row in rows:
        print(f"{row['config']:<26} {row['requests']:>8} {row['wall_s']:>7.2f} {row['output_tok_s']:>9.1f} "
              f"{row['requests_s']:>6.2f} {row['prefix_hit_rate']:>8.3f}  {row['requests_per_replica']}")
    print(json.dumps({"benchmark": "data_parallel", "settings": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
