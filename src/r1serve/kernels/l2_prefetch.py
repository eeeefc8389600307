"""Pull the first bytes of a weight into the GPU's L2 cache while a decode step's chain moves few bytes.

Why: at batch 1 a decoder layer's attention (the decode kernel, its merge, o_proj) reads almost nothing from
memory for ~10 µs, and the gate/up product right after it then streams 55 MB at the memory's rate. Weights do
not depend on the step, so part of that stream can be read during the quiet stretch: launched after the qkv
product, `prefetch_l2` waits for it (programmatic dependent launch, so it does not compete with the product's
own weight reads) and asks L2 for the weight's first `nbytes`, without waiting for them. The product then finds
those lines in L2, provided it reads them first: the skinny kernel's interleaved row tiles read its weight front
to back. `prefetch.global.L2::evict_last` keeps the lines ahead of the streaming reads that follow.
Triton is imported lazily: the module imports without it.
"""

from __future__ import annotations

import torch

from r1serve.kernels import triton_ops

try:  # Triton is absent on CPU-only machines: nothing is prefetched there
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU machines
    triton = None
    tl = None

__all__ = ["EVICT_LAST", "LINE_BYTES", "prefetch_l2"]

LINE_BYTES = 128  # one prefetch per L2 line
_LINES_PER_ITERATION = 1024  # per program and loop iteration: 8 prefetches per thread of 4 warps
EVICT_LAST = True  # the lines' eviction priority (False: normal, kept to measure the difference)
# Bulk: each thread hands a CHUNK_BYTES range to the copy engine (`cp.async.bulk.prefetch.L2`, Hopper), which
# fetches it in the background; False: one `prefetch.global.L2` per line (measured: the kernel then lasts as
# long as the transfer, ~2.3 TB/s, and the chain waits for it).
BULK = True
CHUNK_BYTES = 4096

if triton is not None:
    from r1serve.kernels.triton_ops import _pdl_start

    @triton.jit
    def _prefetch_lines(ptrs, EVICT_LAST: tl.constexpr):
        """Asks L2 for the lines at `ptrs` (any shape); returns at once (nothing is loaded into registers)."""
        if EVICT_LAST:
            tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                      dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                      dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _prefetch_ranges(ptrs, CHUNK: tl.constexpr, EVICT_LAST: tl.constexpr):
        """Hands the CHUNK-byte ranges at `ptrs` (16-byte aligned) to the copy engine for L2; returns at once."""
        size = tl.full(ptrs.shape, CHUNK, tl.int32)
        if EVICT_LAST:
            tl.inline_asm_elementwise(
                "{\n\t.reg .b64 policy;\n\tcreatepolicy.fractional.L2::evict_last.b64 policy, 1.0;"
                "\n\tcp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, policy;\n\tmov.u32 $0, 0;\n\t}",
                "=r,l,r", [ptrs, size], dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                                      [ptrs, size], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _bulk_prefetch_kernel(base_ptr, num_chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                              EVICT_LAST: tl.constexpr, USE_PDL: tl.constexpr):
        """Programs share chunks [0, num_chunks) of CHUNK bytes at base_ptr, one per thread per turn, after the
        previous kernel is done."""
        _pdl_start(USE_PDL)
        base = base_ptr.to(tl.pointer_type(tl.int8))
        for first in range(tl.program_id(0) * BLOCK, num_chunks, tl.num_programs(0) * BLOCK):
            chunks = tl.minimum(first + tl.arange(0, BLOCK), num_chunks - 1)  # past the end: the last again
            _prefetch_ranges(base + chunks.to(tl.int64) * CHUNK, CHUNK, EVICT_LAST)

    @triton.jit
    def _prefetch_kernel(base_ptr, num_lines, LINE: tl.constexpr, BLOCK: tl.constexpr, EVICT_LAST: tl.constexpr,
                         USE_PDL: tl.constexpr):
        """Programs share lines [0, num_lines) of the bytes at base_ptr, BLOCK lines per program in turn, after
        the previous kernel is done."""
        _pdl_start(USE_PDL)
        base = base_ptr.to(tl.pointer_type(tl.int8))
        for first in range(tl.program_id(0) * BLOCK, num_lines, tl.num_programs(0) * BLOCK):
            lines = tl.minimum(first + tl.arange(0, BLOCK), num_lines - 1)  # past the end: the last line again
            _prefetch_lines(base + lines.to(tl.int64) * LINE, EVICT_LAST)


def prefetch_l2(weight: torch.Tensor, nbytes: int) -> None:
    """Asks L2 for the first `nbytes` of `weight` (contiguous, on CUDA) once the previous kernel is done; returns
    without waiting and changes nothing. Does nothing for nbytes ≤ 0."""
    if triton is None or not weight.is_cuda:
        raise RuntimeError("prefetch_l2 needs a CUDA tensor and Triton")
    if not weight.is_contiguous():
        raise ValueError("prefetch_l2: the weight must be contiguous (its first bytes are its first rows)")
    nbytes = min(nbytes, weight.numel() * weight.element_size())
    sms = torch.cuda.get_device_properties(weight.device).multi_processor_count
    if BULK and weight.data_ptr() % 16 == 0:
        chunks = nbytes // CHUNK_BYTES  # whole chunks only: nothing past the weight's end
        if chunks > 0:
            grid = (min(sms, triton.cdiv(chunks, 128)),)
            _bulk_prefetch_kernel[grid](weight, chunks, CHUNK=CHUNK_BYTES, BLOCK=128, EVICT_LAST=EVICT_LAST,
                                        USE_PDL=triton_ops.use_pdl(), num_warps=4, **triton_ops.pdl_launch())
        return
    lines = nbytes // LINE_BYTES
    if lines <= 0:
        return
    grid = (min(sms, triton.cdiv(lines, _LINES_PER_ITERATION)),)
    _prefetch_kernel[grid](weight, lines, LINE=LINE_BYTES, BLOCK=_LINES_PER_ITERATION, EVICT_LAST=EVICT_LAST,
                           USE_PDL=triton_ops.use_pdl(), num_warps=4, **triton_ops.pdl_launch())
