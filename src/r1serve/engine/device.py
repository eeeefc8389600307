"""The device and dtype a run uses, from `EngineConfig.device` / `.dtype` and what the machine has.

Why here: choosing where the model runs is the engine's decision (the runner sizes the KV cache, picks the
attention backend and the CPU threads from it); the loader only loads onto the device and dtype it is given.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["cpu_has_native_bf16", "resolve_device", "resolve_dtype"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str) -> torch.device:
    """"auto" → cuda when available, else cpu; "cuda" without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device: {device!r} is not one of auto, cpu, cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but no CUDA device is available (use --device cpu)")
    return torch.device(device)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16): /proc/cpuinfo flags, else torch."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = {word for line in cpuinfo.splitlines() if line.startswith("flags") for word in line.split()}
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check()) if check is not None else False


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" → bf16 on CUDA (fp16 on a GPU without bf16), bf16 on a CPU with native bf16, else fp32."""
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    if dtype != "auto":
        raise ValueError(f"dtype: {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    if device.type == "cuda":
        supported = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
        return torch.bfloat16 if supported else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
