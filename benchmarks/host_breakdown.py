"""Where the host's time goes in a real engine step on CUDA, and how long it waits for the device.

    python benchmarks/host_breakdown.py --batch 256 [--steps 60] [--profile]

Builds the 1.5B dummy engine, starts `--batch` streamed requests (128-token prompts, long outputs), and times the
parts of each decode step: scheduling, the runner's execute (of which input packing and the sampling batch), the
wait for the device's tokens, and processing the outputs. A wait near zero means the step is host-bound: the
device finishes before the host has the next step ready. `host_overhead.py` measures the same Python with the
model stubbed, on any machine; this one includes the CUDA calls and runs on the GPU machine.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable
from typing import Any

import torch

import r1serve.engine.model_runner as model_runner
from r1serve import LLM, SamplingParams

MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"


def timed(seconds: dict[str, float], label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[label] += time.perf_counter() - start

    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--profile", action="store_true", help="also print a cProfile of 30 steps")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script, not a measurement")
    args = p.parse_args()
    llm = LLM(MODEL, load_format="dummy", device=args.device, max_model_len=4096, max_num_seqs=args.batch)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    engine = llm.engine
    params = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=3000, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request([1000 + (7 * i + j) % 50000 for j in range(128)], params)
    for _ in range(10):  # prefill and the first decodes
        engine.step()
    labels = ("schedule", "execute (pack, launches, sampling launch)", "  of which pack", "  of which sampler.batch",
              "wait for the device (tolist)", "process outputs")
    seconds: dict[str, float] = dict.fromkeys(labels, 0.0)
    engine.scheduler.schedule = timed(seconds, labels[0], engine.scheduler.schedule)
    engine.runner.execute = timed(seconds, labels[1], engine.runner.execute)
    engine.runner.packer.pack = timed(seconds, labels[2], engine.runner.packer.pack)
    engine.runner.sampler.batch = timed(seconds, labels[3], engine.runner.sampler.batch)
    model_runner.SampledTokens.tolist = timed(seconds, labels[4], model_runner.SampledTokens.tolist)
    engine._process = timed(seconds, labels[5], engine._process)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    sync()
    wall = (time.perf_counter() - start) / args.steps
    print(f"batch {args.batch}: {wall * 1e3:.3f} ms per step, wall")
    for label, total in seconds.items():
        print(f"  {label:45s} {total / args.steps * 1e3:7.3f} ms per step")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(30):
            engine.step()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(28)


if __name__ == "__main__":
    main()
