"""Plain-PyTorch reference of the quantized linear layers: the packed layouts r1serve keeps on the device, how
each is dequantized, and the products computed from them (dequantize, then matmul).

Every quantized checkpoint format is repacked at load into one of three layouts, so that each kernel reads one
layout whatever tool wrote the file:

- **int4** (AWQ, compressed-tensors `pack-quantized` W4A16): `qweight` int32 [N, K // 8], where the 4 bits at
  bit offset 4*j of word w hold column k = 8*w + j of row n (sequential order, as compressed-tensors packs);
  `scales` [N, K // G] in the activation dtype; `zeros` uint8 [N, K // G] (asymmetric, AWQ) or None
  (symmetric: the zero point is 8). w[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G].
- **int8** (compressed-tensors `int-quantized`, `--quantization int8`): `qweight` int8 [N, K], `scales`
  float32 [N] (per output channel, symmetric). w[n, k] = q[n, k] * s[n].
- **fp8** (compressed-tensors `float-quantized`, `--quantization fp8`): `qweight` float8_e4m3fn [N, K],
  `scales` float32 [N]. w[n, k] = q[n, k] * s[n].

With `act_quant` the activations are quantized too, per token and dynamically (W8A8 INT8, FP8 dynamic): each
row of x is scaled to the format's range and rounded, as the checkpoint's quantization scheme says. int8
follows compressed-tensors (the library llm-compressor writes and calibrates W8A8 with): scale = amax / 127.5
(half the width of -128..127), x / scale rounded half to even and clamped to -128..127; the weights quantized
on load the same way, per output channel. vLLM's kernels use amax / 127 instead (`scaled_int8_quant`); the
two differ by at most one step per value. fp8: scale = amax / 448, clamped to ±448, as both do. The
functions here are what the CPU runs and what the Triton kernels are tested against, so their signatures are
a contract. Each returns x's dtype; products accumulate in float32.
"""

from __future__ import annotations

import torch

INT4_PER_WORD = 8
INT4_SYMMETRIC_ZERO = 8
INT8_MAX = 127.0
INT8_MIN = -128.0
INT8_SCALE_DIVISOR = (INT8_MAX - INT8_MIN) / 2  # 127.5: compressed-tensors' symmetric int8 scale = amax / 127.5
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # [8]: bit offset of nibble j


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] integers in 0..15 → int32 [N, K // 8], nibble j of word w holding column 8*w + j."""
    num_rows, num_cols = q.shape
    if num_cols % INT4_PER_WORD:
        raise ValueError(f"pack_int4: K={num_cols} is not a multiple of {INT4_PER_WORD}")
    nibbles = q.to(torch.int32).reshape(num_rows, num_cols // INT4_PER_WORD, INT4_PER_WORD)
    return (nibbles << _SHIFTS.to(q.device)).sum(dim=-1, dtype=torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N, K // 8] → uint8 [N, K] in 0..15 (the inverse of `pack_int4`)."""
    nibbles = (qweight.unsqueeze(-1) >> _SHIFTS.to(qweight.device)) & 0xF  # [N, K // 8, 8]
    return nibbles.reshape(qweight.shape[0], -1).to(torch.uint8)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int) -> torch.Tensor:
    """The int4 layout as a dense [N, K] weight in scales' dtype (computed in float32)."""
    q = unpack_int4(qweight).float()  # [N, K]
    zero = float(INT4_SYMMETRIC_ZERO) if zeros is None else zeros.float().repeat_interleave(group_size, dim=1)
    scale = scales.float().repeat_interleave(group_size, dim=1)  # [N, K]
    return ((q - zero) * scale).to(scales.dtype)


def dequantize_per_channel(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The int8 or fp8 layout as a dense [N, K] weight in `dtype`."""
    return (qweight.float() * scales.float()[:, None]).to(dtype)


def quantize_per_token(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization of x [T, K]: (x_q [T, K] int8 or float8_e4m3fn, scales float32 [T, 1])."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True)  # [T, 1]
    divisor = torch.full_like(amax, INT8_SCALE_DIVISOR if fmt == "int8" else FP8_MAX)
    # a tensor divisor: CUDA divides by a Python scalar as a multiply by its rounded reciprocal
    scales = (amax / divisor).clamp(min=torch.finfo(torch.float32).tiny)
    scaled = x32 / scales
    if fmt == "int8":
        return scaled.round().clamp(INT8_MIN, INT8_MAX).to(torch.int8), scales
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, K] @ dequantize_int4(...).T (+ bias) → [T, N] in x's dtype."""
    weight = dequantize_int4(qweight, scales, zeros, group_size).float()
    return _finish(x.float() @ weight.T, bias, x.dtype)


def per_channel_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                       act_quant: bool) -> torch.Tensor:
    """x [T, K] times the int8 / fp8 layout (+ bias) → [T, N] in x's dtype. With `act_quant`, x is first
    quantized per token to qweight's format (W8A8), and the product is that of the two quantized operands."""
    weight = qweight.float()  # [N, K]: the integers (or fp8 values) as they are
    if act_quant:
        x_q, x_scales = quantize_per_token(x, "int8" if qweight.dtype == torch.int8 else "fp8")
        product = (x_q.float() @ weight.T) * x_scales
    else:
        product = x.float() @ weight.T
    return _finish(product * scales.float(), bias, x.dtype)


def _finish(product: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        product = product + bias.float()
    return product.to(dtype)


def quantize_int4(weight: torch.Tensor, group_size: int, symmetric: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A dense [N, K] weight in the int4 layout by round-to-nearest per group (for `--load-format dummy` and
    tests; checkpoints come quantized by their tools): (qweight, scales in weight's dtype, zeros or None)."""
    num_rows, num_cols = weight.shape
    if num_cols % group_size or group_size % INT4_PER_WORD:
        raise ValueError(f"quantize_int4: K={num_cols} needs a group size that divides it and is a multiple of 8, "
                         f"got {group_size}")
    groups = weight.float().reshape(num_rows, num_cols // group_size, group_size)
    if symmetric:
        scales = (groups.abs().amax(dim=-1) / 7.0).clamp(min=1e-8)  # [N, K // G]; q - 8 in -8..7
        zeros = torch.full_like(scales, INT4_SYMMETRIC_ZERO)
    else:
        low, high = groups.amin(dim=-1).clamp(max=0.0), groups.amax(dim=-1).clamp(min=0.0)
        scales = ((high - low) / 15.0).clamp(min=1e-8)
        zeros = (-low / scales).round().clamp(0, 15)
    q = (groups / scales[..., None] + zeros[..., None]).round().clamp(0, 15).reshape(num_rows, num_cols)
    packed_zeros = None if symmetric else zeros.to(torch.uint8)
    return pack_int4(q), scales.to(weight.dtype), packed_zeros


def quantize_per_channel(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense [N, K] weight per output channel, symmetric: (qweight int8 or float8_e4m3fn [N, K],
    scales float32 [N]). What `--quantization int8|fp8` does to a bf16 checkpoint on load."""
    w32 = weight.float()
    amax = w32.abs().amax(dim=-1)  # [N]
    divisor = torch.full_like(amax, INT8_SCALE_DIVISOR if fmt == "int8" else FP8_MAX)
    scales = (amax / divisor).clamp(min=torch.finfo(torch.float32).tiny)  # [N]
    scaled = w32 / scales[:, None]
    if fmt == "int8":
        return scaled.round().clamp(INT8_MIN, INT8_MAX).to(torch.int8), scales
    if fmt != "fp8":
        raise ValueError(f"quantize_per_channel: format {fmt!r} is not int8 or fp8")
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales
