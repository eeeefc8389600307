"""Which quantization a model runs with: read from config.json's `quantization_config` (as vLLM does, so that
`--quantization` may be omitted), or asked for by `--quantization` on a bf16 checkpoint (quantized on load).

The result is one frozen `QuantScheme`: the device layout (int4, int8 or fp8), the group size and zero points
of int4, whether activations are quantized, and which checkpoint format the tensors come in. Everything r1serve
cannot run right (another method, bit width, group size, scheme per layer, a quantized KV cache) is refused
here, before any weight is read, with a ValueError that names the setting.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from r1serve.config import QUANTIZATION_METHODS

Layout = Literal["int4", "int8", "fp8"]
INT4_GROUP_SIZES = (32, 64, 128)
DUMMY_GROUP_SIZE = 128
CHECKPOINT_METHODS = ("awq", "compressed-tensors")


@dataclass(frozen=True)
class QuantScheme:
    """How the decoder layers' projections are stored and multiplied (embeddings and lm_head stay dense)."""

    method: str  # the `--quantization` name it answers to
    layout: Layout
    checkpoint_format: str | None  # awq-gemm, pack-quantized, int-quantized, float-quantized; None: on load
    group_size: int | None = None  # int4: input columns per scale; None: one group per row
    symmetric: bool = True  # int4: no zero points (zero point 8)
    act_quant: bool = False  # dynamic per-token activation quantization (W8A8, FP8 dynamic)
    act_order: bool = False  # int4 groups in activation order (GPTQ actorder "group": a g_idx per projection)

    def __post_init__(self) -> None:
        if self.layout == "int4" and self.group_size is not None and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"quantization_config: group_size {self.group_size} is not supported "
                             f"(int4 group sizes: {', '.join(map(str, INT4_GROUP_SIZES))}, or per channel)")
        if self.layout == "int4" and self.act_quant:
            raise ValueError("quantization_config: int4 weights with quantized activations are not supported")
        if self.act_order and (self.layout != "int4" or self.group_size is None):
            raise ValueError("quantization_config: actorder 'group' needs int4 weights quantized per group")

    def on_load(self) -> QuantScheme:
        """The same layout, quantized from dense weights on load (dummy weights of a quantized config): groups in
        column order, since round-to-nearest has no activation order."""
        return dataclasses.replace(self, checkpoint_format=None, act_order=False)

    def describe(self) -> str:
        """e.g. 'awq (int4, group 128, zero points; awq-gemm checkpoint)'."""
        parts = [self.layout]
        if self.layout == "int4":
            parts += [f"group {self.group_size}" if self.group_size else "per channel",
                      "symmetric" if self.symmetric else "zero points"]
            parts += ["act order (inputs permuted per projection)"] if self.act_order else []
        else:
            parts.append("per channel" + (", dynamic per-token activations" if self.act_quant else ", weight-only"))
        source = f"{self.checkpoint_format} checkpoint" if self.checkpoint_format else "quantized on load"
        return f"{self.method} ({', '.join(parts)}; {source})"


def resolve_quantization(flag: str | None, hf_config: dict[str, Any] | None, dummy: bool,
                         on_cuda: bool) -> QuantScheme | None:
    """The scheme of this run: the checkpoint's `quantization_config` (the flag, if given, must name its
    method), else the flag's on-load mode, else None (dense)."""
    flag = None if flag in (None, "none") else flag
    if flag is not None and flag not in QUANTIZATION_METHODS:
        raise ValueError(f"--quantization {flag!r} is not supported (accepted: {', '.join(QUANTIZATION_METHODS)})")
    quant_config = (hf_config or {}).get("quantization_config")
    if quant_config is None:
        return None if flag is None else on_load_scheme(flag, dummy, on_cuda)
    method = quant_config.get("quant_method")
    if flag is not None and flag != method:
        raise ValueError(f"--quantization {flag} does not match the checkpoint, whose config.json has "
                         f"quantization_config.quant_method {method!r}: omit the flag, or pass {method}")
    if method == "awq":
        return parse_awq(quant_config)
    if method == "compressed-tensors":
        from r1serve.model.quant.compressed import parse_compressed_tensors

        return parse_compressed_tensors(quant_config)
    raise ValueError(f"config.json: quantization_config.quant_method {method!r} is not supported "
                     f"(r1serve reads {', '.join(CHECKPOINT_METHODS)} checkpoints)")


def on_load_scheme(flag: str, dummy: bool, on_cuda: bool) -> QuantScheme:
    """`--quantization` on a dense checkpoint: int8 / fp8 / w8a8 per channel, w4a16 int4 (any weights), awq
    (int4 with zero points: dummy weights only, since AWQ needs its calibration)."""
    if flag in CHECKPOINT_METHODS and not (flag == "awq" and dummy):
        raise ValueError(
            f"--quantization {flag} needs a {flag} checkpoint (config.json with a quantization_config), and this "
            "one has none: to quantize a bf16 checkpoint on load use int8, fp8, w8a8 or w4a16"
            + (" (with --load-format dummy: also awq)" if flag == "compressed-tensors" else ""))
    schemes = {
        "int8": QuantScheme("int8", "int8", None),
        "w8a8": QuantScheme("w8a8", "int8", None, act_quant=True),
        "fp8": QuantScheme("fp8", "fp8", None, act_quant=on_cuda),  # weight-only where no fp8 matmul
        "w4a16": QuantScheme("w4a16", "int4", None, group_size=DUMMY_GROUP_SIZE),
        "awq": QuantScheme("awq", "int4", None, group_size=DUMMY_GROUP_SIZE, symmetric=False),
    }
    return schemes[flag]


def parse_awq(quant_config: dict[str, Any]) -> QuantScheme:
    """AutoAWQ's GEMM checkpoints: 4 bits, zero points, a group size of 32, 64 or 128."""
    version = str(quant_config.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"config.json: AWQ version {version!r} is not supported (only 'gemm')")
    bits = quant_config.get("bits", quant_config.get("w_bit"))
    if bits != 4:
        raise ValueError(f"config.json: AWQ bits {bits!r} is not supported (only 4)")
    if not quant_config.get("zero_point", True):
        raise ValueError("config.json: AWQ zero_point=false is not supported (only zero-point AWQ)")
    skipped = [m for m in quant_config.get("modules_to_not_convert") or [] if m != "lm_head"]
    if skipped:
        raise ValueError(f"config.json: AWQ modules_to_not_convert {skipped} is not supported: r1serve "
                         "quantizes every decoder projection or none")
    group_size = quant_config.get("group_size", quant_config.get("q_group_size"))
    if not isinstance(group_size, int):
        raise ValueError(f"config.json: AWQ group_size {group_size!r} is not supported (an integer: "
                         f"{', '.join(map(str, INT4_GROUP_SIZES))})")
    return QuantScheme("awq", "int4", "awq-gemm", group_size=group_size, symmetric=False)


def declared_quantization(flag: str | None, model: str) -> str:
    """The quantization method a server names without loading anything (its `/version`): the flag, else the
    quant_method in a local model folder's config.json, else 'none'. The start-up log has the whole scheme."""
    if flag not in (None, "none"):
        return str(flag)
    try:
        quant_config = json.loads((Path(model).expanduser() / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return "none"
    return str(quant_config.get("quant_method", "unknown")) if isinstance(quant_config, dict) else "none"
