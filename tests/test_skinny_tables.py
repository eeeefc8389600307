"""The skinny products' measured tables: a device's own sweep overrides the H100's, key by key (CPU, no Triton)."""
from __future__ import annotations

import pytest
import torch

from r1serve.kernels import triton_linear as tl_
from r1serve.kernels.triton_linear import SkinnyConfig

# (device, fused, N, K, M, the config chosen as str, None = cuBLAS / the activation's own kernel): every
# projection of the 1.5B model at one, two and three rows, on the H100's table (any device) and the H200's. The
# SiLU-fused down projection reads only its own device's entry: its own test, below.
CHOICES = [
    ('', False, 1536, 1536, 1, 'fma n4 k2048 s1 w8 st1'),
    ('', False, 1536, 1536, 2, 'fma n2 k2048 s1 w8 st1'),
    ('', False, 1536, 1536, 3, None),
    ('', False, 1536, 8960, 1, 'fma n2 k2048 s1 w4 st1'),
    ('', False, 1536, 8960, 2, None),
    ('', False, 1536, 8960, 3, None),
    ('', False, 2048, 1536, 1, 'fma n4 k2048 s1 w8 st1'),
    ('', False, 2048, 1536, 2, 'fma n4 k2048 s1 w8 st1'),
    ('', False, 2048, 1536, 3, None),
    ('', False, 17920, 1536, 1, 'fma n1 k2048 s1 w4 st1 t4'),
    ('', False, 17920, 1536, 2, None),
    ('', False, 17920, 1536, 3, None),
    ('', False, 151936, 1536, 1, 'fma n1 k2048 s1 w4 st1 t4'),
    ('', False, 151936, 1536, 2, None),
    ('', False, 151936, 1536, 3, None),
    ('', True, 1536, 1536, 1, 'fma n8 k512 s2 w4 st1'),
    ('', True, 1536, 1536, 2, 'fma n4 k512 s1 w4 st1'),
    ('', True, 1536, 1536, 3, 'fma n4 k256 s1 w4 st1'),
    ('', True, 2048, 1536, 1, 'fma n8 k2048 s1 w8 st1'),
    ('', True, 2048, 1536, 2, 'fma n4 k2048 s1 w8 st1'),
    ('', True, 2048, 1536, 3, None),
    ('', True, 17920, 1536, 1, 'fma n1 k2048 s1 w4 st1 t4'),
    ('', True, 17920, 1536, 2, None),
    ('', True, 17920, 1536, 3, None),
    ('', True, 151936, 1536, 1, 'fma n8 k512 s1 w4 st1'),
    ('', True, 151936, 1536, 2, 'fma n4 k512 s1 w4 st1'),
    ('', True, 151936, 1536, 3, 'fma n4 k256 s1 w4 st1'),
    ('NVIDIA H200', False, 1536, 1536, 1, 'fma n4 k2048 s1 w8 st1'),
    ('NVIDIA H200', False, 1536, 1536, 2, 'fma n4 k2048 s1 w4 st1'),
    ('NVIDIA H200', False, 1536, 1536, 3, None),
    ('NVIDIA H200', False, 1536, 8960, 1, 'fma n2 k2048 s1 w4 st1'),
    ('NVIDIA H200', False, 1536, 8960, 2, None),
    ('NVIDIA H200', False, 1536, 8960, 3, None),
    ('NVIDIA H200', False, 2048, 1536, 1, 'fma n4 k2048 s1 w8 st1'),
    ('NVIDIA H200', False, 2048, 1536, 2, 'fma n4 k2048 s1 w8 st1'),
    ('NVIDIA H200', False, 2048, 1536, 3, None),
    ('NVIDIA H200', False, 17920, 1536, 1, 'fma n1 k2048 s1 w4 st1 t16'),
    ('NVIDIA H200', False, 17920, 1536, 2, None),
    ('NVIDIA H200', False, 17920, 1536, 3, None),
    ('NVIDIA H200', False, 151936, 1536, 1, None),
    ('NVIDIA H200', False, 151936, 1536, 2, None),
    ('NVIDIA H200', False, 151936, 1536, 3, None),
    ('NVIDIA H200', True, 1536, 1536, 1, 'fma n8 k512 s2 w4 st1'),
    ('NVIDIA H200', True, 1536, 1536, 2, 'fma n4 k512 s1 w4 st1'),
    ('NVIDIA H200', True, 1536, 1536, 3, 'fma n4 k256 s1 w4 st1'),
    ('NVIDIA H200', True, 2048, 1536, 1, 'fma n4 k2048 s1 w4 st1'),
    ('NVIDIA H200', True, 2048, 1536, 2, 'fma n4 k2048 s1 w8 st1'),
    ('NVIDIA H200', True, 2048, 1536, 3, None),
    ('NVIDIA H200', True, 17920, 1536, 1, 'fma n1 k2048 s1 w4 st1 t16'),
    ('NVIDIA H200', True, 17920, 1536, 2, None),
    ('NVIDIA H200', True, 17920, 1536, 3, None),
    ('NVIDIA H200', True, 151936, 1536, 1, 'fma n8 k512 s1 w4 st1'),
    ('NVIDIA H200', True, 151936, 1536, 2, 'fma n4 k512 s1 w4 st1'),
    ('NVIDIA H200', True, 151936, 1536, 3, 'fma n4 k256 s1 w4 st1'),
]


