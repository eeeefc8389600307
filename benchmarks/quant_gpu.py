"""The quantized linear kernels (`kernels/triton_quant.py`) against bf16 at the 1.5B model's projection shapes,
with the weight bytes each reads and the device's copy bandwidth measured in the same run beside them.

Why: quantized decode is only faster if the kernels stream their packed bytes near the memory's rate; this
shows, per shape and row count, how close each layout comes and what it costs against cuBLAS and r1serve's
skinny bf16 product (`triton_linear.linear`). Each time is per call, the median replay of one CUDA graph over
enough distinct weight copies (≥ 160 MiB in all) that every read comes from HBM, not L2, as in the model.
Variants: bf16 cuBLAS (`F.linear`), bf16 `triton_linear.linear`, int4 group 128 symmetric and with zero points,
int8 and fp8 weight-only, and int8 / fp8 W8A8 (`act_quant`, its per-token quantization kernel included).
GB/s counts the weight bytes alone (packed weights, scales, zeros). Ends with one JSON line.

    PYTHONPATH=src python3 benchmarks/quant_gpu.py            # the table (about 2 minutes on an H100)
    PYTHONPATH=src python3 benchmarks/quant_gpu.py --sweep --sweep-rows 1,2,16   # also: skinny configs (~10 min)
    PYTHONPATH=src python3 benchmarks/quant_gpu.py --no-table --sweep --sweep-rows 1 --sweep-layouts int4
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from gpu_timing import copy_bandwidth, graph_calls_us

from r1serve.kernels import quant_reference as qr
from r1serve.kernels import triton_linear
from r1serve.kernels import triton_quant as tq
from r1serve.kernels.triton_linear import SkinnyConfig
from r1serve.kernels.tuning import TUNING_DIR, write_tuning_file

SHAPES = {"qkv_proj": (2048, 1536), "o_proj": (1536, 1536), "gate_up_proj": (17920, 1536),
          "down_proj": (1536, 8960)}  # name → (N, K)
ROWS = (1, 2, 4, 8, 16, 256)
VARIANTS = ("bf16 cublas", "bf16 triton", "int4 g128", "int4 g128 zp", "int8", "int8 w8a8", "fp8", "fp8 w8a8")
LAYERS = 28
COPY_BYTES = 160 << 20  # weight copies per graph: at least this many bytes (the H100 / H200 L2 is 50 MiB)
Call = Callable[[torch.Tensor], torch.Tensor]


def weight_copies(variant: str, n: int, k: int) -> tuple[list[Call], int]:
    """Distinct copies of one random [n, k] weight in the variant's layout, each as a call on x, and the bytes
    one call must read (weights, scales, zeros)."""
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    if variant.startswith("bf16"):
        tensors, nbytes = (weight,), weight.numel() * 2
        op = F.linear if variant == "bf16 cublas" else triton_linear.linear
    elif variant.startswith("int4"):
        qweight, scales, zeros = qr.quantize_int4(weight, 128, symmetric=not variant.endswith("zp"))
        tensors = (qweight, scales, zeros)
        nbytes = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        op = lambda x, q, s, z: tq.int4_linear(x, q, s, z, 128, None)  # noqa: E731
    else:
        fmt = variant.split()[0]
        tensors = qr.quantize_per_channel(weight, fmt)
        nbytes = tensors[0].numel() + tensors[1].numel() * 4
        act_quant = variant.endswith("w8a8")
        op = lambda x, q, s: tq.per_channel_linear(x, q, s, None, act_quant)  # noqa: E731
    copies = max(4, min(64, math.ceil(COPY_BYTES / nbytes)))
    calls = []
    for _ in range(copies):
        clone = tuple(None if t is None else t.clone() for t in tensors)
        calls.append(lambda x, c=clone: op(x, *c))
    return calls, nbytes


def time_variants(bw: float) -> list[dict]:
    """One row per (shape, variant, M): µs per call and GB/s of weight bytes."""
    rows = []
    for name, (n, k) in SHAPES.items():
        for variant in VARIANTS:
            calls, nbytes = weight_copies(variant, n, k)
            for m in ROWS:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                us = graph_calls_us([partial(call, x) for call in calls])
                rows.append({"shape": name, "n": n, "k": k, "m": m, "variant": variant, "us": round(us, 2),
                             "weight_bytes": nbytes, "GBps": round(nbytes / us * 1e-3, 1),
                             "roofline_us": round(nbytes / bw * 1e6, 2)})
            del calls
            torch.cuda.empty_cache()
    return rows


def print_tables(rows: list[dict], bw: float) -> dict[str, float]:
    """µs per call and GB/s (percent of copy bandwidth) per shape and M; returns the 28 layers' projection time
    per variant at M = 1 (one decode token's linear layers, lm_head excluded)."""
    by_key = {(r["shape"], r["m"], r["variant"]): r for r in rows}
    head = f"{'shape':<13}{'M':>4} | " + " | ".join(f"{v:>12}" for v in VARIANTS)
    for title, fmt in (("µs per call", lambda r: f"{r['us']:>12.2f}"),
                       (f"GB/s of weight bytes (copy bandwidth {bw * 1e-9:.0f} GB/s)",
                        lambda r: f"{r['GBps']:>7.0f} {100 * r['GBps'] * 1e9 / bw:>3.0f}%")):
        print(f"\n{title}\n{head}")
        for name in SHAPES:
            for m in ROWS:
                print(f"{name:<13}{m:>4} | " + " | ".join(fmt(by_key[name, m, v]) for v in VARIANTS))
    step = {v: round(LAYERS * sum(by_key[name, 1, v]["us"] for name in SHAPES), 1) for v in VARIANTS}
    print("\n28 layers' projections at M = 1, µs: " + ", ".join(f"{v} {us}" for v, us in step.items()))
    return step


def sweep_candidates(m: int) -> list[SkinnyConfig]:
    """The skinny configs a sweep tries at m rows: FMA forms up to FMA_MAX_M rows (the taller blocks are the
    int4 form's), tensor-core forms above."""
    if m <= tq.FMA_MAX_M:
        return [SkinnyConfig(bn, bk, split_k=s, warps=w) for bn in (2, 4, 8) for bk, s in
                ((2048, 1), (1024, 1), (1024, 2), (1024, 4)) for w in (4, 8)] + [
                SkinnyConfig(bn, bk, split_k=s, warps=w) for bn, bk in ((16, 512), (32, 512), (64, 256))
                for s in (1, 2, 4) for w in (2, 4)]
    return [SkinnyConfig(bn, bk, split_k=s, dot=True) for bn in (16, 32) for bk in (256, 512) for s in (1, 2, 4)]


def sweep(rows_to_sweep: list[int], layouts: list[str], shapes: list[str]) -> list[dict]:
    """Each layout's skinny candidates per shape and T bucket over the same weight copies: the fastest against
    the rule's choice."""
    results = []
    variants = {tq.INT4: "int4 g128", tq.INT8: "int8", tq.FP8: "fp8"}
    for layout in layouts:
        variant = variants[layout]
        for name in shapes:
            n, k = SHAPES[name]
            calls, nbytes = weight_copies(variant, n, k)
            for m in rows_to_sweep:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                default = tq.skinny_config(layout, m, n, k)
                timed = {}
                for config in {default, *sweep_candidates(m)}:
                    restore = tq.QUANT_TABLE.override(torch.cuda.get_device_name(), {(layout, n, k, m): config})
                    try:
                        timed[config] = graph_calls_us([partial(call, x) for call in calls])
                    except (triton.runtime.errors.OutOfResources, ValueError):
                        pass
                    finally:
                        restore()
                best = min(timed, key=timed.get)
                results.append({"layout": layout, "shape": name, "n": n, "k": k, "m": m, "default": str(default),
                                "default_us": round(timed[default], 2), "best": asdict(best),
                                "best_us": round(timed[best], 2), "best_GBps": round(nbytes / timed[best] * 1e-3)})
                print(f"{layout:<5}{name:<13}{m:>3}  rule {default} {timed[default]:.2f} µs   best {best} "
                      f"{timed[best]:.2f} µs ({nbytes / timed[best] * 1e-3:.0f} GB/s)", flush=True)
            del calls
            torch.cuda.empty_cache()
    return results


def write_sweep(results: list[dict], device: str, directory: Path) -> Path:
    """This device's tuning file: the best config of each swept key where it beat the rule by more than 3%,
    merged into the entries the file already had for keys this sweep did not cover (a key swept again loses
    its old entry, even where the rule now wins)."""
    entries = [{"layout": r["layout"], "n": r["n"], "k": r["k"], "m": r["m"], "config": r["best"],
                "us": r["best_us"], "baseline_us": r["default_us"]}
               for r in results if r["best_us"] < 0.97 * r["default_us"]]
    command = "python benchmarks/quant_gpu.py " + " ".join(sys.argv[1:])
    def key(row: dict) -> tuple:  # results and entries carry the table's key fields under the same names
        return tuple(row[field] for field in tq.QUANT_TABLE.key_fields)

    swept = {key(r) for r in results}
    path = write_tuning_file("quant", device, command.strip(), entries, directory, keep=lambda e: key(e) not in swept)
    print(f"\nwrote {path}: {len(entries)} entries where the best beat the rule by more than 3%")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also sweep the skinny configs (several minutes)")
    parser.add_argument("--sweep-rows", default="1,2,16", help="comma-separated T buckets the sweep covers")
    parser.add_argument("--sweep-layouts", default="int4,int8,fp8", help="comma-separated layouts the sweep covers")
    parser.add_argument("--sweep-shapes", default=",".join(SHAPES), help="comma-separated shapes the sweep covers")
    parser.add_argument("--no-table", action="store_true", help="skip the table of variants (sweep only)")
    parser.add_argument("--tuning-dir", default=str(TUNING_DIR), help="where the sweep writes its tuning file")
    args = parser.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth() * 1e9  # bytes read + written per second
    device = torch.cuda.get_device_name()
    print(f"{device}: copy bandwidth {bw * 1e-9:.0f} GB/s (read + write, 1 GiB device-to-device)")
    rows = [] if args.no_table else time_variants(bw)
    step = {} if args.no_table else print_tables(rows, bw)
    swept = sweep([int(m) for m in args.sweep_rows.split(",")], args.sweep_layouts.split(","),
                  args.sweep_shapes.split(",")) if args.sweep else []
    if swept:
        write_sweep(swept, device, Path(args.tuning_dir))
    print(json.dumps({"benchmark": "quant_gpu", "device": device, "torch": torch.__version__,
                      "triton": triton.__version__, "python": platform.python_version(),
                      "copy_GBps": round(bw * 1e-9, 1), "layers": LAYERS, "step_projections_us_m1": step,
                      "rows": rows, "sweep": swept}))


if __name__ == "__main__":
    main()
