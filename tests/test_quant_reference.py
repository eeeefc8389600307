"""The quantized layouts' torch twins: packing round-trips, dequantization matches the formula, and products
equal dequantize-then-matmul (the contract the Triton kernels are tested against)."""

import pytest
import torch

from r1serve.kernels import quant_reference as qr


def test_pack_int4_round_trips_and_orders_nibbles_sequentially():
    q = torch.randint(0, 16, (5, 24), generator=torch.Generator().manual_seed(0))
    packed = qr.pack_int4(q)
    assert packed.shape == (5, 3) and packed.dtype == torch.int32
    assert torch.equal(qr.unpack_int4(packed), q.to(torch.uint8))
    word = qr.pack_int4(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]]))
    assert word.item() == int("f7654321", 16) - 2**32  # column 8w + j in bits 4j.., sign bit from the top nibble


def test_pack_int4_refuses_a_width_that_is_not_a_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        qr.pack_int4(torch.zeros(2, 12, dtype=torch.int32))


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_dequantize_follows_the_formula_and_is_close_to_the_weight(symmetric):
    weight = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    qweight, scales, zeros = qr.quantize_int4(weight, 64, symmetric)
    dense = qr.dequantize_int4(qweight, scales, zeros, 64)
    q = qr.unpack_int4(qweight).float()
    zero = 8.0 if zeros is None else zeros.float()[:, 1][:, None]
    assert torch.allclose(dense[:, 64:128], (q[:, 64:128] - zero) * scales[:, 1:2], atol=1e-6)
    assert (zeros is None) == symmetric
    assert (dense - weight).abs().max() <= scales.max() * 0.51  # round to nearest: half a step at most
    wrong_group = qr.dequantize_int4(qweight, scales.roll(1, dims=1), zeros, 64)
    assert not torch.allclose(wrong_group, dense)


def test_int4_linear_equals_dequantize_then_matmul_with_bias():
    g = torch.Generator().manual_seed(2)
    qweight, scales, zeros = qr.quantize_int4(torch.randn(24, 128, generator=g), 32, False)
    x, bias = torch.randn(3, 128, generator=g), torch.randn(24, generator=g)
    expected = x @ qr.dequantize_int4(qweight, scales, zeros, 32).T + bias
    assert torch.allclose(qr.int4_linear(x, qweight, scales, zeros, 32, bias), expected, atol=1e-4)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_per_channel_weights_round_trip_within_one_step(fmt):
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    qweight, scales = qr.quantize_per_channel(weight, fmt)
    assert qweight.dtype == (torch.int8 if fmt == "int8" else torch.float8_e4m3fn) and scales.shape == (32,)
    dense = qr.dequantize_per_channel(qweight, scales, torch.float32)
    relative = ((dense - weight).abs().amax(dim=1) / weight.abs().amax(dim=1)).max()
    assert relative < (0.5 / 127 + 1e-6 if fmt == "int8" else 1 / 16)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_per_channel_linear_weight_only_and_with_dynamic_activation_quant(fmt):
    g = torch.Generator().manual_seed(4)
    qweight, scales = qr.quantize_per_channel(torch.randn(16, 64, generator=g), fmt)
    x = torch.randn(5, 64, generator=g)
    dense = qr.dequantize_per_channel(qweight, scales, torch.float32)
    weight_only = qr.per_channel_linear(x, qweight, scales, None, act_quant=False)
    assert torch.allclose(weight_only, x @ dense.T, atol=1e-4)
    x_q, x_scales = qr.quantize_per_token(x, fmt)
    w8a8 = qr.per_channel_linear(x, qweight, scales, None, act_quant=True)
    assert torch.allclose(w8a8, (x_q.float() * x_scales) @ dense.T, atol=1e-4)
    assert not torch.equal(w8a8, weight_only)  # the activations really were rounded
    assert (w8a8 - weight_only).abs().max() < 0.1 * weight_only.abs().max()


