"""Offline generation speed of r1serve's engine, beside transformers' `generate` on the same weights, in one run.

    python benchmarks/offline.py --model tiny --device cpu            # the CI-sized model
    python benchmarks/offline.py --model 1.5b --device cpu --decode-tokens 32 --batch-tokens 16
    python benchmarks/offline.py --model 1.5b --device cuda --workloads decode,batch,nano,uniform --hf decode
    python benchmarks/offline.py --model 1.5b --device cuda --workloads decode,nano --hf '' --structured json

Workloads: `decode` (one stream: 128-token prompt, N generated, ignore_eos; decode tokens/s and, on CUDA, percent of
the weight-bandwidth roofline), `batch` (16 prompts of 128 tokens at once), `nano` (nano-vllm's: 256 requests,
prompt and output lengths uniform in 100-1024, temperature 0.6), `uniform` (1,000 requests of 512 in / 512 out),
`serving` (the offline twin of the serving stage's largest point: 256 requests of 1,024 in / 1,024 out at once,
temperature 0.6 / top-p 0.95, so that the server's cost is a ratio from one call).
The random weights are copied into a transformers `Qwen2ForCausalLM`, so both sides compute the same function;
`--hf nano` runs the nano workload's first 16 requests with 64 output tokens each on both engines (`nano-subset`:
transformers is too slow for the whole workload), left-padded into one `generate` batch.
`--structured json` runs each r1serve workload a second time with a JSON schema on every request (rows
`<workload>+json`, and the slowdown): an object holding an array of at least 1,024 integers, which no output
of the workloads' lengths can complete, so that both runs generate the same tokens, every one of them under a
mask (the prompts open no reasoning). The goals: nano at most 10% slower, batch-1 decode at most 5%. The
slowdown varies from run to run: `--repeats N` runs the free and constrained workloads N times in turn and
reports each pair's slowdown and their median.
Prints a table, then one JSON line with every setting.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from r1serve import LLM, SamplingParams, StructuredOutput
from r1serve.config import R1_DISTILL_QWEN_1_5B_CONFIG
from r1serve.model.loader import weight_bytes

PROFILES: dict[str, float] = {}
SLOWDOWNS: list[dict[str, float]] = []  # per --repeats pair: structured_slowdown of its rows
TINY = {**R1_DISTILL_QWEN_1_5B_CONFIG, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
# --structured json: a schema that no output under 2,047 tokens completes (each integer and its comma: 2 tokens)
NEVER_DONE_SCHEMA = {"type": "object", "required": ["values"], "properties": {
    "values": {"type": "array", "items": {"type": "integer"}, "minItems": 1024}}}
STRUCTURED = {"json": StructuredOutput("json", json.dumps(NEVER_DONE_SCHEMA))}


@dataclass
class Row:
    workload: str
    engine: str
    requests: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    note: str = ""


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def random_prompts(n: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 150000) for _ in range(length)] for length in lengths[:n]]


def nano_workload(n: int = 256, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """nano-vllm's benchmark: n random prompts and output lengths, both uniform in 100-1,024 tokens."""
    rng = random.Random(seed)
    ins = [rng.randint(100, 1024) for _ in range(n)]
    outs = [rng.randint(100, 1024) for _ in range(n)]
    return random_prompts(n, ins, 2), outs


def bench_decode(llm: LLM, tokens: int, device: str, structured: str = "") -> Row:
    prompt = random_prompts(1, [128], 0)[0]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True,
                            structured_output=STRUCTURED.get(structured))
    llm.generate([prompt], replace(params, max_tokens=8))  # warm-up (and the grammar's compile)
    stamps = []
    for _ in llm.stream(prompt, params):
        stamps.append(time.perf_counter())
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return Row("decode" + (f"+{structured}" if structured else ""), "r1serve", 1, tokens, stamps[-1] - stamps[0],
               rate, "after the first token")


def bench_requests(llm: LLM, name: str, prompts: list[list[int]], outputs: list[int], device: str,
                   temperature: float = 0.0, structured: str = "") -> Row:
    params = [SamplingParams(temperature=temperature, top_p=1.0 if temperature == 0 else 0.95, max_tokens=o,
                             ignore_eos=True, seed=i, structured_output=STRUCTURED.get(structured))
              for i, o in enumerate(outputs)]
    name += f"+{structured}" if structured else ""
    # Warm-up on the workload's own first prompts, all at once: Triton compiles a kernel variant the first time it
    # meets new integer specialisations (token counts divisible by 16 or not, prefill tile sizes), which would
    # otherwise land inside the timed run on a machine whose kernel cache is cold.
    llm.generate(prompts[:32], [replace(p, max_tokens=min(p.max_tokens, 8)) for p in params[:32]])
    sync(device)
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    sync(device)
    seconds = time.perf_counter() - start
    total = sum(len(r.outputs[0].token_ids) for r in results)
    return Row(name, "r1serve", len(prompts), total, seconds, total / seconds)


