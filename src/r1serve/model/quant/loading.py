"""Loading a quantized model: the checkpoint's tensors of each decoder projection gathered, repacked by their
format (`quant.formats`) and copied into the rows of the fused packed module (q/k/v → qkv_proj, gate/up →
gate_up_proj); every other tensor passes on to the dense loader. Dummy weights of a quantized model are the
dense model's dummy weights (same seed, same values) quantized on the way in. An act-order projection's column
order goes into its shard's row of the module's `input_perm`; once every tensor is in, each int4 module settles
on one order, none, or one per shard (`Int4Linear.settle_input_order`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Protocol

import torch
from torch import nn

from r1serve.model.quant.config import QuantScheme
from r1serve.model.quant.formats import PackedWeight, checkpoint_format
from r1serve.model.quant.layers import Int4Linear

_PROJECTION = re.compile(r"^(model\.layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj)\.(\w+)$")
_FUSED = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gate_up", "up": "gate_up", "down": "down"}
_PARTS = ("q", "k", "v", "o", "gate", "up", "down")
_BLOCKS = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn"}
_SHARD_INDEX = {"q": 0, "k": 1, "v": 2, "gate": 0, "up": 1}  # row of input_perm in the fused module


class QuantizedModel(Protocol):
    """What the router needs of `Qwen2ForCausalLM`."""

    quant: QuantScheme | None

    def get_submodule(self, target: str) -> nn.Module: ...

    def shard_range(self, part: str) -> tuple[int, int]: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def modules(self) -> Iterator[nn.Module]: ...


def route_quantized(model: QuantizedModel, weights: Iterable[tuple[str, torch.Tensor]], num_layers: int
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Takes the projections' weight tensors out of `weights` into the packed modules; yields the rest (biases,
    norms, embeddings, lm_head). Raises ValueError naming unexpected and missing tensors."""
    scheme = model.quant
    assert scheme is not None
    fmt = checkpoint_format(scheme)
    required = fmt.required(scheme)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    dtype = next(model.parameters()).dtype
    for name, tensor in weights:
        match = _PROJECTION.match(name)
        if match is None or match[5] == "bias":
            yield name, tensor
            continue
        prefix, suffix = match[1], match[5]
        if suffix not in required:
            raise ValueError(f"unexpected checkpoint tensor {name} for {scheme.describe()}: a projection holds "
                             f"{', '.join(required)}")
        parts = pending.setdefault(prefix, {})
        parts[suffix] = tensor
        if len(parts) == len(required):
            _place(model, prefix, match[4], fmt.repack(prefix, parts, _shape(model, prefix, match[4]), scheme, dtype))
            parts.clear()
    _check_complete(pending, required, num_layers)
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.settle_input_order()


def _shape(model: QuantizedModel, prefix: str, part: str) -> tuple[int, int]:
    """(out, in) of one Hugging Face projection."""
    module = model.get_submodule(_fused_name(prefix, part))
    rows = model.shard_range(f"{part}_proj")[1] if _FUSED[part] != part else module.out_features
    return rows, module.in_features


def _fused_name(prefix: str, part: str) -> str:
    return prefix.rsplit(".", 1)[0] + f".{_FUSED[part]}_proj"


def _place(model: QuantizedModel, prefix: str, part: str, packed: PackedWeight) -> None:
    """Copies one projection's layout into its rows of the (fused) packed module."""
    module = model.get_submodule(_fused_name(prefix, part))
    start, rows = model.shard_range(f"{part}_proj") if _FUSED[part] != part else (0, module.out_features)
    for name in ("qweight", "scales", "zeros"):
        target, source = getattr(module, name, None), getattr(packed, name)
        if (target is None) != (source is None):
            raise ValueError(f"{prefix}: the checkpoint's {name} do not fit the scheme (zero points or none)")
        if target is not None:
            target.narrow(0, start, rows).copy_(source)
    target_perm = getattr(module, "input_perm", None)
    if (target_perm is None) != (packed.input_perm is None):
        raise ValueError(f"{prefix}: the checkpoint's column order (weight_g_idx) does not fit the scheme")
    if target_perm is not None:
        target_perm[_SHARD_INDEX.get(part, 0)].copy_(packed.input_perm)


def _check_complete(pending: dict[str, dict[str, torch.Tensor]], required: tuple[str, ...], num_layers: int) -> None:
    missing = []
    for layer in range(num_layers):
        for part in _PARTS:
            prefix = f"model.layers.{layer}.{_BLOCKS.get(part, 'mlp')}.{part}_proj"
            have = pending.get(prefix)
            if have is None or have:  # never seen, or seen in part (a complete projection is cleared)
                missing += [f"{prefix}.{s}" for s in required if have is None or s not in have]
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"quantized checkpoint: missing tensors {shown}")
