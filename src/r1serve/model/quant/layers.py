"""The modules of a quantized decoder layer: projections that keep their weight packed (`Int4Linear`,
`PerChannelLinear`: buffers in the device layouts of `kernels.quant_reference`, no dense copy) and compute
their product through the ops table's `int4_linear` / `per_channel_linear` (the torch twins on CPU, Triton
kernels on CUDA), and the attention whose output projection is one of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from r1serve.config import ModelConfig
from r1serve.kernels.attention import AttentionBackend
from r1serve.kernels.quant_reference import INT4_PER_WORD
from r1serve.model.layers import REFERENCE_OPS, KernelOps, Qwen2Attention
from r1serve.model.quant.config import QuantScheme


class Int4Linear(nn.Module):
    """y = x @ W.T + b with W in the int4 layout: qweight int32 [N, K / 8], scales [N, K / G] (the model's dtype),
    zeros uint8 [N, K / G] or None (symmetric)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme,
                 ops: KernelOps = REFERENCE_OPS) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = scheme.group_size or in_features
        if in_features % self.group_size or in_features % INT4_PER_WORD or out_features % INT4_PER_WORD:
            raise ValueError(f"int4 projection [{out_features}, {in_features}]: both sizes must be multiples of "
                             f"{INT4_PER_WORD} and in_features of the group size {self.group_size}")
        num_groups = in_features // self.group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // INT4_PER_WORD, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(out_features, num_groups))
        zeros = None if scheme.symmetric else torch.empty(out_features, num_groups, dtype=torch.uint8)
        self.register_buffer("zeros", zeros)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] → [T, N]."""
        return self.ops.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)


class PerChannelLinear(nn.Module):
    """y = x @ W.T + b with W int8 or float8_e4m3fn [N, K] and float32 scales [N]; `act_quant` says whether x is
    quantized per token first (W8A8, FP8 dynamic: on CUDA the fp8 case can be one `torch._scaled_mm`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme,
                 ops: KernelOps = REFERENCE_OPS) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_quant = scheme.act_quant
        weight_dtype = torch.int8 if scheme.layout == "int8" else torch.float8_e4m3fn
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=weight_dtype))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] → [T, N]."""
        return self.ops.per_channel_linear(x, self.qweight, self.scales, self.bias, self.act_quant)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> PerChannelLinear:
        """`model.to(dtype)` moves the layout but keeps its dtypes (fp8 weights and float32 scales are floating
        point, and a cast would change the layout)."""
        fixed = {id(self.qweight), id(self.scales)}

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return t.to(moved.device) if id(t) in fixed and moved.dtype != t.dtype else moved

        return super()._apply(keep_dtype, recurse)


QuantLinear = Int4Linear | PerChannelLinear


def quant_linear(in_features: int, out_features: int, bias: bool, scheme: QuantScheme,
                 ops: KernelOps = REFERENCE_OPS) -> QuantLinear:
    """The packed projection module of `scheme`'s layout."""
    cls = Int4Linear if scheme.layout == "int4" else PerChannelLinear
    return cls(in_features, out_features, bias, scheme, ops)


class QuantAttention(Qwen2Attention):
    """`Qwen2Attention` with packed qkv_proj and o_proj: the same attention, the products through the modules."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend, ops: KernelOps,
                 scheme: QuantScheme) -> None:
        super().__init__(config, backend, ops)  # dense projections on the meta device while the model is built
        self.qkv_proj = quant_linear(config.hidden_size, self.q_size + 2 * self.kv_size, config.attention_bias,
                                     scheme, ops)
        self.o_proj = quant_linear(self.q_size, config.hidden_size, False, scheme, ops)

    def project_out(self, attended: torch.Tensor) -> torch.Tensor:
        """The output projection through the packed o_proj."""
        return self.o_proj(attended)
