"""The CPU's bf16 projections on weights reordered once, at load, into oneDNN's blocked layout.

A CPU decode step of the 1.5B model is the read of its bf16 weights. `F.linear` hands oneDNN the weight in
its `[out, in]` layout; the same product on a weight that oneDNN reordered ahead
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's freezing does) reads it faster at decode sizes, gives
the same result (bitwise on the AVX-512 CPU measured; another CPU's oneDNN kernels may sum in another order)
and is no slower for a prefill's hundreds of rows (`benchmarks/cpu_linear.py`; the
figures in docs/performance.md). `prepack_linears` swaps each eligible `nn.Linear` weight for its reordered
form (an opaque tensor: `is_mkldnn`, no storage of its own), and `reference.linear` runs `packed_linear` when it
meets one. Only bf16 weights are reordered (fp32 products run on MKL, whose rounding oneDNN's would not match),
and a weight shared with another module (a tied `lm_head`) is
left as it is, since its other user reads the plain layout.
"""

from __future__ import annotations

import torch
from torch import nn

PACKED_DTYPES = (torch.bfloat16,)


def available() -> bool:
    """Whether this torch build has oneDNN's reorder and linear ops (a CPU build with mkldnn) and this CPU runs
    oneDNN's bf16 products (AVX-512 or later; elsewhere oneDNN refuses them and `F.linear` stays)."""
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")
            and bool(mkldnn._is_mkldnn_bf16_supported()))


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] bf16, weight reordered by `prepack_linears` → x @ weight.T + bias [T, out] (oneDNN's product)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def prepack_linears(model: nn.Module) -> int:
    """Reorders the weight of every `nn.Linear` under `model` that is on the CPU, bf16 and not shared with
    another module; returns how many were reordered. The model's products must then go through
    `reference.linear` (the CPU's ops table's)."""
    if not available():
        return 0
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (not isinstance(module, nn.Linear) or not isinstance(weight, torch.Tensor) or weight.is_mkldnn
                or weight.device.type != "cpu" or weight.dtype not in PACKED_DTYPES or uses[id(weight)] > 1):
            continue
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        module.weight = nn.Parameter(packed, requires_grad=False)
        count += 1
    return count
