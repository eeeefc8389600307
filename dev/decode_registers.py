"""Compiles the decode attention kernel for sm_90 on this machine (no GPU needed) and prints ptxas's register and
spill counts for each form: split merged by the merge kernel or in the kernel, bf16 or fp8 cache, rotary or not.

Why: the decode kernel's registers decide how many of its programs fit on an SM, and a change to its epilogue
(the in-kernel merge) can raise them for every program; this shows it before device time is spent.

    python dev/decode_registers.py     # with the GPU machine's Triton (see dev/interpret_kernels.py)
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "dev")]

import triton  # noqa: E402
from sass_count import registers  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from r1serve.kernels import triton_attention as ta  # noqa: E402

POINTERS = {"q_ptr": "*bf16", "tables_ptr": "*i32", "seq_lens_ptr": "*i32", "out_ptr": "*bf16",
            "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "tickets_ptr": "*i32", "new_k_ptr": "*bf16",
            "new_v_ptr": "*bf16", "positions_ptr": "*i64", "cos_sin_ptr": "*fp32", "slots_ptr": "*i64"}
FLOATS = ("scale_log2e", "v_scale", "k_inv_scale", "v_inv_scale")


def compile_decode(merge: bool, fp8: bool, rotary: bool) -> object:
    """The split decode kernel of the 1.5B model's shapes (12 heads over 2 KV heads, 16-token pages, 32-key tiles,
    a 64-split cap) as the launcher would specialize it."""
    fn = ta._decode_kernel
    names = list(fn.arg_names)
    cache = "*fp8e4nv" if fp8 else "*bf16"
    types = {**POINTERS, "k_cache_ptr": cache, "v_cache_ptr": cache, **dict.fromkeys(FLOATS, "fp32")}
    consts = {"PAGE": 16, "GROUP": 6, "GROUP_PAD": 16, "HEAD_DIM": 128, "BLOCK_N": 32, "SPLIT": True, "MERGE": merge,
              "MERGE_HEADS": 8, "SPLITS_PAD": 64, "ROTARY": rotary, "USE_PDL": True, "FP8": fp8}
    signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
               if name.endswith("_ptr") or (name.startswith("stride") and name != "stride_bt")}
    source = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": ta.DECODE_TILES.num_warps, "num_stages": 2})


def main() -> int:
    for merge, fp8, rotary in itertools.product((False, True), repeat=3):
        kernel = compile_decode(merge, fp8, rotary)
        form = f"merge {'in kernel' if merge else 'kernel   '}, {'fp8 ' if fp8 else 'bf16'} cache, rotary {rotary}"
        print(f"{form}: {registers(kernel)}; shared {kernel.metadata.shared} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
