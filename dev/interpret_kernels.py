"""Runs the Triton kernels' GPU tests on a CPU, through Triton's interpreter (TRITON_INTERPRET=1), in float32.

Why: device time is short, and a kernel change whose logic is wrong (a missed mask, a wrong offset, a split that
skips keys) fails here in seconds instead of in a device call. It checks logic only: the interpreter runs each
program one after another in numpy, so it finds neither races nor speed, and its bfloat16 is unusable (hence
float32, where the tests' bounds hold with room to spare). CUDA graph tests are left out.

    pip install triton==3.6.0   # into a separate environment: the GPU machine's Triton (the project's own
                                # environment may hold another, which xgrammar pulls in)
    python dev/interpret_kernels.py [NAME_SUBSTRING ...]   # e.g. `quant` or `int4` for the quantized kernels
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

import pytest  # noqa: E402
import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

_patch = interpreter._patch_lang_tensor


def _patch_lang_tensor(tensor, scope) -> None:
    """Triton 3.6's interpreter turns a 1-element array into an index with int(array), which NumPy 2 refuses."""
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = _patch_lang_tensor

import tests.test_kernels_gpu as gpu_tests  # noqa: E402
import tests.test_quant_kernels_gpu as quant_tests  # noqa: E402

gpu_tests.DEVICE, gpu_tests.DTYPE = "cpu", torch.float32
gpu_tests.EXACT_FP8 = False  # the interpreter's float-to-fp8 conversion is not the GPU's
quant_tests.DEVICE, quant_tests.DTYPES = "cpu", (torch.float32,)
quant_tests.EXACT_FP8 = False  # the interpreter's float-to-fp8 conversion is not torch's


class _AnyPointer(set):
    """The CPU allocator does not hand freed blocks back in order, so the NaN-poisoning check cannot hold here."""

    def __contains__(self, pointer: object) -> bool:
        return True


gpu_tests.poison_next_allocations = lambda *shapes: _AnyPointer()

ROTARY = "test_decode_with_rotary_equals_rotary_store_then_decode"
CASES: list[tuple[str, dict]] = [
    *[(ROTARY, {"num_splits": n, "merge_in_decode": m}) for n in (1, 5, None) for m in (False, True)],
    *[("test_decode_any_split_count_gives_the_same_result", {"num_splits": n}) for n in (1, 5)],
    ("test_decode_upper_bound_and_zero_length_padding", {}),
    *[("test_decode_merge_in_kernel_equals_the_merge_kernel", {"num_splits": n, "monkeypatch": None})
      for n in (2, 5, 64)],
    ("test_decode_matches_twin", {"batch": 7, "block_size": 16}),
    ("test_decode_gqa_groups", {"heads": (8, 1)}),
    ("test_rotary_store_equals_rotary_then_store", {"tokens": 6, "block_size": 16}),
    ("test_store_kv_matches_twin_and_skips_padding", {"block_size": 16}),
    ("test_fp8_store_kv_matches_twin_and_skips_padding", {"block_size": 16}),
    ("test_fp8_rotary_store_matches_rotary_then_store", {"tokens": 6}),
    *[("test_fp8_decode_matches_twin", {"batch": 7, "num_splits": n}) for n in (1, 5)],
    *[("test_fp8_decode_with_rotary_equals_rotary_store_then_decode", {"num_splits": n, "merge_in_decode": m})
      for n in (1, 5) for m in (False, True)],
    ("test_fp8_prefill_matches_twin", {"case": "block_boundaries"}),
    *[("test_skinny_any_config_odd_sizes", {"act": a, "m": m, "shape": (37, 200, True)})
      for a in ("rms_norm", "add_rms_norm", "plain", "silu") for m in (1, 7)],
    *[("test_skinny_any_config_odd_sizes", {"act": "silu", "m": m, "shape": (129, 1000, False)}) for m in (1, 3)],
    ("test_skinny_rejects_configs_it_cannot_run", {}),
    ("test_skinny_row_tiles_need_one_whole_k_chunk", {}),
]

