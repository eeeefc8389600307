"""GPU tests of the quantized linear kernels (`kernels/triton_quant.py`) against their twins
(`kernels/quant_reference.py`).

Each test draws fresh random weights, quantizes them with the twins' own quantizers into the packed layouts, and
checks the kernel's relative error ‖out − ref‖ / ‖ref‖ against the twin computed in float32 on upcast copies
(bf16 / fp16 outputs land near 2e-3; NaN never passes). Sizes are chosen to hit partial row blocks (N not a
multiple of any block), partial column chunks, uneven split-K shares and group boundaries (K a multiple of the
group, 384 and 8960). Every test is marked `gpu`: conftest skips them without CUDA, and the module imports on
CPU without Triton; `dev/interpret_kernels.py` runs a subset through Triton's interpreter in float32.
"""
from __future__ import annotations

import pytest
import torch

from r1serve.kernels import quant_reference as qr

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPES = (torch.bfloat16, torch.float16)  # the interpreter replaces these with float32
TOL = 1e-2
EXACT_FP8 = True  # the device converts to fp8 as torch does; Triton's interpreter rounds differently


def _tq():  # imported inside the tests, so that collection works without Triton
    from r1serve.kernels import triton_quant

    return triton_quant


def _config(*args, **kwargs):
    from r1serve.kernels.triton_linear import SkinnyConfig

    return SkinnyConfig(*args, **kwargs)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in the output (an element was left unwritten?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def int4_case(n: int, k: int, group: int, zeros: bool, bias: bool, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Packed int4 weights of a random [n, k] matrix: (qweight, scales, zeros or None, bias or None)."""
    weight = torch.randn(n, k, device=DEVICE) * k ** -0.5
    qweight, scales, zero_points = qr.quantize_int4(weight, group, symmetric=not zeros)
    b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    return qweight, scales.to(dtype), zero_points, b


def per_channel_case(fmt: str, n: int, k: int, bias: bool, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """int8 / fp8 weights of a random [n, k] matrix: (qweight, scales float32, bias or None)."""
    qweight, scales = qr.quantize_per_channel(torch.randn(n, k, device=DEVICE) * k ** -0.5, fmt)
    return qweight, scales, torch.randn(n, device=DEVICE, dtype=dtype) if bias else None


def activations(t: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(t, k, device=DEVICE, dtype=dtype) * 2


def int4_ref(x, qweight, scales, zeros, group, bias) -> torch.Tensor:
    """The twin in float32 on upcast copies (the dequantized weight rounded to scales' dtype first, as it is)."""
    return qr.int4_linear(x.float(), qweight, scales, zeros, group, None if bias is None else bias.float())


def per_channel_ref(x, qweight, scales, bias, act_quant) -> torch.Tensor:
    return qr.per_channel_linear(x.float(), qweight, scales, None if bias is None else bias.float(), act_quant)


# ---------------------------------------------------------------- int4 (W4A16)

INT4_SHAPES = [(37, 384, 32), (129, 384, 128), (70, 8960, 128), (100, 1536, 64), (53, 8960, 8960)]  # G = K


@pytest.mark.parametrize("t", [1, 3, 16, 17, 100, 130])
@pytest.mark.parametrize("shape", INT4_SHAPES)
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_linear_matches_twin(t: int, shape: tuple[int, int, int], zeros: bool, bias: bool,
                                  dtype: torch.dtype) -> None:
    """The dispatching op (skinny up to 16 rows; above, dequantized, then cuBLAS) at odd N and every group size."""
    n, k, group = shape
    qweight, scales, zero_points, b = int4_case(n, k, group, zeros, bias, dtype)
    x = activations(t, k, dtype)
    out = _tq().int4_linear(x, qweight, scales, zero_points, group, b)
    assert out.shape == (t, n) and out.dtype == dtype
    assert rel_err(out, int4_ref(x, qweight, scales, zero_points, group, b)) < TOL


def _skinny_configs(m: int) -> list:
    """Every skinny form: FMA (several chunks, split-K with uneven shares, one whole-K chunk) up to 2 rows,
    tensor cores (split or not) at any row count."""
    dots = [_config(16, 64, dot=True), _config(32, 128, split_k=3, dot=True, warps=8)]
    if m > 2:
        return dots
    return [_config(4, 64), _config(2, 128, split_k=3), _config(1, 2048), _config(8, 256, split_k=5), *dots]


@pytest.mark.parametrize("t", [1, 2, 5, 16])
@pytest.mark.parametrize("shape", [(37, 384, 32), (129, 1000, 40), (20, 8960, 8960)])
@pytest.mark.parametrize("zeros", [False, True])
def test_int4_skinny_any_config(t: int, shape: tuple[int, int, int], zeros: bool) -> None:
    n, k, group = shape
    dtype = DTYPES[0]
    qweight, scales, zero_points, b = int4_case(n, k, group, zeros, True, dtype)
    x = activations(t, k, dtype)
    ref = int4_ref(x, qweight, scales, zero_points, group, b)
    for config in _skinny_configs(t):
        out = _tq().int4_skinny(x, qweight, scales, zero_points, group, b, config=config)
        assert rel_err(out, ref) < TOL, str(config)


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("shape", [(37, 384, 32), (129, 1000, 40), (70, 8960, 128)])
def test_int4_to_dense_equals_the_twin_bit_for_bit(shape: tuple[int, int, int], zeros: bool) -> None:
    n, k, group = shape
    qweight, scales, zero_points, _ = int4_case(n, k, group, zeros, False, DTYPES[0])
    out = torch.full((n, k), float("nan"), dtype=scales.dtype, device=DEVICE)
    _tq().int4_to_dense(qweight, scales, zero_points, group, out)
    assert torch.equal(out, qr.dequantize_int4(qweight, scales, zero_points, group))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_per_channel_to_dense_equals_the_twin_bit_for_bit(fmt: str) -> None:
    qweight, scales, _ = per_channel_case(fmt, 129, 1000, False, DTYPES[0])
    out = torch.full((129, 1000), float("nan"), dtype=DTYPES[0], device=DEVICE)
    _tq().per_channel_to_dense(qweight, scales, out)
    assert torch.equal(out, qr.dequantize_per_channel(qweight, scales, DTYPES[0]))


def test_int4_rejects_layouts_it_cannot_read() -> None:
    tq = _tq()
    qweight, scales, _, _ = int4_case(16, 256, 64, False, False, DTYPES[0])
    x = activations(1, 256, DTYPES[0])
    with pytest.raises(ValueError, match="group size"):
        tq.int4_skinny(x, qweight, scales, None, 60, None)
    with pytest.raises(ValueError, match="scales must be"):
        tq.int4_skinny(x, qweight, scales[:, :2], None, 64, None)
    with pytest.raises(ValueError, match="cannot run"):
        tq.int4_skinny(x, qweight, scales, None, 64, None, config=_config(8, 64, dot=True))


# ---------------------------------------------------------------- int8 / fp8 (W8A16, W8A8)

PER_CHANNEL_SHAPES = [(37, 384), (129, 1000), (70, 8960)]


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("t", [1, 3, 16, 17, 100, 130])
@pytest.mark.parametrize("shape", PER_CHANNEL_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_channel_linear_matches_twin(fmt: str, act_quant: bool, t: int, shape: tuple[int, int], bias: bool,
                                         dtype: torch.dtype) -> None:
    """The dispatching op (skinny up to 16 rows; above, weight-only: dequantized, then cuBLAS; W8A8: the tiled
    kernel or, for FP8, torch._scaled_mm)."""
    n, k = shape
    qweight, scales, b = per_channel_case(fmt, n, k, bias, dtype)
    x = activations(t, k, dtype)
    out = _tq().per_channel_linear(x, qweight, scales, b, act_quant)
    assert out.shape == (t, n) and out.dtype == dtype
    act_quant = act_quant and _quantizes_x(qweight, t, n, k)
    if act_quant and fmt == "fp8" and not EXACT_FP8:  # compare on the kernel's own quantized x
        x_q, x_scales = _tq().quantize_per_token(x, "fp8")
        ref = (x_q.float() @ qweight.float().T) * x_scales * scales + (0 if b is None else b.float())
    else:
        ref = per_channel_ref(x, qweight, scales, b, act_quant)
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_fma_words_read_every_byte_value_exactly(fmt: str) -> None:
    """Every byte value (fp8: but the two NaN codes) at each of a word's four places, times a one-hot x, comes out
    of the FMA form as itself (the int8 form reads the layout as words, four bytes each)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    if fmt == "fp8":
        codes = codes[(codes & 0x7F) != 0x7F]
    values = codes.view(torch.int8 if fmt == "int8" else torch.float8_e4m3fn).to(DEVICE)
    scales = torch.ones(values.numel(), device=DEVICE)
    for j in range(4):
        qweight = torch.zeros(values.numel(), 8, dtype=values.dtype, device=DEVICE)
        qweight[:, 4 + j] = values
        x = torch.zeros(1, 8, device=DEVICE, dtype=DTYPES[0])
        x[0, 4 + j] = 1
        out = _tq().per_channel_skinny(x, qweight, scales, None, False, config=_config(32, 512))
        assert torch.equal(out[0].float(), values.float()), f"byte {j}"


def _quantizes_x(qweight: torch.Tensor, t: int, n: int, k: int) -> bool:
    """Whether `per_channel_linear` with act_quant quantizes x at t rows: above 16 rows, and where the skinny
    product's config runs on tensor cores (an FMA product reads x unquantized)."""
    tq = _tq()
    return t > tq.SKINNY_MAX_M or tq.skinny_config(tq._layout(qweight), t, n, k, tq.device_name(qweight.device)).dot


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("t", [1, 2])
def test_fma_products_read_x_unquantized(fmt: str, t: int) -> None:
    """At one and two rows an FMA config's W8A8 / FP8-dynamic product equals its weight-only product bit for bit
    (no quantization launch), and a tensor-core config's equals the product of the quantized x."""
    tq = _tq()
    n, k = 129, 1000
    qweight, scales, b = per_channel_case(fmt, n, k, True, DTYPES[0])
    x = activations(t, k, DTYPES[0])
    fma, dot = _config(8, 256, split_k=2), _config(16, 64, dot=True)
    key, device = (tq._layout(qweight), n, k, tq.m_bucket(t)), tq.device_name(x.device)
    for config, quantized in ((fma, False), (dot, True)):
        want = tq.per_channel_skinny(x, qweight, scales, b, quantized, config=config)
        restore = tq.QUANT_TABLE.override(device, {key: config})
        try:
            got = tq.per_channel_linear(x, qweight, scales, b, True)
        finally:
            restore()
        assert torch.equal(got, want), str(config)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("t", [1, 2, 5, 16])
def test_per_channel_skinny_any_config(fmt: str, act_quant: bool, t: int) -> None:
    n, k = 129, 1000
    dtype = DTYPES[0]
    qweight, scales, b = per_channel_case(fmt, n, k, True, dtype)
    x = activations(t, k, dtype)
    x_q, x_scales = _tq().quantize_per_token(x, fmt) if act_quant else (x, None)
    ref = (x_q.float() @ qweight.float().T) * (x_scales if act_quant else 1.0) * scales + b.float()
    for config in _skinny_configs(t):
        out = _tq().per_channel_skinny(x, qweight, scales, b, act_quant, config=config)
        assert rel_err(out, ref) < TOL, str(config)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("act_quant", [False, True])
def test_per_channel_gemm_any_tiles(fmt: str, act_quant: bool) -> None:
    """The Triton tiled kernel itself (the dispatcher may send FP8 W8A8 to torch._scaled_mm instead)."""
    tq = _tq()
    n, k, t = 150, 1000, 100
    dtype = DTYPES[0]
    qweight, scales, b = per_channel_case(fmt, n, k, True, dtype)
    x = activations(t, k, dtype)
    x_q, x_scales = tq.quantize_per_token(x, fmt) if act_quant else (x, None)
    ref = (x_q.float() @ qweight.float().T) * (x_scales if act_quant else 1.0) * scales + b.float()
    for config in (None, tq.GemmConfig(16, 32, 64, group_m=2), tq.GemmConfig(64, 64, 128, warps=8, stages=2)):
        out = tq.per_channel_gemm(x, qweight, scales, b, act_quant, config=config)
        assert rel_err(out, ref) < TOL, str(config)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("k", [1000, 8960])
def test_quantize_per_token_matches_twin(fmt: str, k: int) -> None:
    """Per-token scales equal the twin's; the quantized values too (fp8 where the conversion is the device's)."""
    x = activations(5, k, DTYPES[0]) * torch.rand(5, 1, device=DEVICE, dtype=DTYPES[0])
    x[3] = 0  # a zero row: the smallest normal scale, zeros
    x_q, x_scales = _tq().quantize_per_token(x, fmt)
    ref_q, ref_scales = qr.quantize_per_token(x, fmt)
    assert x_q.dtype == ref_q.dtype and x_scales.shape == ref_scales.shape
    assert torch.equal(x_scales, ref_scales)
    if fmt == "int8" or EXACT_FP8:
        assert torch.equal(x_q.float(), ref_q.float())
    else:  # the interpreter drops the carry of a value rounded up to a power of two (it comes out halved) and
        # truncates subnormals (off by one step of 2**-9)
        got, want = x_q.float(), ref_q.float()
        assert ((got == want) | (got * 2 == want) | ((got - want).abs() <= 2 ** -9)).all()


# ---------------------------------------------------------------- act order (GPTQ actorder "group")

def act_order_linear(shards: tuple[int, ...], k: int, group: int, zeros: bool, same_order: bool, ops,
                     device: str, dtype: torch.dtype, seed: int = 0):
    """An act-order `Int4Linear` of random weights whose shards have random group orders (one shared order, or
    one each), loaded as the checkpoint loader does (`group_order`, sorted columns, `settle_input_order`), and
    the dense [sum(shards), k] weight in checkpoint column order that it stands for."""
    from r1serve.model.quant.compressed import group_order
    from r1serve.model.quant.config import QuantScheme
    from r1serve.model.quant.layers import Int4Linear

    gen = torch.Generator().manual_seed(seed)
    scheme = QuantScheme("compressed-tensors", "int4", "pack-quantized", group_size=group, symmetric=not zeros,
                         act_order=True)
    with torch.device(device):
        module = Int4Linear(k, sum(shards), bias=True, scheme=scheme, ops=ops, shards=shards)
    dense, start = [], 0
    ranks = torch.randperm(k, generator=gen)
    for i, rows in enumerate(shards):
        ranks = ranks if same_order and i else torch.randperm(k, generator=gen)
        g_idx = (ranks // group).to(torch.int32)  # column c in group rank(c) // G, as GPTQ writes it
        order = group_order("g_idx", g_idx, group)
        weight = torch.randn(rows, k, generator=gen) * k ** -0.5
        qweight, scales, zero_points = qr.quantize_int4(weight[:, order], group, symmetric=not zeros)
        module.qweight[start:start + rows] = qweight.to(device)
        module.scales[start:start + rows] = scales.to(device, dtype)
        if zeros:
            module.zeros[start:start + rows] = zero_points.to(device)
        module.input_perm[i] = order.to(device)
        sorted_dense = qr.dequantize_int4(qweight, scales.to(dtype), zero_points, group).float()
        dense.append(sorted_dense[:, torch.argsort(order)])  # back to checkpoint order
        start += rows
    module.bias.data = torch.randn(sum(shards), generator=gen).to(device, dtype)
    module.settle_input_order()
    return module, torch.cat(dense).to(device)


@pytest.mark.parametrize("t", [1, 5, 17, 100])
@pytest.mark.parametrize("same_order", [True, False])
@pytest.mark.parametrize("zeros", [False, True])
def test_act_order_int4_linear_matches_twin(t: int, same_order: bool, zeros: bool) -> None:
    """An act-order fused projection (q/k/v-like shards, K = 1536, group 128) through the Triton ops equals the
    torch twins' ops and the dense product in checkpoint order; shards in one order share one permutation."""
    from r1serve.model.layers import REFERENCE_OPS, triton_kernel_ops

    dtype = DTYPES[0]
    module, dense = act_order_linear((256, 64, 64), 1536, 128, zeros, same_order, triton_kernel_ops(), DEVICE,
                                     dtype)
    assert module.input_perm.shape[0] == (1 if same_order else 3)
    x = activations(t, 1536, dtype)
    out = module(x)
    module.ops = REFERENCE_OPS
    twin = module(x.float())
    assert rel_err(out, twin) < TOL
    assert rel_err(out, x.float() @ dense.T + module.bias.float()) < TOL


# ---------------------------------------------------------------- model shapes and CUDA graphs

MODEL_SHAPES = [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)]  # qkv, o_proj, gate_up, down


@pytest.mark.parametrize("t", [1, 2, 4, 8, 16, 256])
def test_quantized_ops_at_model_shapes(t: int) -> None:
    """The 1.5B model's projections at every decode bucket and a prefill: each layout as the model calls it."""
    tq = _tq()
    dtype = DTYPES[0]
    for n, k in MODEL_SHAPES:
        x = activations(t, k, dtype)
        for zeros in (False, True):
            qweight, scales, zero_points, _ = int4_case(n, k, 128, zeros, False, dtype)
            out = tq.int4_linear(x, qweight, scales, zero_points, 128, None)
            assert rel_err(out, int4_ref(x, qweight, scales, zero_points, 128, None)) < TOL
        for fmt in ("int8", "fp8"):
            qweight, scales, _ = per_channel_case(fmt, n, k, False, dtype)
            for act_quant in (False, True):
                out = tq.per_channel_linear(x, qweight, scales, None, act_quant)
                quantized = act_quant and _quantizes_x(qweight, t, n, k)
                assert rel_err(out, per_channel_ref(x, qweight, scales, None, quantized)) < TOL


def test_skinny_cuda_graph_replay_at_one_row() -> None:
    """The decode path captured once at T = 1 (split-K tickets, activation quantization included) and replayed on
    new inputs equals eager calls, twice over (the tickets reset themselves)."""
    tq = _tq()
    dtype = DTYPES[0]
    x = activations(1, 8960, dtype)
    q4, s4, z4, b4 = int4_case(1536, 8960, 128, True, True, dtype)
    q8, s8, _ = per_channel_case("int8", 1536, 8960, False, dtype)
    qf, sf, _ = per_channel_case("fp8", 1536, 8960, False, dtype)
    calls = [
        lambda: tq.int4_linear(x, q4, s4, z4, 128, b4),
        lambda: tq.int4_skinny(x, q4, s4, None, 128, None, config=_config(4, 256, split_k=8)),
        lambda: tq.per_channel_linear(x, q8, s8, None, True),
        lambda: tq.per_channel_linear(x, qf, sf, None, False),
        lambda: tq.per_channel_skinny(x, qf, sf, None, True, config=_config(16, 512, split_k=4, dot=True)),
    ]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and allocate the split-K workspace outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [call() for call in calls]
    for _ in range(2):
        x.copy_(activations(1, 8960, dtype))
        graph.replay()
        torch.cuda.synchronize()
        for out, call in zip(outs, calls, strict=True):
            assert torch.equal(out, call())