@pytest.mark.parametrize(("device", "fused", "n", "k", "m", "chosen"), CHOICES)
def test_each_projection_takes_the_measured_config(device: str, fused: bool, n: int, k: int, m: int,
                                                   chosen: str | None) -> None:
    config = tl_.skinny_config(m, n, k, fused=fused, device=device)
    assert (str(config) if config else None) == chosen


def test_device_entries_replace_the_h100_choice() -> None:
    gate_up, lm_head = (17920, 1536), (151936, 1536)
    assert tl_.skinny_config(1, *gate_up) == SkinnyConfig(1, 2048, tiles=4)
    assert tl_.skinny_config(1, *gate_up, device="NVIDIA H200") == SkinnyConfig(1, 2048, tiles=16)
    assert tl_.skinny_config(2, *gate_up, device="NVIDIA H200") is None  # cuBLAS won there
    assert tl_.skinny_config(1, *lm_head, device="NVIDIA H200") is None
    assert tl_.skinny_config(1, 2048, 1536, fused=True, device="NVIDIA H200") == SkinnyConfig(4, 2048)


def test_the_silu_down_projection_fuses_only_where_its_device_measured_it() -> None:
    """`silu_linear`'s lookup: the device's own entry, never the fallback file's (the H200 has none: unfused)."""
    assert tl_.silu_entry("NVIDIA H100 80GB HBM3", 1536, 8960, 1) == (True, SkinnyConfig(4, 2048, warps=8))
    assert tl_.silu_entry("NVIDIA H200", 1536, 8960, 1) == (False, None)
    assert tl_.SKINNY_TABLE.lookup("NVIDIA H200", ("fused", 1536, 8960, 1))[0]  # (the fallback would have served it)
    assert tl_.silu_entry("NVIDIA H100 80GB HBM3", 1536, 8960, 2) == (True, None)


def test_unlisted_devices_and_rows_keep_the_h100_table() -> None:
    qkv = (2048, 1536)
    assert tl_.skinny_config(1, *qkv, device="NVIDIA A100-SXM4-80GB") == tl_.skinny_config(1, *qkv)
    assert tl_.skinny_config(3, *qkv, device="NVIDIA H200") is None  # M=4 bucket: not swept there, cuBLAS
    assert tl_.skinny_config(32, *qkv, device="NVIDIA H200") is None  # past SKINNY_MAX_M


def test_cpu_tensors_have_no_device_name() -> None:
    assert tl_.device_name(torch.device("cpu")) == ""


def test_the_h100_quant_table_replaces_the_rule_where_it_won() -> None:
    """The H100's one-row entries; int4 down_proj, where the rule won, and two rows keep the rule."""
    from r1serve.kernels import triton_quant as tq

    h100 = "NVIDIA H100 80GB HBM3"
    assert tq.skinny_config(tq.INT4, 1, 17920, 1536, h100) == SkinnyConfig(64, 256, split_k=2)
    assert tq.skinny_config(tq.INT8, 1, 17920, 1536, h100) == SkinnyConfig(64, 256)
    assert tq.skinny_config(tq.FP8, 1, 1536, 8960, h100) == SkinnyConfig(4, 2048, warps=8)
    for layout, m, n, k in ((tq.INT4, 1, 1536, 8960), (tq.INT8, 2, 17920, 1536), (tq.FP8, 1, 2048, 1536)):
        assert tq.skinny_config(layout, m, n, k, h100) == tq.skinny_config(layout, m, n, k, "")


def test_the_h200_quant_table_replaces_the_rule_where_it_won() -> None:
    """The H200's swept entries replace the rule there; the keys where the rule won (int4 down_proj at one row),
    the row buckets not swept and other devices keep the rule."""
    from r1serve.kernels import triton_quant as tq

    h200, other = "NVIDIA H200", "NVIDIA A100-SXM4-80GB"  # (the H100's quant file is no fallback)
    assert tq.skinny_config(tq.INT4, 1, 2048, 1536, h200) == SkinnyConfig(8, 2048, warps=8)
    assert tq.skinny_config(tq.INT4, 1, 17920, 1536, h200) == SkinnyConfig(64, 256, split_k=2)
    assert tq.skinny_config(tq.INT4, 2, 17920, 1536, h200) == SkinnyConfig(64, 256, split_k=4, warps=2)
    assert tq.skinny_config(tq.INT8, 1, 1536, 8960, h200) == SkinnyConfig(8, 2048, warps=8)
    assert tq.skinny_config(tq.FP8, 1, 2048, 1536, h200) == SkinnyConfig(8, 2048)
    assert tq.skinny_config(tq.FP8, 2, 17920, 1536, h200) == SkinnyConfig(16, 512)
    for layout, device, m, n, k in ((tq.INT4, h200, 1, 1536, 8960),
                                    (tq.INT8, h200, 4, 2048, 1536), (tq.INT4, other, 1, 2048, 1536)):
        assert tq.skinny_config(layout, m, n, k, device) == tq.skinny_config(layout, m, n, k, "")
    assert tq.skinny_config(tq.INT4, 1, 2048, 1536, "") == SkinnyConfig(8, 2048)  # the rule: K in one chunk
    assert tq.skinny_config(tq.FP8, 2, 1536, 8960, "") == SkinnyConfig(16, 512, split_k=16, warps=2)
