"""Runs the Triton kernels' GPU tests on a CPU, through Triton's interpreter (TRITON_INTERPRET=1), in float32.

Why: device time is short, and a kernel change whose logic is wrong (a missed mask, a wrong offset, a split that
skips keys) fails here in seconds instead of in a device call. It checks logic only: the interpreter runs each
program one after another in numpy, so it finds neither races nor speed, and its bfloat16 is unusable (hence
float32, where the tests' bounds hold with room to spare). CUDA graph tests are left out.

    pip install triton==3.6.0   # into a separate environment: CI and the CPU suite run without Triton
    python dev/interpret_kernels.py [NAME_SUBSTRING ...]
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

_patch = interpreter._patch_lang_tensor


def _patch_lang_tensor(tensor, scope) -> None:
    """Triton 3.6's interpreter turns a 1-element array into an index with int(array), which NumPy 2 refuses."""
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = _patch_lang_tensor

import tests.test_kernels_gpu as gpu_tests  # noqa: E402

from r1serve.kernels import triton_attention  # noqa: E402

gpu_tests.DEVICE, gpu_tests.DTYPE = "cpu", torch.float32


class _AnyPointer(set):
    """The CPU allocator does not hand freed blocks back in order, so the NaN-poisoning check cannot hold here."""

    def __contains__(self, pointer: object) -> bool:
        return True


gpu_tests.poison_next_allocations = lambda *shapes: _AnyPointer()
ROTARY = "test_decode_with_rotary_equals_rotary_store_then_decode"
CASES: list[tuple[str, dict]] = [
    *[(ROTARY, {"num_splits": n, "fused_merge": f}) for n in (1, 5, None) for f in (False, True)],
    *[("test_decode_any_split_count_gives_the_same_result", {"num_splits": n, "fused_merge": False}) for n in (1, 5)],
    ("test_decode_upper_bound_and_zero_length_padding", {}),
    ("test_decode_matches_twin", {"batch": 7, "block_size": 16}),
    ("test_decode_gqa_groups", {"heads": (8, 1)}),
    ("test_rotary_store_equals_rotary_then_store", {"tokens": 6, "block_size": 16}),
    ("test_store_kv_matches_twin_and_skips_padding", {"block_size": 16}),
    *[("test_skinny_any_config_odd_sizes", {"act": a, "m": m, "shape": (37, 200, True)})
      for a in ("gated", "add_rms_norm", "plain") for m in (1, 7)],
    ("test_skinny_rejects_configs_it_cannot_run", {}),
    ("test_skinny_row_tiles_need_one_whole_k_chunk", {}),
]


def main() -> int:
    wanted = sys.argv[1:]
    failed = 0
    for prefetch in (True, False):  # the decode kernel's two load orders
        triton_attention.DECODE_PREFETCH = prefetch
        for name, kwargs in CASES:
            if wanted and not any(w in name for w in wanted):
                continue
            start = time.perf_counter()
            try:
                getattr(gpu_tests, name)(**kwargs)
                print(f"PASS {name} {kwargs} prefetch={prefetch} ({time.perf_counter() - start:.1f} s)", flush=True)
            except Exception:
                failed += 1
                print(f"FAIL {name} {kwargs} prefetch={prefetch}")
                traceback.print_exc()
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
