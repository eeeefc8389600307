"""The CPU decode step's products alone: how fast each way of computing `x @ W.T` in bf16 reads the 1.5B's weights.

    python benchmarks/cpu_linear.py                                   # every shape and variant, rows 1, 2, 4, 8
    python benchmarks/cpu_linear.py --shapes gate_up,lm_head --rows 1 --variants linear,split2
    python benchmarks/cpu_linear.py --env OMP_PROC_BIND=close --env GOMP_CPU_AFFINITY=0,1 --variants linear
    python benchmarks/cpu_linear.py --step 1.5b --rows 1,4 --repeats 9       # whole decode steps, plain / packed

At 1.5B a CPU decode step is the read of ~3.5 GB of bf16 weights, so each product's speed is its weight bytes
over its time (GB/s), printed beside a copy's (read + write) and a max's (read only) of a 256 MB buffer in the
same run: the ceilings. Each shape cycles through enough copies of its weight to span 256 MB, so no figure is
the L3 cache's (the real model's 28 layers never fit it). The variants keep the weights in bf16 and give the same
product: `F.linear` (what the model runs), `torch.mm` on a transposed copy prepared once, `torch.mm(..., out=)`,
the weight-major product `W @ x.T`, oneDNN's prepacked linear, the rows of W split over two threads of our own
(each with one OpenMP thread), and with `--compile` inductor's code for one product. Samples are interleaved
(variant after variant, repeat after repeat) and the median is printed: the machine is shared. `--env K=V` runs
the script again in a child process per setting, interleaved with one without, for thread-binding variables
that must be set before OpenMP starts. `--step MODEL` times whole decode steps instead (forward, logits, argmax)
of the model on plain weights and on weights reordered as the CPU engine does (`kernels.onednn`), interleaved.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_serving import TINY  # noqa: E402  (the CPU-speed table's tiny model)

from r1serve.config import R1_DISTILL_QWEN_1_5B_CONFIG, ModelConfig  # noqa: E402
from r1serve.kernels.attention import build_metadata  # noqa: E402
from r1serve.kernels.onednn import prepack_linears  # noqa: E402
from r1serve.model.loader import init_dummy_weights, skip_random_init  # noqa: E402
from r1serve.model.qwen2 import Qwen2ForCausalLM  # noqa: E402

SHAPES = {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960),
          "lm_head": (151936, 1536)}  # [out, in] of the 1.5B's projections
SPAN_BYTES = 256 << 20  # each shape's weight copies span this much memory (L3 here: 32 MB)
Product = Callable[[torch.Tensor], torch.Tensor]


class RowSplit:
    """x @ W.T with W's rows split in two: one half on a worker thread of ours, one on the caller's, each with
    one OpenMP thread (the calls release the GIL); the halves are concatenated."""

    def __init__(self, weight: torch.Tensor) -> None:
        half = weight.shape[0] // 2
        self.top, self.bottom = weight[:half], weight[half:]
        self.start, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.x: torch.Tensor | None = None
        self.out: torch.Tensor | None = None
        threading.Thread(target=self._work, daemon=True).start()

    def _work(self) -> None:
        torch.set_num_threads(1)  # OpenMP's thread count is per calling thread
        while True:
            self.start.acquire()
            self.out = F.linear(self.x, self.bottom)
            self.done.release()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.x = x
        self.start.release()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        top = F.linear(x, self.top)
        torch.set_num_threads(threads)
        self.done.acquire()
        return torch.cat([top, self.out], dim=-1)


def prepacked(weight: torch.Tensor) -> Product | None:
    """oneDNN's linear with the weight reordered once into its blocked layout (for any number of rows), or None
    where this build lacks it."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (AttributeError, RuntimeError):
        return None


def compiled(weight: torch.Tensor, rows: int) -> Product:
    """Inductor's code for `F.linear` with the weight a constant (freezing), max-autotune's CPU GEMM template."""
    import torch._inductor.config as inductor

    inductor.freezing = True
    module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    module.weight.data = weight
    fn = torch.compile(module.eval(), mode="max-autotune-no-cudagraphs")
    with torch.no_grad():
        fn(torch.randn(rows, weight.shape[1], dtype=weight.dtype))
    return fn