def test_products_keep_the_activation_dtype():
    qweight, scales, zeros = qr.quantize_int4(torch.randn(8, 64, dtype=torch.bfloat16), 64, True)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert qr.int4_linear(x, qweight, scales, zeros, 64, None).dtype == torch.bfloat16


@pytest.mark.parametrize("same_order", [True, False])
@pytest.mark.parametrize("zeros", [False, True])
def test_act_order_linear_equals_the_dense_product_in_checkpoint_order(same_order, zeros):
    """The CPU path of GPTQ act order: columns sorted by group, x's columns permuted alike (per shard where the
    shards' orders differ), the product unchanged (the GPU test runs the same module on the Triton ops)."""
    from r1serve.model.layers import REFERENCE_OPS
    from test_quant_kernels_gpu import act_order_linear

    module, dense = act_order_linear((48, 16, 16), 256, 32, zeros, same_order, REFERENCE_OPS, "cpu", torch.float32)
    assert module.input_perm.shape == ((1 if same_order else 3), 256)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3))
    expected = x @ dense.T + module.bias
    assert torch.allclose(module(x), expected, atol=1e-4, rtol=1e-4)
    module.input_perm = None  # the sorted layout read in column order is another product
    assert not torch.allclose(module(x), expected, atol=1e-2)


def test_group_order_refuses_groups_of_unequal_size():
    from r1serve.model.quant.compressed import group_order

    order = group_order("g", torch.tensor([1, 0, 1, 0], dtype=torch.int32), 2)
    assert order.tolist() == [1, 3, 0, 2]
    with pytest.raises(ValueError, match="g does not put 2 input columns in each of the 2 groups"):
        group_order("g", torch.tensor([1, 1, 1, 0], dtype=torch.int32), 2)


def _compressed_tensors_int8(strategy: str):
    """compressed-tensors' own symmetric int8 args (W8A8's weights per channel, activations per token)."""
    quantization = pytest.importorskip("compressed_tensors.quantization")
    return quantization.QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy=strategy,
                                         dynamic=strategy == "token")


def test_int8_activation_quantization_follows_compressed_tensors():
    """Scales and int8 values equal compressed-tensors' dynamic per-token quantization (amax / 127.5, round
    half to even, -128..127) on random rows, outliers, ties and a zero row (whose scale is only a floor: the
    library's is float32's eps, r1serve's the smallest normal float; its values are 0 either way)."""
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    args = _compressed_tensors_int8("token")
    x = torch.randn(64, 384, generator=torch.Generator().manual_seed(4)) * torch.logspace(-3, 3, 64)[:, None]
    x[5, 7] = -x[5].abs().max() * 2  # a negative outlier: the row's -128
    x[9] = torch.linspace(-127.5, 127.5, 384)  # scale 1: many exact halves
    x[11] = 0
    tokens = x[None]  # [batch, tokens, hidden], as the library's per-token strategy reads activations
    scales, zero_points = compute_dynamic_scales_and_zp(value=tokens, args=args, module=None)
    expected = quantize(tokens, scales, zero_points, args, dtype=torch.int8)[0]
    x_q, x_scales = qr.quantize_per_token(x, "int8")
    nonzero = x.abs().amax(dim=-1) > 0
    assert torch.equal(x_scales[nonzero], scales[0][nonzero])
    assert torch.equal(x_q, expected)
    assert x_q[5, 7] == -128 and x_q.max() == 127


def test_int8_weight_quantization_follows_compressed_tensors():
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = _compressed_tensors_int8("channel")
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(5)) * 0.05
    scales, zero_points = calculate_qparams(weight.amin(dim=-1, keepdim=True), weight.amax(dim=-1, keepdim=True),
                                            args)
    expected = quantize(weight, scales, zero_points, args, dtype=torch.int8)
    qweight, our_scales = qr.quantize_per_channel(weight, "int8")
    assert torch.equal(our_scales, scales.reshape(-1))
    assert torch.equal(qweight, expected)
