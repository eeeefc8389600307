"""Where a decode step's time goes on CUDA: the kernels of one step, each projection's achieved bandwidth, and the
sampler, for the 1.5B model with dummy weights.

    python benchmarks/step_profile.py --batches 1,256 --out profile.json
    python benchmarks/step_profile.py --steps-only --batches 1 --nano   # the nano workload by step kind and batch

Prints, per batch size: wall and GPU-busy time per engine step and the top kernels by GPU time per step; then every
linear layer of the model timed alone at batch 1 (28 weight copies in a CUDA graph, so each read comes from HBM, as in
the model) as a share of the copy bandwidth; then the sampler on flat and on peaked logits.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch.nn.functional as F
from gpu_timing import copy_bandwidth, graph_us

from r1serve import LLM, SamplingParams
from r1serve.engine.sampler import Sampler
from r1serve.engine.scheduler import sampling_record

MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"


def step_profile(llm: LLM, batch: int, params: SamplingParams, steps: int = 32, top: int = 18) -> dict[str, Any]:
    """Wall and GPU time per decode step at `batch` streams, and the kernels that take the GPU time."""
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    prompts = [[1000 + (7 * i + j) % 50000 for j in range(128)] for i in range(batch)]
    ids = [engine.add_request(p, params) for p in prompts]
    for _ in range(6):
        engine.step()  # prefill, warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    for request_id in ids:
        engine.abort_request(request_id)
    kernels = [(e.key, e.self_device_time_total / steps, e.count / steps) for e in prof.key_averages()
               if e.self_device_time_total > 0]
    kernels.sort(key=lambda k: -k[1])
    gpu_us = sum(k[1] for k in kernels)
    print(f"--- batch {batch} (temperature {params.temperature}, top_p {params.top_p}): "
          f"{wall_ms:.3f} ms/step wall, {gpu_us / 1e3:.3f} ms/step GPU busy")
    for name, us, count in kernels[:top]:
        print(f"  {us:8.1f} us  {count:5.1f}x  {name[:110]}")
    return {"batch": batch, "wall_ms": wall_ms, "gpu_ms": gpu_us / 1e3,
            "kernels": [{"name": n, "us": u, "calls": c} for n, u, c in kernels[:40]]}


def prefill_profile(llm: LLM, num_prompts: int = 8, length: int = 1024, top: int = 14) -> dict[str, Any]:
    """One full-budget prefill step (num_prompts x length new tokens, no cached prefix): wall time and kernels."""
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    params = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=1, ignore_eos=True)

    def run(seed: int) -> float:
        engine.block_manager.reset_prefix_cache()
        prompts = [[1000 + (seed * 7919 + 31 * i + j) % 100000 for j in range(length)] for i in range(num_prompts)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompts, params)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(0)
    wall_ms = min(run(s) for s in (1, 2, 3)) * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(4)
    kernels = sorted(((e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
                      if e.self_device_time_total > 0), key=lambda k: -k[1])
    gpu_us = sum(k[1] for k in kernels)
    print(f"--- prefill {num_prompts} x {length} tokens: {wall_ms:.1f} ms wall, {gpu_us / 1e3:.1f} ms GPU busy")
    for name, us, count in kernels[:top]:
        print(f"  {us:9.1f} us  {count:5d}x  {name[:110]}")
    return {"prefill_wall_ms": wall_ms, "prefill_gpu_ms": gpu_us / 1e3,
            "kernels": [{"name": n, "us": u, "calls": c} for n, u, c in kernels[:30]]}


def linear_rates(llm: LLM, copy_gbps: float, batch: int = 1) -> list[dict[str, Any]]:
    """Each projection at `batch` rows over 28 distinct weight copies (no L2 reuse): us per call and % of copy GB/s."""
    cfg = llm.engine.model_config
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    shapes = {"qkv_proj (bias)": (q + 2 * kv, h, True), "o_proj": (h, q, False),
              "gate_up_proj": (2 * inter, h, False), "down_proj": (h, inter, False)}
    rows = []
    for name, (n, k, bias) in shapes.items():
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(28)]
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
        x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
        us = graph_us(lambda ws=weights, x=x, b=b: [F.linear(x, w, b) for w in ws]) / 28
        gbps = n * k * 2 / us / 1e3
        rows.append({"layer": name, "shape": [n, k], "us": us, "GBps": gbps, "pct_copy": 100 * gbps / copy_gbps})
        del weights
    head = llm.engine.runner.model.lm_head.weight
    x = torch.randn(batch, head.shape[1], device="cuda", dtype=head.dtype)
    us = graph_us(lambda: F.linear(x, head).float())
    gbps = head.numel() * 2 / us / 1e3
    rows.append({"layer": "lm_head + float()", "shape": list(head.shape), "us": us, "GBps": gbps,
                 "pct_copy": 100 * gbps / copy_gbps})
    print(f"--- projections at batch {batch} (each over 28 weight copies, CUDA graph)")
    for r in rows:
        print(f"  {r['layer']:<20} {str(r['shape']):<16} {r['us']:8.1f} us  {r['GBps']:7.0f} GB/s  "
              f"{r['pct_copy']:5.1f}% of copy")
    return rows


def sampler_times(llm: LLM, batches: list[int]) -> list[dict[str, Any]]:
    """The sampler alone (temperature 0.6, top_p 0.95) on flat (random-weight-like) and peaked logits."""
    import triton.testing

    engine = llm.engine
    vocab = engine.model_config.vocab_size
    sampler = Sampler(engine.eos_token_id)
    rows = []
    for batch in batches:
        params = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=8)
        request_ids = [engine.add_request([1000 + i, 2000], params) for i in range(batch)]
        seqs = [sampling_record(engine.requests[r].seqs[0]) for r in request_ids]
        for kind, scale in (("flat", 1.0), ("peaked", 30.0)):
            logits = torch.randn(batch, vocab, device="cuda") * scale
            ms = triton.testing.do_bench(
                lambda s=seqs, lg=logits: sampler(lg, sampler.batch(s, vocab, lg.device)).tolist(),
                warmup=20, rep=100, return_mode="median")
            rows.append({"batch": batch, "logits": kind, "us": ms * 1e3})
            print(f"--- sampler, batch {batch}, {kind} logits: {ms * 1e3:.1f} us (incl. host and .tolist())")
        for r in request_ids:
            engine.abort_request(r)
    return rows


BATCH_BUCKETS = (16, 64, 128, 192, 255, 256)  # decode steps grouped by batch size: up to each bound


def nano_split(llm: LLM, seeded: bool, num_requests: int = 256, max_len: int = 1024) -> dict[str, Any]:
    """The nano-vllm workload (num_requests, prompt and output lengths U(100, max_len)), with the time of engine
    steps that launch prefill apart from decode-only ones, and the decode-only steps grouped by batch size and
    split into the draining tail (those after the last prefill) and the rest. A step also reads the step
    launched before it, so its time is the pipeline's time per step (a step that launches nothing only reads)."""
    import random

    engine = llm.engine
    schedule, step = engine.scheduler.schedule, engine.step
    kinds: list[tuple[str, int]] = []  # per schedule: kind and rows
    steps: list[tuple[tuple[str, int], float]] = []  # per step: what it scheduled, seconds

    def schedule_and_note() -> Any:
        out = schedule()
        decode = all(s.num_new_tokens == 1 for s in out.scheduled)
        kind = "read" if not out.scheduled else "decode" if decode else "prefill"  # read: the last launch only
        kinds.append((kind, len(out.scheduled)))
        return out

    def timed_step() -> Any:
        start = time.perf_counter()
        out = step()
        steps.append((kinds[-1], time.perf_counter() - start))
        return out

    rng = random.Random(0)
    ins = [rng.randint(100, max_len) for _ in range(num_requests)]
    outs = [rng.randint(100, max_len) for _ in range(num_requests)]
    prompts = [[rng.randrange(1000, 150000) % engine.model_config.vocab_size for _ in range(n)] for n in ins]
    params = [SamplingParams(temperature=0.6, top_p=0.95, max_tokens=o, ignore_eos=True,
                             seed=i if seeded else None) for i, o in enumerate(outs)]
    engine.block_manager.reset_prefix_cache()  # every run prefills its prompts
    engine.scheduler.schedule, engine.step = schedule_and_note, timed_step  # type: ignore[method-assign]
    try:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompts, params)
        total = time.perf_counter() - start
    finally:
        engine.scheduler.schedule, engine.step = schedule, step  # type: ignore[method-assign]
    row = {"seeded": seeded, "seconds": total, "tok_per_s": sum(outs) / total, **step_split(steps)}
    print(f"--- nano workload{' (seed per request)' if seeded else ''}: {total:.2f} s, {row['tok_per_s']:.0f} tok/s; "
          f"steps launching prefill: {row['prefill_steps']} / {row['prefill_s']:.2f} s, decode-only steps "
          f"{row['decode_steps']} / {row['decode_s']:.2f} s, of which the draining tail {row['tail_steps']} / "
          f"{row['tail_s']:.2f} s")
    for bucket in row["decode_by_batch"]:
        print(f"  decode, batch {bucket['batch']:>9}: {bucket['steps']:5d} steps, {bucket['seconds']:6.2f} s, "
              f"{bucket['ms_per_step']:6.2f} ms/step, {bucket['tok_per_s']:8.0f} tok/s")
    return row


