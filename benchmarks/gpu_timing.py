"""Timing helpers the GPU benchmark scripts share: a CUDA-graph replay timer and the copy-bandwidth ceiling.

Run from a script in this folder (its folder is on `sys.path`):
`from gpu_timing import copy_bandwidth, graph_calls_us, graph_us`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def graph_us(fn: Callable[[], object], rep_ms: int = 50, warmup_ms: int = 20) -> float:
    """Median µs of one replay of `fn` captured once into a CUDA graph (launch gaps shrink as in the engine)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


def graph_calls_us(fns: list[Callable[[], object]], rep_ms: int = 40, warmup_ms: int = 10) -> float:
    """Per-call µs of `fns` captured back to back into one CUDA graph (the replay's median / len(fns)): how an
    op runs among the model's other launches. They run once first, outside the capture, to compile and
    allocate."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    replay_ms = triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return replay_ms * 1e3 / len(fns)


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read plus written, in GB/s: the memory ceiling, measured now."""
    import triton.testing

    src = torch.randn(256 << 20, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6
