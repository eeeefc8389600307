"""The MLP half of a decoder layer at decode sizes: today's chain (norm-fused gate/up + SiLU kernel, then
down_proj's `linear`) against `kernels/triton_fused_mlp.fused_mlp` (one persistent launch), in one run.

    PYTHONPATH=src python3 benchmarks/fused_mlp_gpu.py [--rows 1,2,4,8] [--rep-ms 30] [--out fused_mlp.json]

For each row count M: a CUDA graph of 28 layer copies (distinct weights per layer, 2.3 GB, so L2 holds none of
them) of (a) the chain and (b) `fused_mlp` with each candidate config (block_n of each phase, chunk, warps, FMA
or tensor cores), then the best one over several grids and as two launches without flags; µs per layer, the
ratio, the bandwidth floor (the layer's weight bytes at the device-to-device copy bandwidth measured in the same
run) and the max abs error of (b) against (a) on layer 0. A config that fails to compile, run or match prints
its failure and the sweep goes on. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from gpu_timing import copy_bandwidth, graph_calls_us

from r1serve.kernels import triton_fused_mlp, triton_linear
from r1serve.kernels.triton_fused_mlp import FusedMlpConfig

LAYERS = 28
HIDDEN, INTER = 1536, 8960
EPS = 1e-6
MAX_ABS_ERR = 0.05  # a config whose layer-0 output is further from the chain's than this is reported as wrong
Layers = dict[str, Any]


def make_layers(m: int) -> Layers:
    """Distinct weights per layer copy; one x / residual / norm weight (each layer reads them from L2)."""
    bf = {"device": "cuda", "dtype": torch.bfloat16}
    return {"gate_up": [torch.randn(2 * INTER, HIDDEN, **bf) * HIDDEN ** -0.5 for _ in range(LAYERS)],
            "down": [torch.randn(HIDDEN, INTER, **bf) * INTER ** -0.5 for _ in range(LAYERS)],
            "x": torch.randn(m, HIDDEN, **bf), "residual": torch.randn(m, HIDDEN, **bf),
            "norm_weight": torch.rand(HIDDEN, **bf) + 0.5}


def chain_layer(lay: Layers, i: int) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        act, _ = triton_linear.rms_norm_gate_up(lay["x"], lay["residual"], lay["norm_weight"], EPS,
                                                lay["gate_up"][i])
        return triton_linear.linear(act, lay["down"][i])
    return run


def fused_layer(lay: Layers, i: int, config: FusedMlpConfig, programs: int | None = None, two: bool = False,
                compile_only: bool = False) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        out, _ = triton_fused_mlp.fused_mlp(lay["x"], lay["residual"], lay["norm_weight"], EPS, lay["gate_up"][i],
                                            lay["down"][i], num_programs=programs, config=config, two_launches=two,
                                            compile_only=compile_only)
        return out
    return run


def candidates(m: int) -> list[FusedMlpConfig]:
    """FMA tiles (block_n1 1-4 activation columns, block_n2 2-8 down_proj rows, chunks of 1024 or 4096 columns,
    8 warps, and 4 for one-column blocks; fewer at 8 rows, whose [BN, 8, K] products fill the registers), and
    tensor-core tiles (16-row blocks) from 4 rows."""
    narrow = m >= 8
    found = [FusedMlpConfig(bn1, bn2, chunk, warps=warps)
             for bn1 in ((1, 2) if narrow else (1, 2, 4)) for bn2 in (2, 4, 8)
             for chunk in ((1024, 2048) if narrow else (1024, 4096)) for warps in ((4, 8) if bn1 == 1 else (8,))]
    if m >= 4:
        found += [FusedMlpConfig(16, bn2, chunk, dot1=True, dot2=bn2 >= 16, warps=w)
                  for bn2 in (4, 16) for chunk in (512, 2048) for w in (4, 8)]
        found += [FusedMlpConfig(bn1, 16, chunk, dot2=True, warps=w) for bn1 in (1, 2) for chunk in (512, 2048)
                  for w in (4, 8)]
    return found


def precompile(jobs: list[Callable[[], object]]) -> float:
    """Compile every candidate on 16 threads first (Triton's async compile); seconds taken."""
    from triton.runtime._async_compile import AsyncCompileMode

    start = time.perf_counter()
    with AsyncCompileMode(ThreadPoolExecutor(16), ignore_errors=True):
        for job in jobs:
            try:
                job()
            except Exception as e:  # reported again when the config is timed
                print(f"    compile: {type(e).__name__}: {str(e)[:100]}")
    return time.perf_counter() - start


def time_fused(lay: Layers, ref: torch.Tensor, config: FusedMlpConfig, rep_ms: int, programs: int | None = None,
               two: bool = False) -> tuple[float, float]:
    """(µs per layer, max abs error of layer 0 against the chain); raises if the output is wrong or a wait gave
    up."""
    out = fused_layer(lay, 0, config, programs, two)()
    err = (out.float() - ref.float()).abs().max().item()
    status = triton_fused_mlp.read_status(out.device)
    if status or not err < MAX_ABS_ERR:
        raise RuntimeError(f"wrong output: max abs error {err:.4f}, a wait gave up: {bool(status)}")
    us = graph_calls_us([fused_layer(lay, i, config, programs, two) for i in range(LAYERS)], rep_ms=rep_ms)
    if triton_fused_mlp.read_status(out.device):
        raise RuntimeError("a wait gave up during the timed replays")
    return us, err


def sweep_rows(m: int, floor_us: float, rep_ms: int) -> dict[str, Any]:
    """One row count: the chain, every candidate, then the best over grids and as two launches."""
    lay = make_layers(m)
    ref = chain_layer(lay, 0)()
    chain_us = graph_calls_us([chain_layer(lay, i) for i in range(LAYERS)], rep_ms=rep_ms)
    configs = candidates(m)
    compile_s = precompile([fused_layer(lay, 0, c, compile_only=True) for c in configs])
    print(f"--- M={m}: chain {chain_us:.2f} µs per layer, floor {floor_us:.2f}; {len(configs)} configs "
          f"(compiled in {compile_s:.0f} s)")
    timed = []
    for config in configs:
        try:
            us, err = time_fused(lay, ref, config, rep_ms)
            timed.append((us, err, config))
        except Exception as e:  # a config that does not compile, fit or match: reported, skipped
            print(f"    {config}: failed ({type(e).__name__}: {str(e)[:140]})")
    if not timed:
        return {"M": m, "chain_us": chain_us, "floor_us": floor_us, "fused_us": None}
    timed.sort(key=lambda t: t[0])
    for us, err, config in timed[:5]:
        print(f"    {config}: {us:.2f} µs (x{chain_us / us:.2f} of the chain), max abs err {err:.4f}")
    us, err, best = timed[0]
    grids = grid_sweep(lay, ref, best, rep_ms)
    two_us = _try(lambda: time_fused(lay, ref, best, rep_ms, two=True)[0])
    row = {"M": m, "chain_us": chain_us, "floor_us": floor_us, "fused_us": us, "ratio": chain_us / us,
           "max_abs_err": err, "best": str(best), "grids": grids, "two_launches_us": two_us,
           "next": [(round(u, 2), str(c)) for u, _, c in timed[1:4]]}
    return row


def grid_sweep(lay: Layers, ref: torch.Tensor, config: FusedMlpConfig, rep_ms: int) -> dict[str, float | None]:
    """The best config over grids: the default, the SM count and a few below it."""
    sms = triton_fused_mlp.sm_count(lay["x"].device)
    grids = {"default": None} | {str(p): p for p in sorted({sms, sms - 4, 128, 120, sms // 2} - {0}, reverse=True)
                                 if 0 < p <= sms}
    return {name: _try(lambda p=p: time_fused(lay, ref, config, rep_ms, programs=p)[0]) for name, p in grids.items()}


def _try(fn: Callable[[], float]) -> float | None:
    try:
        return fn()
    except Exception as e:
        print(f"    failed ({type(e).__name__}: {str(e)[:140]})")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--rep-ms", type=int, default=30)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}, PDL {triton_fused_mlp.triton_ops.use_pdl()}")
    copy_gbps = copy_bandwidth()
    weight_bytes = 3 * HIDDEN * INTER * 2
    floor_us = weight_bytes / copy_gbps / 1e3
    print(f"copy bandwidth (read + write): {copy_gbps:.0f} GB/s; {weight_bytes / 1e6:.1f} MB of weights per layer: "
          f"floor {floor_us:.2f} µs")
    start = time.perf_counter()
    rows = []
    for m in args.rows.split(","):
        rows.append(sweep_rows(int(m), floor_us, args.rep_ms))
        torch.cuda.empty_cache()  # the row count's 2.3 GB of layer weights
    print("--- summary: µs per layer (28 layer copies in one CUDA graph)")
    print(f"  {'M':>2} {'chain':>8} {'fused':>8} {'ratio':>6} {'floor':>7} {'2 launches':>10} {'max err':>8}  best")
    for r in rows:
        fused = f"{r['fused_us']:8.2f} {r['ratio']:6.2f}" if r["fused_us"] else f"{'-':>8} {'-':>6}"
        two = f"{r['two_launches_us']:10.2f}" if r.get("two_launches_us") else f"{'-':>10}"
        err = f"{r['max_abs_err']:8.4f}" if r["fused_us"] else f"{'-':>8}"
        print(f"  {r['M']:>2} {r['chain_us']:8.2f} {fused} {r['floor_us']:7.2f} {two} {err}  {r.get('best', '')}")
    result = {"device": torch.cuda.get_device_name(), "copy_GBps": copy_gbps, "rows": rows,
              "seconds": time.perf_counter() - start, "command": " ".join(sys.argv)}
    print(json.dumps(result, default=str))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
