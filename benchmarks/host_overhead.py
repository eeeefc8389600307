"""Host time per engine step with the model stubbed out: what the Python around the GPU costs per step.

    python benchmarks/host_overhead.py --batch 256 --steps 200 [--stream [--stream-interval N]] [--profile]
    python benchmarks/host_overhead.py --batch 256 --output-len 8000
    python benchmarks/host_overhead.py --structured json --tokenizer ../shared/data/tokenizer
    python benchmarks/host_overhead.py --stream --against-windows --tokenizer ../shared/data/tokenizer

`--structured json` puts offline.py's JSON schema on every request (the prompts open no reasoning, so the
grammar runs from the first token): what accepting the tokens and filling the masks add to a step. It wants the
real tokenizer, whose 151,936 tokens are what xgrammar's masks are computed over.

`--against-windows` runs a second engine beside the first whose detokenizers decode windows of ids instead of
reading the tokenizer's token bytes, steps alternating between the two (so that the machine's load hits both
alike), and prints both medians and their ratio.

Runs the real scheduler, input packing, sampling-parameter batching, token bookkeeping, detokenizer and outputs on
CPU; the forward pass and the sampler are replaced by `FakeRunner`, which returns computed tokens at once. With
`--stream` the engine returns each step's deltas (`LLMEngine.step_deltas`), as the server's engine process does.
On a GPU the step's host time overlaps the device's (the engine pipelines steps), so a step costs the larger of
the two: this script measures the host side alone, on any machine.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from offline import STRUCTURED

from r1serve import SamplingParams
from r1serve.config import R1_DISTILL_QWEN_1_5B_CONFIG, EngineConfig
from r1serve.engine.fake_runner import FakeRunner
from r1serve.engine.llm_engine import LLMEngine

TINY = {**R1_DISTILL_QWEN_1_5B_CONFIG, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def stubbed_engine(config: EngineConfig) -> LLMEngine:
    """An `LLMEngine` whose runner is `FakeRunner` doing a real step's host work (a picklable factory:
    `ProcessEngine(config, stubbed_engine)`). One torch thread: on a GPU the host does no tensor arithmetic, and
    idle OpenMP workers spinning beside the server's process doubled the CPU time measured per token."""
    torch.set_num_threads(1)
    return LLMEngine(config, runner_factory=partial(FakeRunner, host_work=True))


def tiny_model_folder() -> Path:
    folder = Path(tempfile.mkdtemp())
    (folder / "config.json").write_text(json.dumps(TINY))
    return folder


def build_engine(args: argparse.Namespace, windows: bool = False) -> LLMEngine:
    """The tiny engine with room for every sequence's whole context, its model stubbed, its requests added
    (`windows`: detokenized through windows of ids, not the tokenizer's token bytes)."""
    max_model_len = max(4096, args.prompt_len + args.output_len + args.steps + 64)
    kv_gib = 2.0 * args.batch * max_model_len * 256 / 2**30 + 0.25  # TINY: 256 bytes of K/V per token
    engine = stubbed_engine(EngineConfig(model=str(tiny_model_folder()), load_format="dummy", device="cpu",
                                         dtype="float32", max_num_seqs=args.batch, kv_cache_space=kv_gib,
                                         max_model_len=max_model_len, tokenizer=args.tokenizer,
                                         stream_interval=args.stream_interval))
    if windows:
        engine.tokenizer.token_bytes = lambda skip_special_tokens=True: None
    params = SamplingParams(temperature=args.temperature, top_p=0.95, max_tokens=args.output_len + args.steps + 50,
                            ignore_eos=True, structured_output=STRUCTURED.get(args.structured))
    for i in range(args.batch):
        engine.add_request([1000 + (i * 31 + j) % 90000 for j in range(args.prompt_len)], params, stream=args.stream)
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prompt-len", type=int, default=500)
    parser.add_argument("--output-len", type=int, default=0, help="tokens each sequence generates before the "
                        "timed steps (long outputs: what a step costs deep into a reasoning trace)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--stream", action="store_true", help="report every step (as the server does), not only "
                        "the final outputs (as LLM.generate does)")
    parser.add_argument("--stream-interval", type=int, default=1, help="with --stream: the tokens a stream "
                        "gathers before its output goes out (`r1serve serve --stream-interval`)")
    parser.add_argument("--structured", choices=sorted(STRUCTURED), help="this constraint on every request")
    parser.add_argument("--tokenizer", help="a tokenizer folder (default: the byte-level fallback)")
    parser.add_argument("--against-windows", action="store_true", help="also time an engine detokenizing "
                        "through windows of ids, steps alternating with the first")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="tottime", help="profile order (tottime, cumulative)")
    args = parser.parse_args()
    engines = [warmed_up(build_engine(args), args)]
    if args.against_windows:
        engines.append(warmed_up(build_engine(args, windows=True), args))
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    times = timed_steps(engines, args)
    if profiler:
        profiler.disable()
    for label, engine_times in zip(("", " (windows)")[:len(times)], times, strict=True):
        median = statistics.median(engine_times)
        constraint = f", {args.structured} constraint" if args.structured else ""
        print(f"host time per decode step at batch {args.batch}{' (streamed)' if args.stream else ''}{constraint}, "
              f"{args.prompt_len}-token prompts, {args.output_len}+ tokens out{label}: median {median * 1e3:.2f} ms "
              f"({median / args.batch * 1e6:.1f} us per sequence), mean {statistics.fmean(engine_times) * 1e3:.2f} ms")
    if len(times) == 2:
        print(f"token bytes / windows: {statistics.median(times[0]) / statistics.median(times[1]):.3f}")
    if profiler:
        pstats.Stats(profiler).sort_stats(args.sort).print_stats(18)


def warmed_up(engine: LLMEngine, args: argparse.Namespace) -> LLMEngine:
    """The engine once its grammars are compiled, its prompts prefilled and `5 + output_len` decodes run."""
    while engine.structured.compiling:
        engine.structured.wait(1.0)
        engine.step()
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                          for s in engine.scheduler.running):
        engine.step()
    for _ in range(5 + args.output_len):
        engine.step()
    return engine


def timed_steps(engines: list[LLMEngine], args: argparse.Namespace) -> list[list[float]]:
    """Seconds per step of each engine, `args.steps` each, the engines taking turns (in alternating order)."""
    times: list[list[float]] = [[] for _ in engines]
    for i in range(args.steps):
        for k in (range(len(engines)) if i % 2 == 0 else reversed(range(len(engines)))):
            engine = engines[k]
            step = engine.step_deltas if args.stream else engine.step
            picked = engine.runner.mask_pick_s
            start = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - start - (engine.runner.mask_pick_s - picked))  # the device's
    return times


if __name__ == "__main__":
    main()
