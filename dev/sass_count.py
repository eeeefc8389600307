"""Compiles the quantized skinny kernels for sm_90 on this machine (no GPU needed) and counts the SASS
instructions of their main loop per 64 weight elements per thread, with ptxas's register and spill counts.

Why: the skinny products at T ≤ 16 should be bound by weight bytes, which holds only while a weight byte costs
a few instructions; the count shows it before device time is spent. The count is static: the instructions of
the innermost backward branch's body (the chunk loop), over the weight elements one thread handles per pass.

    python dev/sass_count.py [--form int4|int4_zeros|int8|fp8] [--m 1] [--dump DIR]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from r1serve.kernels import triton_quant as tq  # noqa: E402
from r1serve.kernels.triton_linear import SkinnyConfig  # noqa: E402

N, K = 17920, 1536  # gate_up: the largest decode product


def _attrs(names: list[str], pointers: set[str]) -> dict:
    """16-byte divisibility of the pointers and of the strides and sizes the launcher would specialize."""
    aligned = [i for i, name in enumerate(names) if name in pointers or name.startswith("stride") or name in
               ("N", "K", "KW", "split_words", "split_span")]
    return {(i,): [["tt.divisibility", 16]] for i in aligned}


def compile_form(form: str, m: int, config: SkinnyConfig | None = None) -> tuple[object, int]:
    """(compiled kernel, weight elements per thread per chunk) of the skinny kernel for `form` at T = m, with
    `config` or the one the module picks for gate_up."""
    config = config or tq.skinny_config(tq.INT4 if form.startswith("int4") else form, m, N, K)
    block_m = 16 if config.dot else tq.m_bucket(m)
    common = {"HAS_BIAS": False, "BLOCK_M": block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
              "SPLIT_K": 1, "DOT": config.dot, "USE_PDL": True}
    if form.startswith("int4"):
        fn = tq._int4_skinny_kernel
        types = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8", "b_ptr": "*bf16",
                 "y_ptr": "*bf16", "ws_ptr": "*fp32", "tickets_ptr": "*i32"}
        consts = {**common, "HAS_ZEROS": form == "int4_zeros", "GROUP_WORDS": 16}
    else:
        fn = tq._per_channel_skinny_kernel
        types = {"x_ptr": "*bf16", "xs_ptr": "*fp32", "q_ptr": "*i8" if form == "int8" else "*fp8e4nv",
                 "cs_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32", "tickets_ptr": "*i32"}
        words = not config.dot  # the byte-plane form, as per_channel_skinny picks it
        if words:
            types["q_ptr"] = "*i32"
        consts = {**common, "ACT_QUANT": False, "INT_DOT": False, "WORDS": words, "FP8": form == "fp8"}
    names = list(fn.arg_names)
    signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in names}
    source = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in consts.items()},
                       attrs=_attrs(names, set(types)))
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": config.warps, "num_stages": config.stages})
    threads = 32 * config.warps
    return kernel, config.block_n * config.block_k // threads


INSTRUCTION = re.compile(r"\s*/\*[0-9a-f]{4}\*/")


def sass(kernel: object) -> list[str]:
    """The kernel's SASS, one line per instruction or label."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        nvdisasm = Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"
        text = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
    return [line for line in text.splitlines() if INSTRUCTION.match(line) or re.match(r"\.L_x_\d+:", line)]


def loop_body(lines: list[str]) -> list[str]:
    """The instructions from the target of a backward branch to the branch: the longest such span (the loop)."""
    labels = {line.rstrip(":"): i for i, line in enumerate(lines) if line.startswith(".L_x_")}
    best: list[str] = []
    for i, line in enumerate(lines):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        start = labels.get(target.group(1)) if target else None
        if start is not None and start < i:
            body = [text for text in lines[start:i + 1] if INSTRUCTION.match(text)]
            best = max(best, body, key=len)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--form", default="int4", choices=["int4", "int4_zeros", "int8", "fp8"])
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--config", help="block_n,block_k,warps (default: the module's choice for gate_up)")
    parser.add_argument("--dump", type=Path, help="write the TTGIR, PTX and SASS here")
    args = parser.parse_args()
    config = None
    if args.config:
        block_n, block_k, warps = map(int, args.config.split(","))
        config = SkinnyConfig(block_n, block_k, warps=warps, dot=args.m > tq.FMA_MAX_M)
    kernel, per_thread = compile_form(args.form, args.m, config)
    lines = sass(kernel)
    body = loop_body(lines)
    ops: dict[str, int] = {}
    for line in body:
        op = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if op:
            name = op.group(1).split(".")[0]
            ops[name] = ops.get(name, 0) + 1
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        for key in ("ttgir", "ptx"):
            (args.dump / f"{args.form}_m{args.m}.{key}").write_text(kernel.asm[key])
        (args.dump / f"{args.form}_m{args.m}.sass").write_text("\n".join(lines))
    total = sum(1 for line in lines if INSTRUCTION.match(line))
    print(f"{args.form} T={args.m} {config or ''}: {total} instructions, loop body {len(body)} for {per_thread} "
          f"weights per thread = {64 * len(body) / per_thread:.0f} per 64 weights; shared {kernel.metadata.shared} B")
    print("  " + ", ".join(f"{op} {n}" for op, n in sorted(ops.items(), key=lambda kv: -kv[1])))
    print("  " + registers(kernel))
    return 0


def registers(kernel: object) -> str:
    """ptxas's lines on the kernel's registers and spills (ptxas -v on its PTX, for sm_90a)."""
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        text = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(Path(folder) / "k.o")],
                              capture_output=True, text=True).stderr
    lines = [line for line in text.splitlines() if "registers" in line or "spill" in line]
    return " ".join(line.split("info    : ")[-1] for line in lines)


if __name__ == "__main__":
    sys.exit(main())
