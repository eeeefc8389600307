"""The skinny products' measured tables: a device's own sweep overrides the H100's, key by key (CPU, no Triton)."""
from __future__ import annotations

import torch

from r1serve.kernels import triton_linear as tl_
from r1serve.kernels.triton_linear import SkinnyConfig


def test_device_entries_replace_the_h100_choice() -> None:
    gate_up, lm_head = (17920, 1536), (151936, 1536)
    assert tl_.skinny_config(1, *gate_up) == tl_.TUNED[(*gate_up, 1)] is not None
    assert tl_.skinny_config(1, *gate_up, device="NVIDIA H200") == SkinnyConfig(1, 2048, tiles=16)
    assert tl_.skinny_config(2, *gate_up, device="NVIDIA H200") is None  # cuBLAS won there
    assert tl_.skinny_config(1, *lm_head, device="NVIDIA H200") is None
    assert tl_.skinny_config(1, 2048, 1536, fused=True, device="NVIDIA H200") == SkinnyConfig(4, 2048)


def test_unlisted_devices_and_rows_keep_the_h100_table() -> None:
    qkv = (2048, 1536)
    assert tl_.skinny_config(1, *qkv, device="NVIDIA A100-SXM4-80GB") == tl_.TUNED[(*qkv, 1)]
    assert tl_.skinny_config(3, *qkv, device="NVIDIA H200") is None  # M=4 bucket: not swept there, cuBLAS
    assert tl_.skinny_config(32, *qkv, device="NVIDIA H200") is None  # past SKINNY_MAX_M


def test_cpu_tensors_have_no_device_name() -> None:
    assert tl_.device_name(torch.device("cpu")) == ""


def test_gated_gate_up_keeps_the_unfused_op_where_it_lost_or_was_not_measured() -> None:
    gate_up = (17920, 1536)
    assert tl_.skinny_config(1, *gate_up, fused=True, device="NVIDIA H200", gated=True) is None  # lost there
    assert tl_.skinny_config(1, *gate_up, fused=True, gated=True) is None  # the H100: not measured
    tl_.GATED[(*gate_up, 1)] = SkinnyConfig(8, 2048, warps=8)
    try:  # a measured entry is taken, and the device's own entry still wins
        assert tl_.skinny_config(1, *gate_up, fused=True, gated=True) == SkinnyConfig(8, 2048, warps=8)
        assert tl_.skinny_config(1, *gate_up, fused=True, device="NVIDIA H200", gated=True) is None
    finally:
        del tl_.GATED[(*gate_up, 1)]
