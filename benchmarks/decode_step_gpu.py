"""One decode step of DeepSeek-R1-Distill-Qwen-1.5B (dummy weights, bf16, CUDA graph) before and after the fused
skinny kernels, and each projection alone: cuBLAS against `kernels/triton_linear.py`, all in one run.

    python benchmarks/decode_step_gpu.py --ctx 200 --batches 1,2,4,8,16 --out decode_step.json
    python benchmarks/decode_step_gpu.py --no-sweep    # the committed tuning files
    python benchmarks/decode_step_gpu.py --no-sweep --ctx 600 --step-sweep qkv_proj,o_proj --step-sweep-m 1

1. Projections (unless --no-sweep): each of the model's products at M = 1, 2, 4 rows over 28 distinct weight
   copies in one CUDA graph (every weight read comes from HBM, as in the model): cuBLAS alone, the skinny kernel
   alone with every candidate config, the op as the model ran it before (Triton norm / SiLU kernel + cuBLAS),
   that kernel + the best skinny product, and the fused skinny op with every candidate; prints the fastest per
   shape, writes them as this device's tuning file (`kernels/tuning/skinny-<device>.json`, or --tuning-dir),
   then runs the rest of the benchmark with them.
2. The logits projection at batch 1, cuBLAS against the table's `linear`.
3. The step: the forward graph of one decode step (the runner's `DecodeGraphs`, `--ctx`-token contexts,
   `--max-model-len` as the graph's bound) for several op tables side by side on the same inputs: before
   (element-wise Triton + cuBLAS), after (all fused kernels, programmatic dependent launch), and after with one
   piece changed each; µs per replay (median) and the torch.profiler kernel table per step.
4. Or (--step-sweep) every candidate config of one projection timed inside that whole step graph instead of in a
   graph of its own copies: at one row a product's cost is mostly how its launch overlaps its neighbours' (PDL),
   which the op alone does not show. Prints the fastest, then times the leaders and the committed config again;
   --write-step-sweep adds the winners that beat the committed table to this device's tuning file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gpu_timing import copy_bandwidth, graph_us

from r1serve import LLM
from r1serve.engine.cuda_graphs import DecodeGraphs
from r1serve.kernels import triton_attention, triton_linear, triton_ops
from r1serve.kernels.triton_linear import SKINNY_TABLE, SkinnyConfig, m_bucket
from r1serve.kernels.tuning import TUNING_DIR, write_tuning_file
from r1serve.model.layers import triton_kernel_ops

MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
LAYERS = 28
# name → (N, K, fused activation, bias): the products of one decoder layer, and the logits projection
PROJECTIONS: dict[str, tuple[int, int, int, bool]] = {
    "qkv_proj": (2048, 1536, triton_linear.ACT_ADD_RMS_NORM, True),
    "o_proj": (1536, 1536, triton_linear.ACT_PLAIN, False),
    "gate_up_proj": (17920, 1536, triton_linear.ACT_ADD_RMS_NORM, False),
    "down_proj": (1536, 8960, triton_linear.ACT_SILU_MUL, False),
    "lm_head": (151936, 1536, triton_linear.ACT_PLAIN, False),
}
Inputs = dict[str, Any]


# ---------------------------------------------------------------- projections


def make_inputs(name: str, m: int) -> Inputs:
    """Random inputs of one projection at m rows: `copies` distinct weights (28; 1 for lm_head, larger than L2)."""
    n, k, act, bias = PROJECTIONS[name]
    copies = 1 if name == "lm_head" else LAYERS
    bf = {"device": "cuda", "dtype": torch.bfloat16}
    return {
        "weights": [torch.randn(n, k, **bf) * k ** -0.5 for _ in range(copies)],
        "bias": torch.randn(n, **bf) if bias else None,
        "x": torch.randn(m, 2 * k if act == triton_linear.ACT_SILU_MUL else k, **bf),  # the fused op's input
        "plain_x": torch.randn(m, k, **bf),
        "residual": torch.randn(m, k, **bf),
        "norm_weight": torch.rand(k, **bf) + 0.5,
        "act": act,
    }


def cublas_alone(inp: Inputs) -> Callable[[], object]:
    return lambda: [F.linear(inp["plain_x"], w, inp["bias"]) for w in inp["weights"]]


def skinny_alone(inp: Inputs, config: SkinnyConfig, compile_only: bool = False) -> Callable[[], object]:
    weights = inp["weights"][:1] if compile_only else inp["weights"]
    return lambda: [triton_linear.skinny_linear(inp["plain_x"], w, inp["bias"], config=config,
                                                compile_only=compile_only) for w in weights]


def before_op(inp: Inputs, plain: SkinnyConfig | None = None) -> Callable[[], object]:
    """The op unfused, as the model ran it before: the Triton (add +) RMSNorm or SiLU-and-mul kernel, then cuBLAS
    (or the skinny product with `plain`)."""
    def run() -> None:
        for w in inp["weights"]:
            a = inp["x"]
            if inp["act"] == triton_linear.ACT_ADD_RMS_NORM:
                a, _ = triton_ops.fused_add_rms_norm(inp["x"], inp["residual"], inp["norm_weight"], 1e-6)
            elif inp["act"] == triton_linear.ACT_SILU_MUL:
                a = triton_ops.silu_and_mul(inp["x"])
            if plain is None:
                F.linear(a, w, inp["bias"])
            else:
                triton_linear.skinny_linear(a, w, inp["bias"], config=plain)
    return run


def after_op(inp: Inputs, config: SkinnyConfig, compile_only: bool = False) -> Callable[[], object]:
    """The fused skinny op with `config`."""
    def run() -> None:
        for w in inp["weights"][:1] if compile_only else inp["weights"]:
            triton_linear.skinny_linear(inp["x"], w, inp["bias"], act=inp["act"], residual=inp["residual"],
                                        norm_weight=inp["norm_weight"], eps=1e-6, config=config,
                                        compile_only=compile_only)
    return run


def candidates(n: int, k: int, m: int) -> list[SkinnyConfig]:
    """The sweep: FMA tiles (a whole-K chunk where K fits 2048 columns) up to 4 rows, tensor-core tiles from 8;
    split-K where the row blocks alone would leave SMs idle; whole-K programs that own 4-16 row blocks in turn
    where that still leaves at least two programs per SM."""
    bm, found = m_bucket(m), []
    if bm <= 4:
        for bn in (1, 2, 4, 8, 16):
            for bk in (512, 1024, 2048):
                size = bn * bk * bm
                if bk > 2 * k or not 1024 <= size <= 16384:
                    continue
                warps = 8 if size >= 8192 else 4
                found += [SkinnyConfig(bn, bk, s, warps=warps) for s in _splits(n, k, bn, bk, 264)]
                if bk >= k:
                    found += [SkinnyConfig(bn, bk, warps=warps, tiles=t) for t in (4, 8, 16) if n // bn // t >= 264]
    else:
        for bn in (32, 64, 128):
            for bk in (64, 128, 256):
                if bn * bk <= 16384:  # 4 stages of the weight tile in shared memory
                    found += [SkinnyConfig(bn, bk, s, dot=True, stages=4) for s in _splits(n, k, bn, bk, 132)]
    return found


def _splits(n: int, k: int, bn: int, bk: int, programs: int) -> list[int]:
    """1, and the smallest power-of-two split that gives `programs` programs (at least 2 chunks per split)."""
    blocks, split = -(-n // bn), 1
    while blocks * split < programs and bk * split * 4 <= k:
        split *= 2
    return sorted({1, split})


def precompile(jobs: list[Callable[[], object]]) -> float:
    """Compile every candidate on 16 threads first (Triton's async compile); seconds taken."""
    from triton.runtime._async_compile import AsyncCompileMode

    start = time.perf_counter()
    with AsyncCompileMode(ThreadPoolExecutor(16), ignore_errors=True):
        for job in jobs:
            job()
    return time.perf_counter() - start


def best_config(inp: Inputs, configs: list[SkinnyConfig], fused: bool, rep_ms: int
                ) -> tuple[float, SkinnyConfig, list[tuple[float, str]], float]:
    """Times every config of the fused op (`fused`) or the plain product: (µs of the best per call, the best,
    the next three, seconds spent compiling)."""
    job = (lambda c: after_op(inp, c, compile_only=True)) if fused else \
        (lambda c: skinny_alone(inp, c, compile_only=True))
    compile_s = precompile([job(c) for c in configs])
    timed = []
    for config in configs:
        try:
            timed.append((graph_us(after_op(inp, config) if fused else skinny_alone(inp, config), rep_ms), config))
        except Exception as e:  # a config that does not compile or fit: reported, skipped
            print(f"    {config}: failed ({type(e).__name__}: {str(e)[:120]})")
    timed.sort(key=lambda t: t[0])
    copies = len(inp["weights"])
    return timed[0][0] / copies, timed[0][1], [(round(u / copies, 2), str(c)) for u, c in timed[1:4]], compile_s


def sweep_projection(name: str, m: int, copy_gbps: float, rep_ms: int) -> dict[str, Any]:
    """One projection at m rows: cuBLAS, the best plain skinny config, the op before (activation kernel + cuBLAS),
    the activation kernel + the best plain config, and the best fused config."""
    n, k, act, _ = PROJECTIONS[name]
    inp = make_inputs(name, m)
    configs = candidates(n, k, m)
    copies = len(inp["weights"])
    plain_us, plain, plain_next, compile_s = best_config(inp, configs, False, rep_ms)
    row = {"op": name, "M": m, "N": n, "K": k, "candidates": len(configs),
           "cublas_us": graph_us(cublas_alone(inp), rep_ms) / copies, "plain_us": plain_us, "plain": plain,
           "plain_next": plain_next, "pct_copy": 100 * n * k * 2 / plain_us / 1e3 / copy_gbps}
    if act != triton_linear.ACT_PLAIN:
        fused_us, fused, fused_next, fused_compile_s = best_config(inp, configs, True, rep_ms)
        compile_s += fused_compile_s
        before_us = graph_us(before_op(inp), rep_ms) / copies
        row |= {"before_us": before_us,
                "unfused_skinny_us": before_us if plain is None else graph_us(before_op(inp, plain), rep_ms) / copies,
                "fused_us": fused_us, "fused": fused, "fused_next": fused_next}
    row["compile_s"] = compile_s
    del inp
    torch.cuda.empty_cache()
    return row


def sweep(copy_gbps: float, batches: list[int], rep_ms: int, ops: list[str]) -> list[dict[str, Any]]:
    rows = []
    print("--- projections (µs per call, over 28 weight copies in a CUDA graph; lm_head: 1 copy)")
    print("  op          M | product alone: cuBLAS  skinny %copy | op with its norm / SiLU: before (kernel + "
          "cuBLAS)  kernel + skinny  fused | best configs")
    for m in batches:
        for name in ops:
            r = sweep_projection(name, m, copy_gbps, rep_ms)
            rows.append(r)
            op = (f"{r['before_us']:8.2f} {r['unfused_skinny_us']:8.2f} {r['fused_us']:8.2f}" if "fused" in r
                  else f"{'':>8} {'':>8} {'':>8}")
            print(f"  {name:<12} {m:>2} | {r['cublas_us']:8.2f} {r['plain_us']:8.2f} {r['pct_copy']:5.1f} | {op} | "
                  f"plain {r['plain']}" + (f", fused {r['fused']}" if "fused" in r else "")
                  + f" (of {r['candidates']}; compiled in {r['compile_s']:.1f} s)", flush=True)
            print(f"  {'':15}   next plain: {r['plain_next']}" + (f"; next fused: {r['fused_next']}"
                                                                   if "fused" in r else ""), flush=True)
    return rows


def tuning_entries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sweep's rows as tuning entries: "plain", the best plain config where it beat cuBLAS (else null);
    "fused", the best fused config where it beat the unfused op that the plain choice gives (activation kernel +
    skinny or cuBLAS), else null; each with its time and the alternative's."""
    entries = []
    for r in rows:
        key = {"n": r["N"], "k": r["K"], "m": m_bucket(r["M"])}
        plain_wins = r["plain_us"] < r["cublas_us"]
        entries.append({"form": "plain", **key, "config": _fields(r["plain"]) if plain_wins else None,
                        "us": round(r["plain_us"], 2), "baseline_us": round(r["cublas_us"], 2)})
        if "fused" in r:
            unfused = r["unfused_skinny_us"] if plain_wins else r["before_us"]
            entries.append({"form": "fused", **key, "config": _fields(r["fused"]) if r["fused_us"] < unfused
                            else None, "us": round(r["fused_us"], 2), "baseline_us": round(unfused, 2)})
    return entries


def _fields(config: SkinnyConfig) -> dict[str, Any]:
    return {f: getattr(config, f) for f in SkinnyConfig.__dataclass_fields__}


def _key(entry: dict[str, Any]) -> tuple:
    return tuple(entry[f] for f in SKINNY_TABLE.key_fields)


# ---------------------------------------------------------------- the whole step


def step_inputs(llm: LLM, batch: int, ctx: int) -> dict[str, torch.Tensor]:
    """Decode inputs for `batch` sequences of `ctx` tokens (the new one included) over distinct random blocks."""
    runner = llm.engine.runner
    block = llm.engine.config.block_size
    per_seq = -(-ctx // block)
    tables = torch.arange(batch * per_seq, dtype=torch.int32, device="cuda").view(batch, per_seq)
    gen = torch.Generator(device="cuda").manual_seed(batch)  # the same inputs for every variant
    runner.kv_cache[:, :, : batch * per_seq].normal_(generator=gen)  # never attend over zeros
    positions = torch.full((batch,), ctx - 1, dtype=torch.int64, device="cuda")
    slots = tables[:, (ctx - 1) // block].long() * block + (ctx - 1) % block
    ids = torch.randint(1000, 150000, (batch,), device="cuda", generator=gen)
    return {"input_ids": ids, "positions": positions,
            "slot_mapping": slots, "seq_lens": torch.full((batch,), ctx, dtype=torch.int32, device="cuda"),
            "block_tables": tables}


def capture(llm: LLM, max_batch: int) -> DecodeGraphs:
    runner = llm.engine.runner
    graphs = DecodeGraphs(runner.model, runner.kv_caches, max_batch, llm.engine.max_model_len,
                          llm.engine.config.block_size, runner.model_config.hidden_size, runner.device)
    graphs.capture()
    return graphs


def time_step(llm: LLM, graphs: DecodeGraphs, batch: int, ctx: int) -> tuple[float, torch.Tensor]:
    """µs per replay of the batch's graph (median), and its output."""
    import triton.testing

    out = graphs.run(**step_inputs(llm, batch, ctx))
    replay = graphs.graphs[next(b for b in graphs.buckets if b >= batch)].replay
    us = triton.testing.do_bench(replay, warmup=25, rep=200, return_mode="median") * 1e3
    return us, out.clone()


def profile_step(graphs: DecodeGraphs, batch: int, steps: int = 32, top: int = 24) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    replay = graphs.graphs[next(b for b in graphs.buckets if b >= batch)].replay
    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
    kernels = [{"name": e.key, "us": e.self_device_time_total / steps, "calls": e.count / steps}
               for e in prof.key_averages() if e.self_device_time_total > 0]
    kernels.sort(key=lambda r: -r["us"])
    busy = sum(r["us"] for r in kernels)
    print(f"    GPU busy {busy:.1f} µs per step (sum of kernel times); top kernels per step:")
    for r in kernels[:top]:
        print(f"    {r['us']:8.1f} us {r['calls']:5.1f}x  {r['name'][:100]}")
    return kernels


def logits_us(llm: LLM, rep_ms: int) -> dict[str, float]:
    """compute_logits at batch 1 (outside the graph): cuBLAS as before, and through the fused table."""
    model = llm.engine.runner.model
    hidden = torch.randn(1, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    return {"cublas": graph_us(lambda: F.linear(hidden, model.lm_head.weight).float(), rep_ms),
            "ops.linear": graph_us(lambda: triton_linear.linear(hidden, model.lm_head.weight).float(), rep_ms)}


def step_variants(llm: LLM, batches: list[int], ctx: int, only: str = "") -> list[dict[str, Any]]:
    """The step's graph for each op table, same inputs; checks every variant's output against the first.
    `only`: comma-separated variant numbers to run (0 is the reference the others are checked against)."""
    model = llm.engine.runner.model
    after, tiles = triton_kernel_ops(), triton_attention.DECODE_TILES
    variants: list[tuple[str, Any, bool, triton_attention.DecodeTiles]] = [
        # label, ops, PDL, the decode kernel's tiles
        ("before: element-wise Triton + cuBLAS", triton_kernel_ops(fused=False), False, tiles),
        ("after (PDL, rotary + store in decode)", after, True, tiles),
        ("after without PDL", after, False, tiles),
        ("after, separate rotary + store kernel", replace(after, fused_rotary_store_attend=None), True, tiles),
        ("after, SiLU-and-mul kernel before down_proj", replace(after, fused_silu_linear=None), True, tiles),
        ("after, decode 8 warps", after, True, replace(tiles, num_warps=8)),
        ("after, decode 2 warps", after, True, replace(tiles, num_warps=2)),
        ("after, split decode with 64-key tiles", after, True, replace(tiles, block_n=64)),
        ("after, split decode merged by its last program", after, True, replace(tiles, merge_in_decode=True)),
    ]
    wanted = {int(i) for i in only.split(",")} if only else set(range(len(variants)))
    results, reference_out = [], {}
    for index, (label, ops, pdl, decode_tiles) in enumerate(variants):
        if index not in wanted:
            continue
        model.set_ops(ops)
        model.set_attention_backend(triton_attention.TritonAttention(decode_tiles))
        print(f"--- step: {label}", flush=True)
        with triton_ops.pdl(pdl):
            row = step_variant(llm, label, batches, ctx, reference_out)
        if row is not None:
            results.append(row)
        torch.cuda.empty_cache()
    model.set_ops(triton_kernel_ops())
    model.set_attention_backend(triton_attention.TritonAttention())
    return results


def step_variant(llm: LLM, label: str, batches: list[int], ctx: int,
                 reference_out: dict[int, torch.Tensor]) -> dict[str, Any] | None:
    """One variant's step graph, timed at each batch and checked against the first variant's output (kept in
    `reference_out`); None if it cannot be captured."""
    try:
        graphs = capture(llm, max(batches))
    except Exception as e:  # e.g. PDL not capturable: reported, not fatal
        print(f"    capture failed: {type(e).__name__}: {str(e)[:300]}")
        return None
    row: dict[str, Any] = {"variant": label, "us": {}}
    for batch in batches:
        us, out = time_step(llm, graphs, batch, ctx)
        row["us"][batch] = us
        ref = reference_out.setdefault(batch, out)
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        print(f"    batch {batch:>2}: {us:8.1f} µs per step ({1e6 / us:6.0f} steps/s); "
              f"rel. diff to the first variant {err:.1e}", flush=True)
    row["profile_b1"] = profile_step(graphs, 1)
    del graphs
    return row


# op → (the form its decode-step product takes in the tuning file, N, K): qkv and gate_up run with their norm,
# down_proj with the SiLU-and-mul
STEP_OPS: dict[str, tuple[str, int, int]] = {
    "qkv_proj": ("fused", 2048, 1536), "o_proj": ("plain", 1536, 1536),
    "gate_up_proj": ("fused", 17920, 1536), "down_proj": ("fused", 1536, 8960),
}


def step_candidates(n: int, k: int, m: int) -> list[SkinnyConfig]:
    """The sweep's candidates, plus: 8-warp forms of the row-tile configs, other warp counts and 16-row blocks for
    whole-K programs, and whole-K chunks (the next power of two over K, one or two rows per block, in turn over 1-8
    blocks) where K is wider than 2048 columns."""
    found = candidates(n, k, m)
    found += [replace(c, warps=8) for c in found if c.tiles > 1 and c.warps == 4]
    found += [replace(c, warps=w) for c in found if c.block_k >= k and c.tiles == 1 and c.block_n >= 4
              for w in (4, 8, 16) if w != c.warps]
    found += [SkinnyConfig(16, 2048, warps=w) for w in (8, 16) if k <= 2048 and m_bucket(m) == 1]
    if k > 2048 and m_bucket(m) <= 2:
        bk = 1 << (k - 1).bit_length()
        found += [SkinnyConfig(bn, bk, warps=w, tiles=t) for bn in (1, 2) for w in (4, 8, 16) for t in (1, 2, 4, 8)
                  if -(-n // bn) // t >= 132]
    return found


def committed_entry(op: str, device: str, key: tuple) -> tuple[bool, SkinnyConfig | None]:
    """The table's (measured, config) for `op`'s key, read as the model reads it (down_proj: `silu_entry`)."""
    if op == "down_proj":
        _, n, k, m = key
        return triton_linear.silu_entry(device, n, k, m)
    return SKINNY_TABLE.lookup(device, key)


def step_sweep(llm: LLM, op: str, m: int, ctx: int) -> dict[str, Any]:
    """Every candidate config of `op` at m rows, timed in the whole decode step's graph (batch m, the other ops
    as the tables say): {"ranking": (µs per replay, config) fastest first, "winner": the tuning entry of the
    config that was fastest again against the committed table}. The op alone in a graph of its own copies misses
    how its launch overlaps its neighbours (PDL), which is what decides at one row."""
    form, n, k = STEP_OPS[op]
    key, device = (form, n, k, m_bucket(m)), torch.cuda.get_device_name()
    measured, committed = committed_entry(op, device, key)
    committed = committed if measured else "absent"
    inp = make_inputs(op, m)
    configs = step_candidates(n, k, m)
    fused = form == "fused"
    precompile([(after_op if fused else skinny_alone)(inp, c, compile_only=True) for c in configs])
    del inp
    print(f"--- step sweep: {op} at M={m} ({len(configs)} configs; committed: {committed})", flush=True)

    def timed(config: SkinnyConfig | None) -> float:  # None: the committed table
        restore = SKINNY_TABLE.override(device, {} if config is None else {key: config})
        try:
            graphs = capture(llm, m)
            return time_step(llm, graphs, m, ctx)[0]
        except Exception as e:  # a config that does not compile or fit: reported, skipped
            print(f"    {config}: failed ({type(e).__name__}: {str(e)[:120]})")
            return float("inf")
        finally:
            restore()
            torch.cuda.empty_cache()

    options, labels = [None, *configs], ["committed", *map(str, configs)]
    results = sorted((timed(c), i) for i, c in enumerate(options))
    for us, i in results[:8] + [r for r in results[8:] if r[1] == 0]:
        print(f"    {us:8.1f} µs  {labels[i]}", flush=True)
    leaders = [i for _, i in results[:3]]
    again = leaders + ([] if 0 in leaders else [0])
    again_us: dict[int, list[float]] = {i: [] for i in again}
    for round_ in range(2):  # the leaders and the committed config once more, alternating
        for i in again:
            again_us[i].append(timed(options[i]))
        print(f"    again ({round_ + 1}): " + ", ".join(f"{labels[i]} {again_us[i][-1]:.1f}" for i in again),
              flush=True)
    best = min(again, key=lambda i: sum(again_us[i]))
    mean = {i: sum(us) / len(us) for i, us in again_us.items()}
    winner = {"form": form, "n": n, "k": k, "m": m_bucket(m), "step_us": round(mean[best], 1),
              "committed_step_us": round(mean[0], 1)}
    winner["config"] = _fields(options[best]) if best != 0 else "committed"
    return {"ranking": [(us, labels[i]) for us, i in results], "winner": winner}


def step_sweep_entries(sweeps: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The tuning entries the step sweeps decided: each winner that beat the committed table (its µs are per step
    graph, not per call). A committed choice that won keeps its entry; where there was none, a "fused" form that
    lost to the unfused path gets null (the op's own kernel first)."""
    entries = []
    for op, sweep_ in sweeps.items():
        w = dict(sweep_["winner"])
        if w["config"] == "committed":
            measured, _ = committed_entry(op, torch.cuda.get_device_name(), _key(w))
            if measured or w["form"] != "fused":
                continue
            w["config"] = None
        entries.append(w)
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ctx", type=int, default=200, help="context length of the decode step's sequences")
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--max-model-len", type=int, default=2048, help="the graphs' context bound (≥ --ctx)")
    parser.add_argument("--sweep-batches", default="1,2,4")
    parser.add_argument("--sweep-ops", default=",".join(PROJECTIONS), help="the projections to sweep")
    parser.add_argument("--no-sweep", action="store_true", help="use the committed tuning files")
    parser.add_argument("--tuning-dir", default=str(TUNING_DIR), help="where the sweep writes its tuning file")
    parser.add_argument("--rep-ms", type=int, default=25)
    parser.add_argument("--variants", default="", help="step variants to run, by number (0: the reference)")
    parser.add_argument("--step-sweep", default="", help="ops to sweep inside the step's graph (e.g. "
                        "gate_up_proj,down_proj), at the rows of --step-sweep-m, instead of the step variants")
    parser.add_argument("--step-sweep-m", type=int, default=1)
    parser.add_argument("--write-step-sweep", action="store_true", help="add the step sweep's winners to this "
                        "device's tuning file in --tuning-dir")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}")
    copy_gbps = copy_bandwidth()
    print(f"copy bandwidth (read + write): {copy_gbps:.0f} GB/s")
    result: dict[str, Any] = {"copy_GBps": copy_gbps}
    if not args.no_sweep:
        rows = sweep(copy_gbps, [int(b) for b in args.sweep_batches.split(",")], args.rep_ms,
                     args.sweep_ops.split(","))
        entries = tuning_entries(rows)
        name = torch.cuda.get_device_name()  # this device's own entries: they take precedence over the fallback's
        command = "python benchmarks/decode_step_gpu.py " + " ".join(sys.argv[1:])
        swept = {_key(e) for e in entries}  # the rows and ops not swept keep their entries
        path = write_tuning_file("skinny", name, command.strip(), entries, Path(args.tuning_dir),
                                 keep=lambda e: _key(e) not in swept)
        print(f"--- wrote {path} ({len(entries)} entries)")
        SKINNY_TABLE.override(name, {_key(e): None if e["config"] is None else SkinnyConfig(**e["config"])
                                     for e in entries})
        result["projections"] = rows
    start = time.perf_counter()
    llm = LLM(MODEL, load_format="dummy", device="cuda", max_model_len=args.max_model_len, max_num_seqs=16,
              gpu_memory_utilization=0.5)
    print(f"engine up in {time.perf_counter() - start:.1f} s")
    result["logits_b1_us"] = logits_us(llm, args.rep_ms)
    print(f"--- logits at batch 1 (lm_head + float()): cuBLAS {result['logits_b1_us']['cublas']:.1f} µs, "
          f"through the table's linear {result['logits_b1_us']['ops.linear']:.1f} µs")
    if args.step_sweep:
        result["step_sweep"] = {op: step_sweep(llm, op, args.step_sweep_m, args.ctx)
                                for op in args.step_sweep.split(",")}
        entries = step_sweep_entries(result["step_sweep"])
        if args.write_step_sweep and entries:
            command = "python benchmarks/decode_step_gpu.py " + " ".join(sys.argv[1:])
            keys = {_key(e) for e in entries}
            path = write_tuning_file("skinny", torch.cuda.get_device_name(), command.strip(), entries,
                                     Path(args.tuning_dir), keep=lambda e: _key(e) not in keys)
            print(f"--- wrote {path}: {entries}")
    else:
        result["steps"] = step_variants(llm, [int(b) for b in args.batches.split(",")], args.ctx, args.variants)
        print("--- summary: µs per decode-step forward graph (median replay), same run")
        for row in result["steps"]:
            print(f"  {row['variant']:<42} " + "  ".join(f"b{b}: {us:7.1f}" for b, us in row["us"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
