"""Times each Triton kernel against its plain-torch twin and against the bandwidth roofline, on one GPU.

Why: the decode step of the 1.5B model must stay bound by its 3.09 GB of weight reads, so every kernel of a
layer has to come close to the bytes it must move. For each case this prints the kernel's median time
per call replayed in a CUDA graph of 28 calls, as the model runs them (decode attention: each call on its
own cache, so that the L2 cache does not hold the context; the ops: the same inputs), its eager time
(`triton.testing.do_bench` median, L2 cleared before each run; at small sizes that is launch overhead), the
twin's eager time, and the fewest bytes the op must move over the copy bandwidth measured in the same run.
Sweeps of the decode split count and the prefill tile follow. The sampling section times the Triton sampler
(`kernels/triton_sampling.sample`) against the torch path (`Sampler.__call__` with a `SamplingBatch`) on flat
(randn, random weights) and peaked (randn * 30) logits of the real vocabulary, with the number of passes over
the logits each needed. It ends with one JSON line.
Run on the device: `PYTHONPATH=src python3 benchmarks/kernels_gpu.py` (`--quick` for fewer cases; `--only
sampling`, or a comma-separated list of sections, for some of them).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
import triton
from gpu_timing import graph_calls_us
from triton.testing import do_bench

from r1serve.engine.sampler import Sampler, SamplingBatch
from r1serve.engine.scheduler import sampling_record
from r1serve.engine.sequence import Request, Sequence
from r1serve.kernels import reference, triton_ops
from r1serve.kernels import triton_attention as ta
from r1serve.kernels import triton_sampling as tsm
from r1serve.kernels.attention import AttentionMetadata, TorchAttention, build_metadata
from r1serve.sampling_params import SamplingParams

DEVICE, DTYPE = "cuda", torch.bfloat16
HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTER, BLOCK, VOCAB = 12, 2, 128, 1536, 8960, 16, 151936
SECTIONS = ("decode", "prefill", "ops", "sampling")


@dataclass
class Row:
    kernel: str
    shape: str
    triton_us: float
    twin_us: float
    bytes: int
    roofline_us: float
    flops: float = 0.0
    note: str = ""

    @property
    def pct_roofline(self) -> float:
        return 100.0 * self.roofline_us / self.triton_us


def median_us(fn: Callable[[], object]) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read and written: bytes per second."""
    src = torch.randn(1 << 28, device=DEVICE)
    dst = torch.empty_like(src)
    seconds = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median") * 1e-3
    return 2 * src.numel() * src.element_size() / seconds


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    seconds = do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median") * 1e-3
    return 2 * 8192 ** 3 / seconds