def hf_model(llm: LLM, device: str, dtype: torch.dtype) -> Any:
    """transformers' Qwen2 holding exactly the engine's weights."""
    import transformers

    hf_config = transformers.Qwen2Config(**llm.engine.model_config.to_hf_dict())
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(hf_config).to(dtype)
    missing, unexpected = model.load_state_dict(_unfuse(llm.engine.runner.model, llm), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model.eval()


def _unfuse(ours: Any, llm: LLM) -> dict[str, torch.Tensor]:
    """HF tensor names from the fused qkv_proj / gate_up_proj parameters."""
    mc = llm.engine.model_config
    state: dict[str, torch.Tensor] = {}
    for name, tensor in ours.state_dict().items():
        tensor = tensor.to_dense() if tensor.is_mkldnn else tensor  # a CPU weight reordered for oneDNN
        if ".qkv_proj." in name:
            q, k, v = tensor.split([mc.q_size, mc.kv_size, mc.kv_size], dim=0)
            for part, t in zip("qkv", (q, k, v), strict=True):
                state[name.replace("qkv_proj", f"{part}_proj")] = t
        elif ".gate_up_proj." in name:
            gate, up = tensor.chunk(2, dim=0)
            state[name.replace("gate_up_proj", "gate_proj")] = gate
            state[name.replace("gate_up_proj", "up_proj")] = up
        elif "rotary" not in name:
            state[name] = tensor
    return state


@torch.inference_mode()
def bench_hf(model: Any, name: str, prompts: list[list[int]], tokens: int, device: str,
             temperature: float = 0.0) -> Row:
    """`generate` on the prompts as one batch (left-padded where their lengths differ), `tokens` new tokens each."""
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(batch)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt):] = torch.tensor(prompt, device=device)
        mask[row, width - len(prompt):] = 1
    sampling = dict(do_sample=True, temperature=temperature, top_p=0.95, top_k=0) if temperature else \
        dict(do_sample=False)
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0, **sampling)
    model.generate(batch[:, -8:], attention_mask=mask[:, -8:], max_new_tokens=2, do_sample=False,
                   pad_token_id=0)  # warm-up
    sync(device)
    start = time.perf_counter()
    out = model.generate(batch, attention_mask=mask, **kwargs)
    sync(device)
    seconds = time.perf_counter() - start
    total = (out.shape[1] - batch.shape[1]) * batch.shape[0]
    return Row(name, "transformers", len(prompts), total, seconds, total / seconds, "incl. prefill")


def profile_decode(llm: LLM, batch: int, steps: int = 48) -> dict[str, float]:
    """Where a decode step's time goes at `batch` streams: wall per step, GPU busy per step, top Python costs."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=4 * steps + 16, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in random_prompts(batch, [128] * batch, 5)]
    for _ in range(4):
        engine.step()  # prefill and warm-up

    def steps_wall(n: int) -> float:
        sync("cuda")
        start = time.perf_counter()
        for _ in range(n):
            engine.step()
        sync("cuda")
        return (time.perf_counter() - start) / n

    wall = steps_wall(steps)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        steps_wall(steps)
    gpu_us = sum(e.self_device_time_total for e in prof.key_averages()) / steps
    py = cProfile.Profile()
    py.enable()
    steps_wall(steps)
    py.disable()
    for request_id in ids:
        engine.abort_request(request_id)
    text = io.StringIO()
    pstats.Stats(py, stream=text).sort_stats("tottime").print_stats(14)
    print(f"--- profile, batch {batch}: {wall * 1e3:.2f} ms/step wall, GPU busy {gpu_us / 1e3:.2f} ms/step")
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[-2400:])
    return {f"profile_b{batch}_wall_ms": wall * 1e3, f"profile_b{batch}_gpu_ms": gpu_us / 1e3}


def measure_ceilings(device: str) -> dict[str, float]:
    """The device's own ceilings, measured now: copy bandwidth (bytes read + written) and bf16 matmul rate."""
    if device != "cuda":
        return {}
    import triton.testing

    src = torch.randn(256 << 20, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda d=dst, s=src: d.copy_(s), warmup=50, rep=300, return_mode="median")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = triton.testing.do_bench(lambda x=a, y=b: x @ y, warmup=50, rep=300, return_mode="median")
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": 2 * (256 << 20) * 4 / copy_ms / 1e6, "bf16_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


