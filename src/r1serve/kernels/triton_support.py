"""Triton where it is installed: the one optional import every Triton kernel module goes through.

Why: CPU-only machines (CI, the CPU path) have no Triton, and the kernel modules must still import there so
that their twins run; the import, the flag saying whether it worked, the interpreter flag and the error a
kernel raises without it are written once here.
"""

from __future__ import annotations

import os

try:  # Triton is absent on CPU-only machines; each kernel's plain-torch twin runs there instead
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU machines
    triton = None
    tl = None

__all__ = ["HAS_TRITON", "INTERPRET", "require_triton", "tl", "triton"]

HAS_TRITON = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter: the kernels run on CPU tensors


def require_triton(twin: str) -> None:
    """Raises, naming the twin to use, where Triton is not installed."""
    if triton is None:
        raise RuntimeError(f"triton is not installed: use {twin} on this machine")