def paged_batch(query_lens: list[int], seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     AttentionMetadata]:
    needed = sum(-(-s // BLOCK) for s in seq_lens)
    order = torch.randperm(needed).tolist()
    tables, used = [], 0
    for s in seq_lens:
        n = -(-s // BLOCK)
        tables.append(order[used:used + n])
        used += n
    meta = build_metadata(query_lens, seq_lens, tables, BLOCK, device=DEVICE)
    k_cache = torch.randn(needed, BLOCK, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    query = torch.randn(sum(query_lens), HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    return query, k_cache, v_cache, meta


def kv_bytes(seq_lens: list[int]) -> int:
    return sum(seq_lens) * KV_HEADS * HEAD_DIM * 2 * 2  # K and V, bf16


def decode_graph_us(batch: int, length: int, layers: int = 28, **kwargs: object) -> float:
    """Decode attention as the model runs it: one graph over `layers` calls, each on its own cache."""
    calls = []
    for _ in range(layers):
        q, k, v, meta = paged_batch([1] * batch, [length] * batch)
        calls.append(partial(ta.paged_decode_attention, q, k, v, meta.block_tables, meta.seq_lens,
                             HEAD_DIM ** -0.5, length, **kwargs))
    us = graph_calls_us(calls)
    del calls
    torch.cuda.empty_cache()
    return us


def decode_rows(bw: float, cases: list[tuple[int, int]]) -> list[Row]:
    rows, backend, twin = [], ta.TritonAttention(), TorchAttention()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, length in cases:
        query, k_cache, v_cache, meta = paged_batch([1] * batch, [length] * batch)
        nbytes = kv_bytes(meta.seq_lens_cpu) + 2 * query.numel() * 2
        args = (query, k_cache, v_cache, meta, HEAD_DIM ** -0.5)
        eager, t_twin = median_us(partial(backend.attend, *args)), median_us(partial(twin.attend, *args))
        default = decode_graph_us(batch, length)
        splits = ta.decode_num_splits(batch, KV_HEADS, length, sms)
        shape = f"B={batch} L={length}"
        rows.append(Row("decode_attention", shape, default, t_twin, nbytes, nbytes / bw * 1e6,
                        note=f"graph of 28 layers; splits={splits}; eager call {eager:.1f} us"))
    return rows


def split_sweep(bw: float, cases: list[tuple[int, int]], splits: list[int]) -> list[Row]:
    rows = []
    for batch, length in cases:
        nbytes = kv_bytes([length] * batch)
        for s in splits:
            if s > -(-length // ta.DECODE_TILES.block_n):
                continue
            t = decode_graph_us(batch, length, num_splits=s)
            rows.append(Row("decode_split_sweep", f"B={batch} L={length} splits={s}", t, float("nan"), nbytes,
                            nbytes / bw * 1e6, note="graph"))
    return rows


def sdpa_us(query_len: int) -> float:
    """PyTorch's own causal SDPA over contiguous q/k/v of one prompt (no paging), GQA, for comparison."""
    q = torch.randn(1, HEADS, query_len, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    k = torch.randn(1, KV_HEADS, query_len, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    v = torch.randn_like(k)
    fn = partial(torch.nn.functional.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True)
    return median_us(fn)


def prefill_rows(bw: float, mm: float, cases: dict[str, tuple[list[int], list[int]]],
                 with_twin: bool = True) -> list[Row]:
    rows, backend, twin = [], ta.TritonAttention(), TorchAttention()
    for name, (query_lens, seq_lens) in cases.items():
        query, k_cache, v_cache, meta = paged_batch(query_lens, seq_lens)
        # causal score and value products of the new tokens over their visible keys
        pairs = zip(query_lens, seq_lens, strict=True)
        flops = sum(4.0 * HEADS * HEAD_DIM * q * (s - q + (q + 1) / 2) for q, s in pairs)
        nbytes = kv_bytes(seq_lens) + 2 * query.numel() * 2
        args = (query, k_cache, v_cache, meta, HEAD_DIM ** -0.5)
        t = median_us(partial(ta.paged_prefill_attention, query, k_cache, v_cache, meta.block_tables,
                              meta.seq_lens, meta.query_start_loc, HEAD_DIM ** -0.5, meta.max_query_len))
        t_twin = median_us(partial(twin.attend, *args)) if with_twin else float("nan")
        floor = max(nbytes / bw, flops / mm) * 1e6
        note = f"Triton kernel {flops / t * 1e-6:.0f} TFLOP/s"
        if with_twin and ta.sdpa_fits(meta):
            note += f"; TritonAttention (SDPA path): {median_us(partial(backend.attend, *args)):.1f} us"
        if with_twin and len(query_lens) == 1 and query_lens == seq_lens:
            note += f"; bare SDPA causal, contiguous: {sdpa_us(query_lens[0]):.1f} us"
        rows.append(Row("prefill_attention", name, t, t_twin, nbytes, floor, flops, note=note))
    return rows


def prefill_sweep(bw: float, mm: float, cases: dict[str, tuple[list[int], list[int]]]) -> list[Row]:
    """The prefill kernel's key-tile width and pipeline depth, tried on a few cases."""
    rows, default = [], (ta.PREFILL_BLOCK_N, ta.PREFILL_NUM_STAGES)
    try:
        for block_n, stages in [(64, 2), (64, 3), (128, 2), (128, 3)]:
            ta.PREFILL_BLOCK_N, ta.PREFILL_NUM_STAGES = block_n, stages
            try:
                swept = prefill_rows(bw, mm, cases, with_twin=False)
            except triton.runtime.errors.OutOfResources as e:  # too much shared memory for this config
                print(f"prefill N={block_n} stages={stages}: {e}")
                continue
            for row in swept:
                row.kernel, row.shape = "prefill_sweep", f"{row.shape} N={block_n} st={stages}"
                rows.append(row)
    finally:
        ta.PREFILL_BLOCK_N, ta.PREFILL_NUM_STAGES = default
    return rows


def store_rows(bw: float, token_counts: list[int]) -> list[Row]:
    rows, twin = [], TorchAttention()
    for tokens in token_counts:
        query, k_cache, v_cache, meta = paged_batch([tokens], [tokens])
        key = torch.randn(tokens, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        value = torch.randn_like(key)
        nbytes = 2 * 2 * key.numel() * 2  # read + write, K and V
        args = (key, value, k_cache, v_cache, meta.slot_mapping)
        mine = partial(ta.store_kv, *args)
        t, t_twin = graph_calls_us([mine] * 28), median_us(partial(twin.store_kv, *args))
        rows.append(Row("store_kv", f"T={tokens}", t, t_twin, nbytes, nbytes / bw * 1e6,
                        note=f"eager call {median_us(mine):.1f} us"))
    return rows


def op_rows(bw: float, token_counts: list[int]) -> list[Row]:
    rows = []
    cache = reference.rotary_cos_sin_cache(HEAD_DIM, 32768, 10000.0).to(DEVICE)
    weight = torch.rand(HIDDEN, device=DEVICE, dtype=DTYPE)
    for t in token_counts:
        x = torch.randn(t, HIDDEN, device=DEVICE, dtype=DTYPE)
        res = torch.randn_like(x)
        gate_up = torch.randn(t, 2 * INTER, device=DEVICE, dtype=DTYPE)
        qkv = torch.randn(t, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=DEVICE, dtype=DTYPE)
        q = qkv[:, :HEADS * HEAD_DIM].view(t, HEADS, HEAD_DIM)
        k = qkv[:, HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM].view(t, KV_HEADS, HEAD_DIM)
        pos = torch.randint(0, 32768, (t,), device=DEVICE)
        qk_bytes = 2 * (HEADS + KV_HEADS) * HEAD_DIM * 2 * t + t * HEAD_DIM * 4
        cases = [  # name, op name in both modules, arguments, bytes moved
            ("rms_norm", "rms_norm", (x, weight, 1e-6), 2 * x.numel() * 2),
            ("fused_add_rms_norm", "fused_add_rms_norm", (x, res, weight, 1e-6), 4 * x.numel() * 2),
            ("silu_and_mul", "silu_and_mul", (gate_up,), 3 * t * INTER * 2),
            ("apply_rotary", "apply_rotary", (q, k, pos, cache), qk_bytes),
        ]
        for name, op, op_args, nbytes in cases:
            mine, twin = partial(getattr(triton_ops, op), *op_args), partial(getattr(reference, op), *op_args)
            rows.append(Row(name, f"T={t}", graph_calls_us([mine] * 28), median_us(twin), nbytes, nbytes / bw * 1e6,
                            note=f"eager call {median_us(mine):.1f} us"))
        inplace = partial(triton_ops.apply_rotary, q, k, pos, cache, inplace=True)
        rows.append(Row("apply_rotary_inplace", f"T={t}", graph_calls_us([inplace] * 28), rows[-1].twin_us,
                        qk_bytes, qk_bytes / bw * 1e6, note=f"eager call {median_us(inplace):.1f} us"))
    return rows


def sampling_batch(batch: int, params: SamplingParams) -> SamplingBatch:
    """The torch sampler's per-step input for `batch` unseeded sequences with these parameters."""
    seqs = []
    for i in range(batch):
        request = Request(f"r{i}", None, [1, 2, 3], params)
        seq = Sequence(request, 0, [1, 2, 3], 3)
        request.seqs.append(seq)
        seqs.append(sampling_record(seq))
    return SamplingBatch.build(seqs, VOCAB, torch.device(DEVICE))


def sampling_rows(bw: float, batches: list[int]) -> list[Row]:
    """`sample` (graph of 8 calls; eager; one program per row) against the torch path at temperature 0.6,
    top_p 0.95. Bytes: one read of the float32 logits (one pass); the kernel makes `passes` of them."""
    rows, sampler = [], Sampler(eos_token_id=None)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch in batches:
        sb = sampling_batch(batch, SamplingParams(temperature=0.6, top_p=0.95))
        zeros = torch.zeros(batch, device=DEVICE)
        top_k, min_p, seeds = zeros.long(), zeros, torch.randint(0, 2**62, (batch,), device=DEVICE)
        for kind, spread in (("flat", 1.0), ("peaked", 30.0)):
            logits = torch.randn(batch, VOCAB, device=DEVICE) * spread
            passes = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
            tsm.sample(logits, sb.temperature, sb.top_p, top_k, min_p, seeds, passes=passes)
            mine = partial(tsm.sample, logits, sb.temperature, sb.top_p, top_k, min_p, seeds)
            unsplit = partial(tsm.sample, logits, sb.temperature, sb.top_p, top_k, min_p, seeds, max_split=1)
            nbytes = logits.numel() * logits.element_size()
            split, _ = tsm.programs_per_row(batch, VOCAB, sms)
            note = (f"eager {median_us(mine):.1f} us; {split} programs/row; passes mean "
                    f"{passes.float().mean():.2f} max {int(passes.max())}")
            if split > 1:
                note += f"; 1 program/row: graph {graph_calls_us([unsplit] * 8):.1f} us"
            rows.append(Row("sample", f"B={batch} V={VOCAB} {kind} fp32", graph_calls_us([mine] * 8),
                            median_us(partial(sampler, logits, sb)), nbytes, nbytes / bw * 1e6, note=note))
            bf16 = logits.to(torch.bfloat16)
            rows.append(Row("sample", f"B={batch} V={VOCAB} {kind} bf16", graph_calls_us(
                [partial(tsm.sample, bf16, sb.temperature, sb.top_p, top_k, min_p, seeds)] * 8), float("nan"),
                nbytes // 2, nbytes / 2 / bw * 1e6, note="twin: the torch path takes float32 logits"))
    return rows


def sampling_sweep(bw: float) -> list[Row]:
    """`sample` with other tile shapes (graph of 8 calls, float32 logits, temperature 0.6, top_p 0.95): LANES
    lanes, one per thread (LANES // 32 warps), so groups of BLOCK // LANES tokens."""
    rows, default = [], (tsm.LANES, tsm.NUM_WARPS)
    try:
        for lanes in (128, 256):
            tsm.LANES, tsm.NUM_WARPS = lanes, lanes // 32
            for batch in (1, 256):
                zeros = torch.zeros(batch, device=DEVICE)
                seeds = torch.randint(0, 2**62, (batch,), device=DEVICE)
                for kind, spread in (("flat", 1.0), ("peaked", 30.0)):
                    logits = torch.randn(batch, VOCAB, device=DEVICE) * spread
                    fn = partial(tsm.sample, logits, zeros + 0.6, zeros + 0.95, zeros.long(), zeros, seeds)
                    nbytes = logits.numel() * logits.element_size()
                    rows.append(Row("sample_sweep", f"B={batch} {kind} fp32 lanes={lanes}", graph_calls_us([fn] * 8),
                                    float("nan"), nbytes, nbytes / bw * 1e6,
                                    note=f"{lanes // 32} warps, groups of {tsm.BLOCK // lanes} tokens"))
    finally:
        tsm.LANES, tsm.NUM_WARPS = default
    return rows


def print_table(rows: list[Row]) -> None:
    head = f"{'kernel':<22}{'shape':<34}{'triton us':>10}{'twin us':>10}{'x twin':>8}"
    head += f"{'roof us':>9}{'%roof':>7}"
    print(head + "  note")
    for r in rows:
        print(f"{r.kernel:<22}{r.shape:<34}{r.triton_us:>10.2f}{r.twin_us:>10.2f}"
              f"{r.twin_us / r.triton_us:>8.1f}{r.roofline_us:>9.2f}{r.pct_roofline:>7.1f}  {r.note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    args = parser.parse_args()
    sections = set(args.only.split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"--only: unknown section(s) {sorted(sections - set(SECTIONS))}")
    torch.manual_seed(0)
    bw, mm = copy_bandwidth(), matmul_rate()
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}, {props.multi_processor_count} SMs; copy {bw / 1e12:.2f} TB/s (read+write), "
          f"bf16 matmul {mm / 1e12:.0f} TFLOP/s")
    decode_cases = [(1, 1024), (1, 4096), (1, 16384), (8, 4096), (64, 1024), (64, 4096), (256, 1024)]
    prefill_cases = {
        "1 prompt x 2048": ([2048], [2048]),
        "1 prompt x 8192": ([8192], [8192]),
        "8 prompts x 1024": ([1024] * 8, [1024] * 8),
        "512 new on 4096 cached": ([512], [4608]),
        "2048 chunk + 63 decodes@1k": ([2048] + [1] * 63, [4096] + [1024] * 63),
    }
    sample_batches = [1, 32, 256]
    if args.quick:
        decode_cases, prefill_cases = decode_cases[:3], dict(list(prefill_cases.items())[:2])
        sample_batches = [1, 256]
    rows = []
    if "decode" in sections:
        rows += decode_rows(bw, decode_cases)
        if not args.quick:
            rows += split_sweep(bw, [(1, 1024), (1, 4096), (1, 16384), (8, 4096), (32, 2048)],
                                [1, 2, 4, 8, 16, 32, 64])
    if "prefill" in sections:
        rows += prefill_rows(bw, mm, prefill_cases)
        if not args.quick:
            sweep_names = ["1 prompt x 8192", "512 new on 4096 cached", "2048 chunk + 63 decodes@1k"]
            rows += prefill_sweep(bw, mm, {n: prefill_cases[n] for n in sweep_names})
    if "ops" in sections:
        rows += store_rows(bw, [1, 64, 8192])
        rows += op_rows(bw, [1, 64, 8192])
    if "sampling" in sections:
        rows += sampling_rows(bw, sample_batches)
        if not args.quick:
            rows += sampling_sweep(bw)
    print_table(rows)
    print(json.dumps({
        "benchmark": "kernels_gpu", "device": props.name, "copy_bandwidth_Bps": bw, "matmul_flops": mm,
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "command": " ".join(sys.argv), "dtype": "bfloat16", "block_size": BLOCK,
        "model": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "hidden": HIDDEN,
                  "inter": INTER},
        "rows": [dict(asdict(r), pct_roofline=r.pct_roofline) for r in rows],
    }))


if __name__ == "__main__":
    main()