class Rows(list[Row]):
    """The results so far; each is printed as it comes (a run cut short still shows what it measured)."""

    def append(self, row: Row) -> None:
        print(f"  {row.workload} ({row.engine}): {row.tokens_per_s:.1f} tok/s", flush=True)
        super().append(row)


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads, as they are held (packed where quantized): every parameter and
    buffer but the embedding table (one row is gathered) and the rotary cache."""
    tensors = {id(t): t for name, t in [*model.named_parameters(), *model.named_buffers()]
               if "embed_tokens" not in name and "rotary" not in name}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run(args: argparse.Namespace) -> list[Row]:
    engine_args: dict[str, Any] = dict(load_format="dummy", device=args.device, dtype=args.dtype,
                                       max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                       enforce_eager=args.enforce_eager, quantization=args.quantization,
                                       kv_cache_dtype=args.kv_cache_dtype, tokenizer=args.tokenizer)
    if args.device == "cpu":
        engine_args["kv_cache_space"] = args.kv_cache_space
    model = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    if args.model == "tiny":
        import tempfile
        from pathlib import Path

        folder = Path(tempfile.mkdtemp()) / "tiny"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(TINY))
        model = str(folder)
    start = time.perf_counter()
    llm = LLM(model, **engine_args)
    sync(args.device)
    PROFILES["startup_s"] = time.perf_counter() - start  # weights, KV sizing, graph capture
    PROFILES["decode_weight_bytes"] = decode_weight_bytes(llm.engine.runner.model)
    PROFILES["kv_cache_tokens"] = llm.engine.runner.num_blocks * llm.engine.config.block_size
    PROFILES["weight_gib"] = round(weight_bytes(llm.engine.runner.model) / (1 << 30), 3)  # as held on the device
    print(f"engine startup: {PROFILES['startup_s']:.1f} s")
    rows = Rows()
    for _ in range(args.repeats):  # free, then constrained, in turn: each pair gives one slowdown per workload
        pair = Rows()
        for structured in ["", *filter(None, [args.structured])]:
            run_workloads(llm, args, pair, structured)
        rows.extend(pair)
        SLOWDOWNS.append(structured_slowdown(pair))
    if args.profile:
        for batch in (int(b) for b in args.profile.split(",")):
            PROFILES.update(profile_decode(llm, batch))
    if args.hf:
        dtype = llm.engine.runner.dtype
        hf = hf_model(llm, args.device, dtype)
        if "decode" in args.hf.split(","):
            rows.append(bench_hf(hf, "decode", random_prompts(1, [128], 0), args.hf_decode_tokens, args.device))
        if "batch" in args.hf.split(","):
            rows.append(bench_hf(hf, "batch", random_prompts(16, [128] * 16, 1), args.batch_tokens, args.device))
        if "nano" in args.hf.split(","):  # too slow whole: the first requests, a few tokens each, both engines
            sub = nano_workload()[0][:args.hf_nano_requests]
            rows.append(bench_requests(llm, "nano-subset", sub, [args.hf_nano_tokens] * len(sub), args.device,
                                       temperature=0.6))
            rows.append(bench_hf(hf, "nano-subset", sub, args.hf_nano_tokens, args.device, temperature=0.6))
    return rows


def run_workloads(llm: LLM, args: argparse.Namespace, rows: Rows, structured: str) -> None:
    """The r1serve workloads of `--workloads`, each request under `structured` (a key of STRUCTURED) if set."""
    workloads = args.workloads.split(",")
    if "decode" in workloads:
        rows.append(bench_decode(llm, args.decode_tokens, args.device, structured))
    if "batch" in workloads:
        rows.append(bench_requests(llm, "batch", random_prompts(16, [128] * 16, 1), [args.batch_tokens] * 16,
                                   args.device, structured=structured))
    if "nano" in workloads:
        prompts, outs = nano_workload()
        rows.append(bench_requests(llm, "nano", prompts, outs, args.device, temperature=0.6, structured=structured))
    if "uniform" in workloads:
        rows.append(bench_requests(llm, "uniform", random_prompts(1000, [512] * 1000, 3), [512] * 1000, args.device,
                                   temperature=0.6, structured=structured))
    if "serving" in workloads:
        rows.append(bench_requests(llm, "serving", random_prompts(256, [1024] * 256, 4), [1024] * 256, args.device,
                                   temperature=0.6, structured=structured))


def structured_slowdown(rows: list[Row]) -> dict[str, float]:
    """Per workload run both ways: how much slower (percent of tokens/s) it ran with a schema on every request."""
    free = {r.workload: r.tokens_per_s for r in rows if r.engine == "r1serve" and "+" not in r.workload}
    out = {}
    for r in rows:
        base, _, kind = r.workload.partition("+")
        if kind and base in free:
            out[f"{base}+{kind}_slowdown_pct"] = round(100 * (1 - r.tokens_per_s / free[base]), 1)
    return out


def report(rows: list[Row], args: argparse.Namespace, extra: dict[str, Any]) -> None:
    print(f"{'workload':<9} {'engine':<13} {'requests':>8} {'out tokens':>10} {'seconds':>9} {'tok/s':>10}  note")
    for r in rows:
        print(f"{r.workload:<9} {r.engine:<13} {r.requests:>8} {r.output_tokens:>10} {r.seconds:>9.2f} "
              f"{r.tokens_per_s:>10.1f}  {r.note}")
    ours = {r.workload: r.tokens_per_s for r in rows if r.engine == "r1serve"}
    theirs = {r.workload: r.tokens_per_s for r in rows if r.engine == "transformers"}
    ratios = {w: round(ours[w] / theirs[w], 2) for w in theirs if w in ours}
    if ratios:
        print("r1serve / transformers:", ", ".join(f"{w} {x}x" for w, x in ratios.items()))
    slowdown = {k: statistics.median(run[k] for run in SLOWDOWNS) for k in SLOWDOWNS[0]} if SLOWDOWNS else {}
    if slowdown:
        runs = {k: [run[k] for run in SLOWDOWNS] for k in slowdown}
        print("structured output, slower than free by (median of the runs):", ", ".join(
            f"{k} {v:.1f}%" + (f" (runs {', '.join(f'{x}%' for x in runs[k])})" if len(runs[k]) > 1 else "")
            for k, v in slowdown.items()))
        slowdown |= {f"{k}_runs": v for k, v in runs.items()}
    print(json.dumps({"settings": vars(args), "rows": [asdict(r) for r in rows], "ratios": ratios, **slowdown,
                      **extra}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "1.5b"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--workloads", default="decode,batch")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=32)
    parser.add_argument("--hf", default="decode,batch", help="transformers workloads to run beside ('' for none)")
    parser.add_argument("--hf-decode-tokens", type=int, default=None)
    parser.add_argument("--hf-nano-requests", type=int, default=16, help="--hf nano: the nano workload's first N")
    parser.add_argument("--hf-nano-tokens", type=int, default=64, help="--hf nano: output tokens per request")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--kv-cache-space", type=float, default=2.0)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--quantization", default=None, help="as `r1serve serve --quantization` (dummy weights)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="as `r1serve serve --kv-cache-dtype`")
    parser.add_argument("--profile", default="", help="decode batch sizes to profile, e.g. 1,64 (CUDA)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the byte-level fallback; "
                        "--structured wants the real one, whose vocabulary xgrammar's masks are computed over)")
    parser.add_argument("--structured", default="", choices=["", *STRUCTURED],
                        help="run the workloads again with this constraint on every request (json: a schema)")
    parser.add_argument("--repeats", type=int, default=1, help="--structured: run the free and constrained "
                        "workloads this many times in turn; the slowdown is the median of the pairs")
    args = parser.parse_args()
    args.hf_decode_tokens = args.hf_decode_tokens or args.decode_tokens
    torch.set_num_threads(torch.get_num_threads())
    start = time.perf_counter()
    ceilings = measure_ceilings(args.device)
    rows = run(args)
    extra = {"wall_s": round(time.perf_counter() - start, 1), "torch": torch.__version__,
             "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
             "date": time.strftime("%Y-%m-%d"), **ceilings, **PROFILES}
    decode = next((r for r in rows if r.workload == "decode" and r.engine == "r1serve"), None)
    if ceilings and decode is not None and args.model == "1.5b":
        from r1serve.config import ModelConfig

        step_bytes = PROFILES["decode_weight_bytes"] if args.quantization else \
            ModelConfig.from_hf_dict(R1_DISTILL_QWEN_1_5B_CONFIG).decode_bytes_per_step(2)
        roofline = ceilings["copy_GBps"] * 1e9 / step_bytes
        extra["decode_roofline_tok_s"] = roofline
        extra["decode_pct_of_roofline"] = 100 * decode.tokens_per_s / roofline
        print(f"ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 matmul {ceilings['bf16_TFLOPs']:.0f} TFLOP/s; "
              f"decode roofline {roofline:.0f} tok/s ({step_bytes / 1e9:.2f} GB/step): "
              f"r1serve at {extra['decode_pct_of_roofline']:.0f}%")
    report(rows, args, extra)


if __name__ == "__main__":
    main()
