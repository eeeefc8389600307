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
    zeros uint8 [N, K / G] or None (symmetric).

    With act order (`scheme.act_order`) the layout's columns are sorted by group, and `input_perm` int64 [S, K]
    holds each shard's column order (a fused projection stacks S shards' rows, `shards` their row counts): the
    product reads x's columns in that order first. `settle_input_order` (after loading) keeps one order when
    the shards agree (GPTQ gives q/k/v, and gate/up, the same one: they see the same inputs), none when it is
    the identity; shards that disagree run one product each."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme,
                 ops: KernelOps = REFERENCE_OPS, shards: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = scheme.group_size or in_features
        if in_features % self.group_size or in_features % INT4_PER_WORD or out_features % INT4_PER_WORD:
            raise ValueError(f"int4 projection [{out_features}, {in_features}]: both sizes must be multiples of "
                             f"{INT4_PER_WORD} and in_features of the group size {self.group_size}")
        self.shards = shards or (out_features,)
        if sum(self.shards) != out_features:
            raise ValueError(f"int4 projection: shards {self.shards} do not add up to {out_features} rows")
        num_groups = in_features // self.group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // INT4_PER_WORD, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(out_features, num_groups))
        zeros = None if scheme.symmetric else torch.empty(out_features, num_groups, dtype=torch.uint8)
        self.register_buffer("zeros", zeros)
        perm = torch.empty(len(self.shards), in_features, dtype=torch.int64) if scheme.act_order else None
        self.register_buffer("input_perm", perm)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.ops = ops

    def settle_input_order(self) -> None:
        """After loading: `input_perm` becomes None (every shard in column order), one row (all shards in the
        same order) or stays one row per shard."""
        perms = self.input_perm
        if perms is None:
            return
        if bool((perms == perms[:1]).all()):
            identity = torch.equal(perms[0], torch.arange(self.in_features, device=perms.device))
            self.input_perm = None if identity else perms[:1].clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] → [T, N]."""
        if self.input_perm is None:
            return self._product(x, 0, self.out_features)
        if self.input_perm.shape[0] == 1:
            return self._product(x.index_select(-1, self.input_perm[0]), 0, self.out_features)
        starts = [sum(self.shards[:i]) for i in range(len(self.shards))]
        return torch.cat([self._product(x.index_select(-1, perm), start, rows)
                          for perm, start, rows in zip(self.input_perm, starts, self.shards, strict=True)],
                         dim=-1)

    def _product(self, x: torch.Tensor, start: int, rows: int) -> torch.Tensor:
        """x [T, K] times rows start..start+rows of the layout (all of it: start 0, rows N) → [T, rows]."""
        if rows == self.out_features:
            return self.ops.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)
        zeros = None if self.zeros is None else self.zeros.narrow(0, start, rows)
        bias = None if self.bias is None else self.bias.narrow(0, start, rows)
        return self.ops.int4_linear(x, self.qweight.narrow(0, start, rows), self.scales.narrow(0, start, rows),
                                    zeros, self.group_size, bias)


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
                 ops: KernelOps = REFERENCE_OPS, shards: tuple[int, ...] | None = None) -> QuantLinear:
    """The packed projection module of `scheme`'s layout; `shards`: the row counts of the projections a fused
    one stacks (int4 act order keeps a column order per shard)."""
    if scheme.layout == "int4":
        return Int4Linear(in_features, out_features, bias, scheme, ops, shards)
    return PerChannelLinear(in_features, out_features, bias, scheme, ops)


class QuantAttention(Qwen2Attention):
    """`Qwen2Attention` with packed qkv_proj and o_proj: the same attention, the products through the modules."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend, ops: KernelOps,
                 scheme: QuantScheme) -> None:
        super().__init__(config, backend, ops)  # dense projections on the meta device while the model is built
        self.qkv_proj = quant_linear(config.hidden_size, self.q_size + 2 * self.kv_size, config.attention_bias,
                                     scheme, ops, shards=(self.q_size, self.kv_size, self.kv_size))
        self.o_proj = quant_linear(self.q_size, config.hidden_size, False, scheme, ops)

    def project_out(self, attended: torch.Tensor) -> torch.Tensor:
        """The output projection through the packed o_proj."""
        return self.o_proj(attended)
