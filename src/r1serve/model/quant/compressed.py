"""compressed-tensors checkpoints (llm-compressor's format): the config read with the library's own pydantic
models, and each projection's tensors unpacked with the library's own unpacking, then repacked into r1serve's
device layouts.

Three formats load: `pack-quantized` (int4 weights packed into int32, per group or channel, symmetric or with
packed zero points: W4A16), `int-quantized` (int8 weights per channel, optionally dynamic per-token int8
activations: W8A8) and `float-quantized` (fp8 e4m3 weights per channel or tensor, optionally dynamic per-token
fp8 activations: FP8 dynamic). The library is imported only here, when such a checkpoint is loaded (the
`quant` extra installs it).

GPTQ's activation ordering: `actorder: "weight"` (alias "static", llm-compressor's default) only changes the
order in which GPTQ visits columns, and the groups stay in column order: nothing to do here. `actorder:
"group"` puts the groups in activation order and stores `weight_g_idx` int32 [K] (the group of each input
column): the repack sorts the columns by group (`group_order`), so that every group is contiguous for the
unchanged int4 kernels, and hands the order on (`PackedWeight.input_perm`) for the product to read x's columns
in it. compressed-tensors 0.20 and llm-compressor 0.14 removed "group" (their config models refuse it), while
the checkpoints written before stay in use: r1serve reads that setting itself before the library validates
the rest (`_take_act_order`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from r1serve.kernels.quant_reference import INT4_SYMMETRIC_ZERO, pack_int4
from r1serve.model.quant.config import QuantScheme
from r1serve.model.quant.formats import PackedWeight, expect_shape

FORMAT_LAYOUTS = {"pack-quantized": "int4", "int-quantized": "int8", "float-quantized": "fp8"}
GROUP_ACT_ORDERS = ("group", "dynamic")  # "dynamic": compressed-tensors' alias of "group"


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

    quant_config, act_order_groups = _take_act_order(quant_config)
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
    return _scheme(name, fmt, scheme, name in act_order_groups)


def _take_act_order(quant_config: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """A copy of the config with every config group's `weights.actorder: "group"` set to None (so that a
    compressed-tensors that has removed the setting validates the rest), and the names of those groups."""
    quant_config = copy.deepcopy(quant_config)
    groups = quant_config.get("config_groups")
    taken = set()
    for name, group in (groups.items() if isinstance(groups, dict) else ()):
        weights = group.get("weights") if isinstance(group, dict) else None
        if isinstance(weights, dict) and str(weights.get("actorder")).lower() in GROUP_ACT_ORDERS:
            weights["actorder"] = None
            taken.add(name)
    return quant_config, taken


def _scheme(name: str, fmt: str, scheme: Any, act_order: bool) -> QuantScheme:
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
    if act_order and strategy != "group":
        raise ValueError(f"{where}.weights.actorder 'group' needs strategy 'group' (got {strategy!r})")
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
                       act_quant=acts is not None, act_order=act_order)


def required_tensors(scheme: QuantScheme) -> tuple[str, ...]:
    if scheme.checkpoint_format == "pack-quantized":
        return (("weight_packed", "weight_scale", "weight_shape") + (() if scheme.symmetric else ("weight_zero_point",))
                + (("weight_g_idx",) if scheme.act_order else ()))
    return ("weight", "weight_scale")


def group_order(name: str, g_idx: torch.Tensor, group_size: int) -> torch.Tensor:
    """The input-column order (int64 [K]) that makes each group of an act-order projection contiguous: column
    j of the sorted layout is checkpoint column order[j], of group j // G. g_idx [K] must hold each group id
    0..K/G-1 exactly G times (as GPTQ writes it); anything else is refused, naming the tensor."""
    num_in = g_idx.shape[0] if g_idx.dim() == 1 else -1
    if num_in < 0 or g_idx.is_floating_point() or num_in % group_size:
        raise ValueError(f"checkpoint tensor {name} has shape {tuple(g_idx.shape)} and dtype {g_idx.dtype}, "
                         f"the format stores an integer group index per input column")
    order = torch.argsort(g_idx.long(), stable=True)
    expected = torch.arange(num_in, device=g_idx.device) // group_size
    if not torch.equal(g_idx.long()[order], expected):
        raise ValueError(f"checkpoint tensor {name} does not put {group_size} input columns in each of the "
                         f"{num_in // group_size} groups (values 0..{num_in // group_size - 1}, each {group_size} "
                         "times)")
    return order


def repack_pack_quantized(prefix: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int],
                          scheme: QuantScheme, dtype: torch.dtype) -> PackedWeight:
    """weight_packed int32 [N, K / 8] (+ weight_zero_point int32 [N / 8, K / G], + weight_g_idx [K] with act
    order: columns sorted by group) → the int4 layout."""
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
    order = None
    if scheme.act_order:
        expect_shape(f"{prefix}.weight_g_idx", tensors["weight_g_idx"], (num_in,))
        order = group_order(f"{prefix}.weight_g_idx", tensors["weight_g_idx"], scheme.group_size or num_in)
        signed = signed.index_select(1, order.to(signed.device))  # groups contiguous; scales, zeros unchanged
    qweight = pack_int4(signed.to(torch.int32) + INT4_SYMMETRIC_ZERO)
    return PackedWeight(qweight, tensors["weight_scale"].to(dtype), zeros, order)


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
