"""compressed-tensors checkpoints (llm-compressor's format): the config read with the library's own pydantic
models, and each projection's tensors unpacked with the library's own unpacking, then repacked into r1serve's
device layouts.

Three formats load: `pack-quantized` (int4 weights packed into int32, per group or channel, symmetric or with
packed zero points: W4A16), `int-quantized` (int8 weights per channel, optionally dynamic per-token int8
activations: W8A8) and `float-quantized` (fp8 e4m3 weights per channel or tensor, optionally dynamic per-token
fp8 activations: FP8 dynamic). The library is imported only here, when such a checkpoint is loaded (the
`quant` extra installs it).
"""

from __future__ import annotations

from typing import Any

import torch

from r1serve.kernels.quant_reference import INT4_SYMMETRIC_ZERO, pack_int4
from r1serve.model.quant.config import QuantScheme
from r1serve.model.quant.formats import PackedWeight, expect_shape

FORMAT_LAYOUTS = {"pack-quantized": "int4", "int-quantized": "int8", "float-quantized": "fp8"}


def _library() -> Any:
    try:
        import compressed_tensors
    except ImportError as e:
        raise ValueError("this checkpoint is in the compressed-tensors format, which needs the "
                         "`compressed-tensors` package: pip install 'r1serve[quant]'") from e
    return compressed_tensors


def parse_compressed_tensors(quant_config: dict[str, Any]) -> QuantScheme:
    """One scheme for every Linear layer (lm_head ignored), in one of the three formats above."""
    _library()
    from compressed_tensors.quantization import QuantizationConfig

    try:
        config = QuantizationConfig.model_validate(quant_config)
    except ValueError as e:
        raise ValueError(f"config.json: quantization_config is not a valid compressed-tensors config ({e})") from e
    if config.kv_cache_scheme is not None:
        raise ValueError("config.json: quantization_config.kv_cache_scheme (a quantized KV cache) is not supported")
    if len(config.config_groups) != 1:
        raise ValueError(f"config.json: quantization_config has {len(config.config_groups)} config_groups; "
                         "r1serve runs one scheme for all decoder projections")
    (name, scheme), = config.config_groups.items()
    if list(scheme.targets) != ["Linear"]:
        raise ValueError(f"config.json: config_groups.{name}.targets {scheme.targets} is not supported "
                         "(only ['Linear'])")
    fmt = str(scheme.format or config.format)
    if fmt not in FORMAT_LAYOUTS:
        raise ValueError(f"config.json: compressed-tensors format {fmt!r} is not supported "
                         f"(supported: {', '.join(FORMAT_LAYOUTS)})")
    return _scheme(name, fmt, scheme)


def _scheme(name: str, fmt: str, scheme: Any) -> QuantScheme:
    where = f"config.json: config_groups.{name}"
    weights, acts = scheme.weights, scheme.input_activations
    layout = FORMAT_LAYOUTS[fmt]
    bits, kind = {"int4": (4, "int"), "int8": (8, "int"), "fp8": (8, "float")}[layout]
    if weights is None or weights.num_bits != bits or str(weights.type) != kind:
        raise ValueError(f"{where}.weights: {fmt} needs {kind} weights of {bits} bits, got "
                         f"{None if weights is None else (str(weights.type), weights.num_bits)}")
    strategy = str(weights.strategy)
    allowed = ("group", "channel") if layout == "int4" else ("channel", "tensor")
    if strategy not in allowed:
        raise ValueError(f"{where}.weights.strategy {strategy!r} is not supported for {fmt} "
                         f"(supported: {', '.join(allowed)})")
    if str(weights.actorder) == "group":
        raise ValueError(f"{where}.weights.actorder 'group' (a g_idx permutation) is not supported")
    if layout != "int4" and not weights.symmetric:
        raise ValueError(f"{where}.weights.symmetric=false is not supported for {fmt}")
    if acts is not None and layout == "int4":
        raise ValueError(f"{where}.input_activations: int4 weights with quantized activations are not supported")
    if acts is not None and (not acts.dynamic or str(acts.strategy) != "token" or acts.num_bits != 8
                             or str(acts.type) != kind or not acts.symmetric):
        raise ValueError(f"{where}.input_activations: only dynamic, symmetric, per-token {kind}8 activations are "
                         f"supported (got dynamic={acts.dynamic}, strategy={acts.strategy})")
    group_size = weights.group_size if strategy == "group" else None
    return QuantScheme("compressed-tensors", layout, fmt, group_size=group_size, symmetric=bool(weights.symmetric),
                       act_quant=acts is not None)


def required_tensors(scheme: QuantScheme) -> tuple[str, ...]:
    if scheme.checkpoint_format == "pack-quantized":
        return ("weight_packed", "weight_scale", "weight_shape") + (() if scheme.symmetric else ("weight_zero_point",))
    return ("weight", "weight_scale")


def repack_pack_quantized(prefix: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int],
                          scheme: QuantScheme, dtype: torch.dtype) -> PackedWeight:
    """weight_packed int32 [N, K / 8] (+ weight_zero_point int32 [N / 8, K / G]) → the int4 layout."""
    from compressed_tensors.compressors import unpack_from_int32

    num_out, num_in = shape
    if tuple(tensors["weight_shape"].tolist()) != shape:
        raise ValueError(f"checkpoint tensor {prefix}.weight_shape is {tensors['weight_shape'].tolist()}, "
                         f"the model expects {list(shape)}")
    num_groups = num_in // (scheme.group_size or num_in)
    expect_shape(f"{prefix}.weight_packed", tensors["weight_packed"], (num_out, num_in // 8), torch.int32)
    expect_shape(f"{prefix}.weight_scale", tensors["weight_scale"], (num_out, num_groups))
    signed = unpack_from_int32(tensors["weight_packed"], 4, torch.Size(shape))  # int8 [N, K] in -8..7
    zeros = None
    if not scheme.symmetric:
        expect_shape(f"{prefix}.weight_zero_point", tensors["weight_zero_point"], (-(-num_out // 8), num_groups),
                     torch.int32)
        signed_zeros = unpack_from_int32(tensors["weight_zero_point"], 4, torch.Size((num_out, num_groups)),
                                         packed_dim=0)
        zeros = (signed_zeros.to(torch.int32) + INT4_SYMMETRIC_ZERO).to(torch.uint8)
    qweight = pack_int4(signed.to(torch.int32) + INT4_SYMMETRIC_ZERO)
    return PackedWeight(qweight, tensors["weight_scale"].to(dtype), zeros)


def repack_per_channel(prefix: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int],
                       scheme: QuantScheme, dtype: torch.dtype) -> PackedWeight:
    """weight int8 / float8_e4m3fn [N, K], weight_scale [N, 1] (channel) or [1] (tensor) → scales float32 [N]."""
    weight_dtype = torch.int8 if scheme.layout == "int8" else torch.float8_e4m3fn
    expect_shape(f"{prefix}.weight", tensors["weight"], shape, weight_dtype)
    scale = tensors["weight_scale"].float()
    if scale.numel() == 1:  # per tensor: the same scale for every row
        scale = scale.reshape(1).expand(shape[0])
    elif tuple(scale.shape) in ((shape[0], 1), (shape[0],)):
        scale = scale.reshape(shape[0])
    else:
        raise ValueError(f"checkpoint tensor {prefix}.weight_scale has shape {tuple(scale.shape)}, the model "
                         f"expects ({shape[0]}, 1) (per channel) or (1,) (per tensor)")
    return PackedWeight(tensors["weight"], scale.contiguous(), None)
