"""The engine's device and dtype rules (engine/device.py): what "auto" means, and errors naming the field."""
from __future__ import annotations

import pytest
import torch

from r1serve.engine import device
from r1serve.engine.device import cpu_has_native_bf16, resolve_device, resolve_dtype

CPU = torch.device("cpu")


def test_resolve_dtype_rules(monkeypatch):
    assert resolve_dtype("float32", CPU) is torch.float32
    assert resolve_dtype("float16", CPU) is torch.float16
    assert resolve_dtype("bfloat16", CPU) is torch.bfloat16
    with pytest.raises(ValueError, match="dtype: 'int8'"):
        resolve_dtype("int8", CPU)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    assert resolve_dtype("auto", CPU) is torch.bfloat16
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    assert resolve_dtype("auto", CPU) is torch.float32
    if not torch.cuda.is_available():
        assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16


def test_cpu_bf16_detection_reads_flags():
    assert cpu_has_native_bf16("processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("processor : 0\nflags : fpu sse avx2 avx512f\n")


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device: 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
