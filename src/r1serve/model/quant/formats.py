"""Each checkpoint format's tensors for one projection, repacked into the device layout of
`kernels.quant_reference` (`PackedWeight`), and the same layouts made from dense weights on load.

A format is the tensor names it needs per projection and one repack function; `FORMATS` maps the names
`QuantScheme.checkpoint_format` uses to them. AutoAWQ's GEMM layout is unpacked here (it is a few lines of
bit arithmetic, documented below); compressed-tensors' formats are unpacked by that library
(`quant.compressed`). Every repacker checks the shapes and dtypes it reads and names the tensor it refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from r1serve.kernels.quant_reference import INT4_PER_WORD, pack_int4, quantize_int4, quantize_per_channel, unpack_int4
from r1serve.model.quant.config import QuantScheme

# AutoAWQ packs 8 columns into an int32 interleaved: nibble i (bits 4i..4i+3) of word w holds column
# 8w + AWQ_ORDER[i]. AWQ_COLUMNS inverts it: column 8w + j is nibble AWQ_COLUMNS[j].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_COLUMNS = tuple(AWQ_ORDER.index(j) for j in range(INT4_PER_WORD))


@dataclass(frozen=True)
class PackedWeight:
    """One projection [N, K] in a device layout: int4 (qweight int32 [N, K / 8], scales [N, K / G], zeros uint8
    [N, K / G] or None) or int8 / fp8 (qweight [N, K], scales float32 [N], zeros None). `input_perm` (int64 [K],
    act order only): the layout's columns are the checkpoint's columns in this order, so that each group is
    contiguous; the product reads x's columns in the same order."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    input_perm: torch.Tensor | None = None


Repack = Callable[[str, dict[str, torch.Tensor], tuple[int, int], QuantScheme, torch.dtype], PackedWeight]


@dataclass(frozen=True)
class CheckpointFormat:
    """The tensors one projection `prefix` has in a format (`prefix.<name>`), and how they become a layout."""

    required: Callable[[QuantScheme], tuple[str, ...]]
    repack: Repack


def expect_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
    """ValueError naming the checkpoint tensor whose shape (or dtype) is not the one the model expects."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(shape)}")
    if dtype is not None and tensor.dtype != dtype:
        raise ValueError(f"checkpoint tensor {name} has dtype {tensor.dtype}, the format stores {dtype}")


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's interleaved int32 [R, C / 8] → uint8 [R, C] in 0..15, columns in order."""
    nibbles = unpack_int4(packed).reshape(packed.shape[0], -1, INT4_PER_WORD)  # [R, C / 8, 8]: nibble i
    return nibbles[..., list(AWQ_COLUMNS)].reshape(packed.shape[0], -1)


def repack_awq_gemm(prefix: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], scheme: QuantScheme,
                    dtype: torch.dtype) -> PackedWeight:
    """qweight int32 [K, N / 8], qzeros int32 [K / G, N / 8], scales [K / G, N] (input-major, interleaved) →
    the int4 layout (output-major, sequential)."""
    num_out, num_in = shape
    num_groups = num_in // (scheme.group_size or num_in)
    expect_shape(f"{prefix}.qweight", tensors["qweight"], (num_in, num_out // INT4_PER_WORD), torch.int32)
    expect_shape(f"{prefix}.qzeros", tensors["qzeros"], (num_groups, num_out // INT4_PER_WORD), torch.int32)
    expect_shape(f"{prefix}.scales", tensors["scales"], (num_groups, num_out))
    qweight = pack_int4(unpack_awq(tensors["qweight"]).T.contiguous())  # [N, K / 8]
    zeros = unpack_awq(tensors["qzeros"]).T.contiguous()  # uint8 [N, K / G]
    return PackedWeight(qweight, tensors["scales"].T.to(dtype).contiguous(), zeros)


def quantize_dense(prefix: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], scheme: QuantScheme,
                   dtype: torch.dtype) -> PackedWeight:
    """A dense weight [N, K] (bf16 checkpoint or dummy) quantized by round-to-nearest into the scheme's layout."""
    weight = tensors["weight"]
    expect_shape(f"{prefix}.weight", weight, shape)
    if scheme.layout == "int4":
        qweight, scales, zeros = quantize_int4(weight.to(dtype), scheme.group_size or shape[1], scheme.symmetric)
        return PackedWeight(qweight, scales, zeros)
    qweight, scales = quantize_per_channel(weight, scheme.layout)
    return PackedWeight(qweight, scales, None)


def _formats() -> dict[str | None, CheckpointFormat]:
    from r1serve.model.quant import compressed

    return {
        None: CheckpointFormat(lambda _: ("weight",), quantize_dense),
        "awq-gemm": CheckpointFormat(lambda _: ("qweight", "qzeros", "scales"), repack_awq_gemm),
        "pack-quantized": CheckpointFormat(compressed.required_tensors, compressed.repack_pack_quantized),
        "int-quantized": CheckpointFormat(compressed.required_tensors, compressed.repack_per_channel),
        "float-quantized": CheckpointFormat(compressed.required_tensors, compressed.repack_per_channel),
    }


def checkpoint_format(scheme: QuantScheme) -> CheckpointFormat:
    return _formats()[scheme.checkpoint_format]