def step_split(steps: list[tuple[tuple[str, int], float]]) -> dict[str, Any]:
    """Prefill-launching and decode-only steps' counts and seconds, the decode-only ones after the last prefill
    (the draining tail), and the decode-only ones by batch size (BATCH_BUCKETS)."""
    last_prefill = max((i for i, ((kind, _), _) in enumerate(steps) if kind == "prefill"), default=-1)
    decode = [(i, rows, s) for i, ((kind, rows), s) in enumerate(steps) if kind == "decode"]
    prefill = [s for (kind, _), s in steps if kind == "prefill"]
    tail = [s for i, _, s in decode if i > last_prefill]
    buckets = []
    low = 1
    for high in BATCH_BUCKETS:
        chosen = [(rows, s) for _, rows, s in decode if low <= rows <= high]
        if chosen:
            secs = sum(s for _, s in chosen)
            buckets.append({"batch": f"{low}-{high}" if low < high else str(high), "steps": len(chosen),
                            "seconds": secs, "ms_per_step": 1e3 * secs / len(chosen),
                            "tok_per_s": sum(rows for rows, _ in chosen) / secs if secs else 0.0})
        low = high + 1
    return {"prefill_steps": len(prefill), "prefill_s": sum(prefill), "decode_steps": len(decode),
            "decode_s": sum(s for _, _, s in decode), "tail_steps": len(tail), "tail_s": sum(tail),
            "decode_by_batch": buckets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--nano", action="store_true", help="also time the nano-vllm workload, steps split by kind")
    parser.add_argument("--quantization", default=None, help="a weight format, as `r1serve serve --quantization`")
    parser.add_argument("--steps-only", action="store_true", help="only the decode steps' kernels")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    copy_gbps = copy_bandwidth()
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    llm = LLM(MODEL, load_format="dummy", device="cuda", max_model_len=args.max_model_len,
              enforce_eager=args.enforce_eager, quantization=args.quantization)
    result: dict[str, Any] = {"copy_GBps": copy_gbps, "steps": []}
    batches = [int(b) for b in args.batches.split(",")]
    for batch in batches:
        for params in (SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True),
                       SamplingParams(temperature=0.6, top_p=0.95, max_tokens=200, ignore_eos=True)):
            result["steps"].append(step_profile(llm, batch, params))
    if not args.steps_only:
        result["prefill"] = prefill_profile(llm)
        result["linear_b1"] = linear_rates(llm, copy_gbps, 1)
        result["linear_b256"] = linear_rates(llm, copy_gbps, 256)
        result["sampler"] = sampler_times(llm, batches)
    if args.nano:
        result["nano"] = [nano_split(llm, seeded=False), nano_split(llm, seeded=True)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
