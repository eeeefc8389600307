"""`compile_ahead`: compiling launches become parallel compiles that do not run; later launches find them compiled.
Without Triton it returns at once. The GPU tests (marker `gpu`) run on the device machine."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from r1serve.kernels.compile_ahead import compile_ahead

HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_without_triton_nothing_runs_and_nothing_is_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("triton", "triton.runtime._async_compile"):  # a machine without Triton, wherever this runs
        monkeypatch.setitem(sys.modules, name, None)
    calls = []
    assert compile_ahead(lambda: calls.append(1)) == 0
    assert calls == []


def _kernel():  # defined on first use, so that this module imports without Triton
    import triton
    import triton.language as tl

    @triton.jit
    def scale_kernel(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * factor, mask=offs < n)

    return scale_kernel


def _launch(kernel, x: torch.Tensor, y: torch.Tensor, block: int) -> None:
    kernel[(-(-x.numel() // block),)](x, y, x.numel(), 3.0, BLOCK=block)


@pytest.mark.gpu
def test_variants_compile_without_running_then_launch_without_compiling() -> None:
    from triton import knobs

    kernel = _kernel()
    x = torch.randn(1000, device="cuda")
    y = torch.zeros_like(x)
    blocks = (64, 128, 256)
    # each variant launched twice (as by two layers): compiled once, run never
    assert compile_ahead(lambda: [_launch(kernel, x, y, b) for b in blocks for _ in range(2)], workers=3) == 3
    torch.cuda.synchronize()
    assert (y == 0).all()
    compiled = []
    knobs.runtime.jit_cache_hook = lambda **kw: compiled.append(kw["fn"].name) and False
    try:
        for b in blocks:
            y.zero_()
            _launch(kernel, x, y, b)
            torch.testing.assert_close(y, 3 * x)
    finally:
        knobs.runtime.jit_cache_hook = None
    assert compiled == []  # every launch found its variant compiled


@pytest.mark.gpu
def test_a_failing_warm_up_is_reported_and_the_kernels_still_work() -> None:
    kernel = _kernel()
    x = torch.randn(100, device="cuda")
    y = torch.zeros_like(x)

    def warm_ups() -> None:
        _launch(kernel, x, y, 32)
        raise RuntimeError("boom")

    assert compile_ahead(warm_ups) == 0
    _launch(kernel, x, y, 32)
    torch.testing.assert_close(y, 3 * x)