def build_variant(name: str, weight: torch.Tensor, rows: int) -> Product | None:
    """The product `x @ weight.T` [rows, out] computed the named way (preparation done here, once)."""
    if name == "linear":
        return lambda x: F.linear(x, weight)
    if name == "mm_t":
        w_t = weight.t().contiguous()  # [in, out]
        return lambda x: torch.mm(x, w_t)
    if name == "mm_out":
        out = torch.empty(rows, weight.shape[0], dtype=weight.dtype)
        return lambda x: torch.mm(x, weight.t(), out=out)
    if name == "w_x":
        return (lambda x: torch.mv(weight, x[0])[None]) if rows == 1 else (lambda x: torch.mm(weight, x.t()).t())
    if name == "prepacked":
        return prepacked(weight)
    if name == "split2":
        return RowSplit(weight)
    if name == "compiled":
        return compiled(weight, rows)
    raise ValueError(f"--variants: unknown variant {name!r}")


def ceilings(repeats: int) -> dict[str, float]:
    """GB/s of a copy (bytes read + written) and of a max (bytes read; over int32 words, which vectorise) of a
    256 MB buffer."""
    src = torch.ones(SPAN_BYTES // 2, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy = [_timed(lambda: dst.copy_(src)) for _ in range(repeats)]
    read = [_timed(lambda: src.view(torch.int32).max()) for _ in range(repeats)]
    return {"copy": 2 * SPAN_BYTES / statistics.median(copy) / 1e9,
            "read": SPAN_BYTES / statistics.median(read) / 1e9}


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_shape(shape: str, rows: int, variants: list[str], repeats: int) -> dict[str, float]:
    """GB/s of weight bytes per variant at one shape and row count: the median of `repeats` interleaved passes,
    each over every copy of the weight (see SPAN_BYTES). Every variant's result is checked against F.linear's."""
    out_features, in_features = SHAPES[shape]
    nbytes = out_features * in_features * 2
    weights = [torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
               for _ in range(max(1, SPAN_BYTES // nbytes))]
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    products = {v: [build_variant(v, w, rows) for w in weights] for v in variants}
    products = {v: p for v, p in products.items() if p[0] is not None}
    for name, fns in products.items():
        expected = F.linear(x, weights[0]).float()
        if not torch.allclose(fns[0](x).float(), expected, atol=1e-2, rtol=1e-2):
            raise AssertionError(f"{name} differs from F.linear at {shape}, {rows} rows")
    times: dict[str, list[float]] = {v: [] for v in products}
    for _ in range(repeats + 1):  # the first pass warms up
        for name, fns in products.items():
            times[name].append(_timed(lambda fns=fns: [fn(x) for fn in fns]) / len(fns))
    return {v: nbytes / statistics.median(t[1:]) / 1e9 for v, t in times.items()}


def run_here(args: argparse.Namespace) -> dict[str, object]:
    """Every shape × rows × variant in this process; the table's cells and the ceilings."""
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    results: dict[str, dict[str, float]] = {}
    for shape in args.shapes.split(","):
        for rows in (int(r) for r in args.rows.split(",")):
            results[f"{shape} x{rows}"] = measure_shape(shape, rows, variants, args.repeats)
    return {"ceilings": ceilings(args.repeats), "results": results}


def run_with_envs(args: argparse.Namespace) -> dict[str, object]:
    """The script again in child processes, one without and one per `--env` setting, in turn for `--rounds`
    rounds; each cell is the median over rounds of the children's medians."""
    settings = [""] + args.env
    argv = [sys.executable, __file__, "--json-only", "--shapes", args.shapes, "--rows", args.rows,
            "--variants", args.variants, "--repeats", str(args.repeats), "--threads", str(args.threads)]
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for setting in settings:
            env = dict(os.environ)
            for pair in filter(None, setting.split(";")):
                key, _, value = pair.partition("=")
                env[key] = value.replace(",", " ") if key == "GOMP_CPU_AFFINITY" else value
            line = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            runs[setting].append(json.loads(line))
    merged: dict[str, dict[str, float]] = {}
    for setting, outs in runs.items():
        for cell in outs[0]["results"]:
            for variant in outs[0]["results"][cell]:
                label = f"{variant} {setting}".strip()
                merged.setdefault(cell, {})[label] = statistics.median(o["results"][cell][variant] for o in outs)
    ceiling = {k: statistics.median(o["ceilings"][k] for o in runs[""]) for k in runs[""][0]["ceilings"]}
    return {"ceilings": ceiling, "results": merged}


def build_model(name: str, packed: bool) -> Qwen2ForCausalLM:
    """The tiny or 1.5B model in bf16 with seeded dummy weights (as `--load-format dummy`), its projections
    reordered for oneDNN if `packed` (as the CPU engine does at load)."""
    config = ModelConfig.from_hf_dict({**R1_DISTILL_QWEN_1_5B_CONFIG, **(TINY if name == "tiny" else {})})
    with torch.device("meta"), skip_random_init():
        model = Qwen2ForCausalLM(config)
    model.to(torch.bfloat16).to_empty(device="cpu")
    init_dummy_weights(model, seed=0)
    if packed:
        prepack_linears(model)
    return model.eval()


def decode_inputs(config: ModelConfig, batch: int, context: int) -> tuple:
    """(input_ids, positions, metadata, KV caches) of a decode step: `batch` sequences of `context` tokens."""
    blocks = -(-context // 16)
    caches = [tuple(torch.zeros(batch * blocks, 16, config.num_key_value_heads, config.head_dim,
                                dtype=torch.bfloat16) for _ in range(2)) for _ in range(config.num_hidden_layers)]
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(batch)]
    meta = build_metadata([1] * batch, [context] * batch, tables, 16)
    return torch.zeros(batch, dtype=torch.int64), torch.full((batch,), context - 1), meta, caches


def decode_step(model: Qwen2ForCausalLM, inputs: tuple) -> torch.Tensor:
    """One decode step's forward, logits and greedy ids."""
    return model.compute_logits(model(*inputs)).argmax(dim=-1)


def decode_step_ms(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """ms per decode step (forward of one token per sequence at a `--context`-token context, logits, argmax) of
    the model on plain and on reordered weights, interleaved; the median of `--repeats` per batch size."""
    torch.set_num_threads(args.threads)
    models = {"plain": build_model(args.step, False), "prepacked": build_model(args.step, True)}
    results: dict[str, dict[str, float]] = {}
    for batch in (int(r) for r in args.rows.split(",")):
        inputs = decode_inputs(models["plain"].config, batch, args.context)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.repeats + 1):
            for name, model in models.items():
                times[name].append(_timed(lambda m=model, i=inputs: decode_step(m, i)))
        results[f"{args.step} batch {batch}"] = {n: 1e3 * statistics.median(t[1:]) for n, t in times.items()}
    return results


def print_table(report: dict[str, object]) -> None:
    ceiling = report["ceilings"]
    print(f"ceilings: copy {ceiling['copy']:.1f} GB/s (read + write), max {ceiling['read']:.1f} GB/s (read)")
    results: dict[str, dict[str, float]] = report["results"]
    columns = list(next(iter(results.values())))
    print("| shape x rows | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for cell, row in results.items():
        base = row[columns[0]]
        cells = [f"{row[c]:.1f}" + ("" if c == columns[0] else f" ({row[c] / base:.2f}x)") for c in columns]
        print(f"| {cell} | " + " | ".join(cells) + " |")


def print_steps(results: dict[str, dict[str, float]]) -> None:
    print("| model, batch | plain weights ms | prepacked ms | plain / prepacked |")
    print("| --- | ---: | ---: | ---: |")
    for cell, row in results.items():
        print(f"| {cell} | {row['plain']:.2f} | {row['prepacked']:.2f} | {row['plain'] / row['prepacked']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--variants", default="linear,mm_t,mm_out,w_x,prepacked,split2")
    parser.add_argument("--compile", action="store_true", help="add the inductor variant (slow to start)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--env", action="append", default=[],
                        help="K=V[;K2=V2]: a child run with these set (GOMP_CPU_AFFINITY commas become spaces)")
    parser.add_argument("--rounds", type=int, default=3, help="child runs per --env setting")
    parser.add_argument("--step", choices=["tiny", "1.5b"], default=None,
                        help="instead: a whole decode step of this model, plain against prepacked weights")
    parser.add_argument("--context", type=int, default=256, help="--step: each sequence's context")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile:
        args.variants += ",compiled"
    with torch.inference_mode():
        if args.step:
            report = {"step_ms": decode_step_ms(args)}
            print_steps(report["step_ms"])
        else:
            report = run_with_envs(args) if args.env else run_here(args)
            if not args.json_only:
                print_table(report)
    print(json.dumps({"settings": vars(args), "torch": torch.__version__, **report}))


if __name__ == "__main__":
    main()
