"""Where the engine's start-up time goes on CUDA, Triton's kernel compiles above all.

    python benchmarks/startup_profile.py --out startup.json [--cache DIR] [--requests 64]

Builds the 1.5B dummy engine (load, KV sizing, graph capture, sampler warm-up) with every Triton compile timed
through Triton's JIT hooks, then serves a short nano-like workload (prompt and output lengths uniform in 100-1,024,
`ignore_eos`) and counts the compiles that land there. Without --cache the kernel cache starts empty, as on a fresh
machine. Prints the start-up time, the compile count and seconds per kernel (phase "ahead": compiled on
`compile_ahead`'s pool, in parallel and not timed one by one; the engine logs their wall time), and writes
every compile (kernel, constants, seconds, phase, Triton's specialisation data) to --out, so the compiles can be
replayed elsewhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from typing import Any

MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"


class CompileLog:
    """Triton's jit_cache_hook (before a compile) and jit_post_compile_hook (after it), timing each compile."""

    def __init__(self) -> None:
        self.phase = "startup"
        self.entries: list[dict[str, Any]] = []
        self._started: dict[Any, float] = {}

    def install(self) -> None:
        from triton import knobs

        knobs.runtime.jit_cache_hook = self._before
        knobs.runtime.jit_post_compile_hook = self._after

    def _before(self, *, key: Any, fn: Any, **_: Any) -> bool:
        self._started[(fn.name, str(key))] = time.perf_counter()
        return False  # compile as usual

    def _after(self, *, key: Any, fn: Any, compile: dict[str, Any], **_: Any) -> bool:
        start = self._started.pop((fn.name, str(key)), None)  # None: compiled ahead, on the pool, untimed
        self.entries.append(dict(
            kernel=fn.name, phase=self.phase if start is not None else "ahead",
            seconds=time.perf_counter() - start if start is not None else 0.0,
            constants={str(k): str(v) for k, v in compile["constants"].items()},
            num_warps=compile["num_warps"], num_stages=compile["num_stages"],
            specialization_data=compile["specialization_data"],
        ))
        return False

    def summary(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = defaultdict(lambda: dict(count=0, seconds=0.0))
        for e in self.entries:
            row = out[f"{e['phase']}:{e['kernel']}"]
            row["count"] += 1
            row["seconds"] += e["seconds"]
        return dict(sorted(out.items(), key=lambda kv: -kv[1]["seconds"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--cache", default=None, help="Triton cache folder (default: a new, empty one)")
    p.add_argument("--requests", type=int, default=64, help="nano-like requests served after start-up (0: none)")
    p.add_argument("--max-model-len", type=int, default=4096)
    args = p.parse_args()
    os.environ["TRITON_CACHE_DIR"] = args.cache or tempfile.mkdtemp(prefix="triton-cache-")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = CompileLog()
    log.install()

    import torch

    from r1serve import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(MODEL, load_format="dummy", device="cuda", max_model_len=args.max_model_len)
    torch.cuda.synchronize()
    startup = time.perf_counter() - start
    served = 0.0
    if args.requests:
        log.phase = "serving"
        from offline import nano_workload  # (benchmarks/ is the script's folder, so on sys.path)

        prompts, lens = nano_workload(args.requests)
        params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.6) for n in lens]
        t = time.perf_counter()
        llm.generate(prompts, params)
        served = time.perf_counter() - t
    summary = log.summary()
    result = dict(startup_s=startup, serve_s=served, requests=args.requests, cache=os.environ["TRITON_CACHE_DIR"],
                  compiles=len(log.entries), compile_s=sum(e["seconds"] for e in log.entries),
                  by_kernel=summary, entries=log.entries)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"start-up {startup:.1f} s; {len(log.entries)} compiles, {result['compile_s']:.1f} s in all; "
          f"{args.requests} requests served in {served:.1f} s")
    for name, row in summary.items():
        print(f"  {name:48s} {row['count']:4d} compiles {row['seconds']:7.1f} s")


if __name__ == "__main__":
    main()