F32 = torch.float32
# tests/test_quant_kernels_gpu.py (kernels/triton_quant.py): each form once, small shapes, odd N, every group size.
QUANT_CASES: list[tuple[str, dict]] = [
    *[("test_int4_linear_matches_twin", {"t": t, "shape": s, "zeros": z, "bias": b, "dtype": F32})
      for t, s, z, b in ((1, (37, 384, 32), True, True), (17, (37, 384, 32), False, True),
                         (3, (70, 8960, 128), True, False), (16, (53, 8960, 8960), False, True),
                         (1, (129, 384, 128), False, False), (100, (100, 1536, 64), True, False),
                         (130, (37, 384, 32), True, True))],
    *[("test_int4_to_dense_equals_the_twin_bit_for_bit", {"shape": (129, 1000, 40), "zeros": z}) for z in (0, 1)],
    *[("test_per_channel_to_dense_equals_the_twin_bit_for_bit", {"fmt": f}) for f in ("int8", "fp8")],
    ("test_per_channel_linear_matches_twin", {"fmt": "int8", "act_quant": False, "t": 130, "shape": (37, 384),
                                              "bias": True, "dtype": F32}),
    ("test_int4_skinny_any_config", {"t": 1, "shape": (37, 384, 32), "zeros": True}),
    ("test_int4_skinny_any_config", {"t": 2, "shape": (129, 1000, 40), "zeros": True}),
    ("test_int4_skinny_any_config", {"t": 5, "shape": (129, 1000, 40), "zeros": False}),
    ("test_int4_rejects_layouts_it_cannot_read", {}),
    *[("test_per_channel_linear_matches_twin", {"fmt": f, "act_quant": a, "t": t, "shape": (37, 384),
                                                "bias": True, "dtype": F32})
      for f in ("int8", "fp8") for a in (False, True) for t in (1, 17)],
    ("test_per_channel_linear_matches_twin", {"fmt": "int8", "act_quant": True, "t": 16, "shape": (70, 8960),
                                              "bias": False, "dtype": F32}),
    *[("test_fma_products_read_x_unquantized", {"fmt": f, "t": t}) for f, t in (("int8", 1), ("fp8", 2))],
    *[("test_fma_words_read_every_byte_value_exactly", {"fmt": f}) for f in ("int8", "fp8")],
    *[("test_per_channel_skinny_any_config", {"fmt": f, "act_quant": a, "t": t})
      for f, a, t in (("int8", True, 1), ("fp8", False, 2), ("int8", False, 5), ("fp8", True, 16))],
    *[("test_per_channel_gemm_any_tiles", {"fmt": f, "act_quant": a})
      for f, a in (("int8", True), ("fp8", False), ("fp8", True))],
    ("test_quantize_per_token_matches_twin", {"fmt": "int8", "k": 1000}),
    ("test_quantize_per_token_matches_twin", {"fmt": "fp8", "k": 8960}),
    *[("test_act_order_int4_linear_matches_twin", {"t": t, "same_order": o, "zeros": z})
      for t, o, z in ((1, True, False), (17, False, True))],
]


def _run(module: object, name: str, kwargs: dict, note: str, wanted: list[str]) -> int:
    """Runs one case if its name matches (or nothing was asked for): the number of failures (0 or 1)."""
    if wanted and not any(w in name for w in wanted):
        return 0
    start = time.perf_counter()
    try:
        with pytest.MonkeyPatch.context() as patch:  # for a test that takes pytest's `monkeypatch`
            getattr(module, name)(**{k: patch if k == "monkeypatch" else v for k, v in kwargs.items()})
        print(f"PASS {name} {kwargs}{note} ({time.perf_counter() - start:.1f} s)", flush=True)
        return 0
    except Exception:
        print(f"FAIL {name} {kwargs}{note}")
        traceback.print_exc()
        return 1


def main() -> int:
    wanted = sys.argv[1:]
    failed = 0
    failed += sum(_run(gpu_tests, name, kwargs, "", wanted) for name, kwargs in CASES)
    failed += sum(_run(quant_tests, name, kwargs, "", wanted) for name, kwargs in QUANT_CASES)
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
