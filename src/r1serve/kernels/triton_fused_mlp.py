"""The MLP half of a decoder layer at decode sizes in one launch: (add +) RMSNorm, the gate/up product,
SiLU-and-mul and down_proj, for 1-8 rows, with flags in device memory where the chain has kernel boundaries.

Why: at batch 1 a decode step is a stream of weight reads, and the chain that runs the MLP today is three
launches per layer (`triton_linear.rms_norm_gate_up`'s norm-fused product, the SiLU-and-mul kernel, down_proj's
`linear`), each with a launch, a dependent first load and a tail. Here one persistent grid (at most one program
per SM, so every program is resident at once) does both products, and down_proj's weight stream starts while
other programs are still finishing gate/up.

How: program p owns the phase-1 blocks p, p + P, p + 2P, ... (P programs): each block is `block_n1` columns of
the activation a = silu(gate) * up, i.e. `block_n1` gate rows and the matching up rows of the fused [gate; up]
weight over all K (hidden) columns at once, the next block's weights in flight while it multiplies the current
one. The RMSNorm of x (or of x + residual; program 0 writes the new residual) is computed once in the prologue,
as the skinny kernel does; the epilogue rounds gate and up to x's dtype, applies SiLU-and-mul rounded where
`reference.silu_and_mul` rounds, writes the block into the [M, I] activation buffer and adds 1 to its chunk's
counter (release). Blocks go out in stride order, so the activation's first chunks are complete after a few
rounds of phase 1. Phase 2: program p owns the down_proj row blocks P-1-p, 2P-1-p, ... (reversed, so the
programs with one phase-1 block fewer take the extra phase-2 block), each streaming K (intermediate) in chunks
of `chunk` columns, the next chunk's weights in flight during each product. In its first block a program issues
a chunk's weight loads, then spins (acquire) until that chunk's counter holds all of its phase-1 blocks, then
loads that chunk of the activation (L2, `.cg`) and multiplies; its later blocks find every chunk complete.
Sums run in float32 and round once, as in the chain.

Flags: one int32 counter per chunk and an exit ticket per device (`flags_workspace`); the last program to take
the exit ticket zeroes the counters and the ticket, so every launch (and every CUDA-graph replay) finds them at
zero. One stream per device may run the kernel at a time (they share the counters). A wait is bounded
(`SPIN_LIMIT` polls, seconds): a wait that never ends would hang the process, so instead the kernel records it
in the status word (`read_status`), and its output is then wrong. No program waits for anything but phase-1
work, which never waits, and the grid never exceeds the SM count, so no wait can deadlock.

`two_launches=True` (always under Triton's interpreter, which runs programs one after another and would spin
forever) runs the same kernel twice without flags: phase 1 (`PHASES=1`), then phase 2 (`PHASES=2`).
On Hopper the kernel is a programmatic dependent launch (`triton_ops.use_pdl`): its first weight loads go out
before `griddepcontrol.wait`. Not wired into the model yet. The module imports without Triton.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from r1serve.kernels import triton_ops
from r1serve.kernels.triton_support import INTERPRET, require_triton, tl, triton

__all__ = ["FUSED_MLP_MAX_M", "FusedMlpConfig", "default_num_programs", "flags_workspace", "fused_mlp",
           "read_status"]

FUSED_MLP_MAX_M = 8
MAX_CHUNKS = 1024  # counters per device: the activation's columns / chunk
SPIN_LIMIT = 1 << 20  # polls of one counter before a wait gives up and records it (~1 s)
INTERPRETER_PROGRAMS = 8  # the persistent grid under the interpreter (a CPU has no SMs)
PHASES_BOTH, PHASES_FIRST, PHASES_SECOND = 0, 1, 2


@dataclass(frozen=True)
class FusedMlpConfig:
    """Tiles of the fused MLP: `block_n1` activation columns per phase-1 block (as many gate rows and up rows),
    `block_n2` down_proj rows per phase-2 block, `chunk` activation columns per phase-2 step and per counter;
    tensor cores (`dot1`, `dot2`: 16 rows per block at least, x padded to 16 rows) or FMA in each phase."""

    block_n1: int = 4
    block_n2: int = 4
    chunk: int = 2048
    dot1: bool = False
    dot2: bool = False
    warps: int = 8

    def __str__(self) -> str:
        return (f"p1 {'dot' if self.dot1 else 'fma'} n{self.block_n1} | p2 {'dot' if self.dot2 else 'fma'} "
                f"n{self.block_n2} c{self.chunk} | w{self.warps}")


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=16)
def sm_count(device: torch.device) -> int:
    """The device's SM count, queried once per device (the interpreter's stand-in on a CPU)."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=256)
def default_num_programs(sms: int, blocks1: int, bytes1: int, blocks2: int, bytes2: int) -> int:
    """The grid (≤ sms) whose busiest program reads the fewest weight bytes: phase-1 blocks dealt in stride
    order, phase-2 blocks in reverse (as the kernel deals them); the larger grid on a tie."""
    best, best_cost = sms, None
    for p in range(sms, max(1, sms // 2) - 1, -1):
        extra1, extra2 = blocks1 % p, blocks2 % p
        cost = max((blocks1 // p + (q < extra1)) * bytes1 + (blocks2 // p + (p - 1 - q < extra2)) * bytes2
                   for q in range(p))
        if best_cost is None or cost < best_cost:
            best, best_cost = p, cost
    return best


_FLAGS: dict[torch.device, torch.Tensor] = {}


def flags_workspace(device: torch.device) -> torch.Tensor:
    """Per device, int32 zeros: MAX_CHUNKS chunk counters, the exit ticket, the status word (every launch leaves
    the counters and the ticket at zero)."""
    flags = _FLAGS.get(device)
    if flags is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fused_mlp: run one eager call before capturing a CUDA graph (it allocates the "
                               "flags)")
        flags = torch.zeros(MAX_CHUNKS + 2, dtype=torch.int32, device=device)
        _FLAGS[device] = flags
    return flags


def read_status(device: torch.device) -> int:
    """1 if a wait of a launch on `device` gave up since the last call (its output was wrong), else 0; resets
    the word. Synchronises with the device."""
    status = flags_workspace(device)[MAX_CHUNKS + 1]
    value = int(status.item())
    status.zero_()
    return value


if triton is not None:
    from r1serve.kernels.triton_ops import pdl_start

    @triton.jit
    def _rows(block, limit, BLOCK: tl.constexpr):
        """The row (or column) indices of block `block` and their mask against `limit`."""
        offs = block * BLOCK + tl.arange(0, BLOCK)
        return offs, offs < limit

    @triton.jit
    def _load_tile(w_ptr, rows, row_mask, cols, col_mask, stride):
        """w[rows, cols]: [len(rows), len(cols)], zero where masked."""
        return tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :],
                       mask=row_mask[:, None] & col_mask[None, :], other=0.0)

    @triton.jit
    def _load_gate_up(wgu_ptr, block, inter, hidden, stride, BN1: tl.constexpr, BK1: tl.constexpr):
        """Phase-1 block `block`: its gate rows and its up rows (`inter` rows on), all columns: 2 x [BN1, BK1]."""
        rows, row_mask = _rows(block, inter, BN1)
        cols = tl.arange(0, BK1)
        gate = _load_tile(wgu_ptr, rows, row_mask, cols, cols < hidden, stride)
        up = _load_tile(wgu_ptr, rows + inter, row_mask, cols, cols < hidden, stride)
        return gate, up

    @triton.jit
    def _load_down(wd_ptr, t, first, step, chunks, hidden, inter, stride, BN2: tl.constexpr, CK: tl.constexpr):
        """Step t of a program's phase 2 (row block first + (t // chunks) * step, chunk t % chunks): [BN2, CK]."""
        rows, row_mask = _rows(first + (t // chunks) * step, hidden, BN2)
        cols, col_mask = _rows(t % chunks, inter, CK)
        return _load_tile(wd_ptr, rows, row_mask, cols, col_mask, stride)

    @triton.jit
    def _normed_x(x_ptr, res_ptr, nw_ptr, M, hidden, eps, stride_xm, stride_rm,
                  HAS_RESIDUAL: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
        """(weight * rmsnorm(h) [BM, BK] rounded as `reference.rms_norm` rounds, h), h = x or x + residual
        rounded to x's dtype; rows ≥ M and columns ≥ hidden are 0."""
        rows, cols = tl.arange(0, BM), tl.arange(0, BK)
        mask = (rows < M)[:, None] & (cols < hidden)[None, :]
        h = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)  # rounded like torch's bf16 add
        h32 = h.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(h32 * h32, axis=1) / hidden + eps)  # [BM]
        normed = (h32 * inv_rms[:, None]).to(h.dtype).to(tl.float32)
        nw = tl.load(nw_ptr + cols, mask=cols < hidden, other=0.0).to(h.dtype).to(tl.float32)
        return (nw[None, :] * normed).to(h.dtype), h

    @triton.jit
    def _multiply_add(acc, w, a, DOT: tl.constexpr):
        """acc [BN, BM] += w [BN, BK] @ a.T ([BM, BK]), float32 sums."""
        if DOT:
            acc = tl.dot(w, tl.trans(a.to(w.dtype)), acc)
        else:
            acc += tl.sum(w.to(tl.float32)[:, None, :] * a.to(tl.float32)[None, :, :], axis=2)
        return acc

    @triton.jit
    def _silu_mul(acc_gate, acc_up, a_ptr):
        """silu(gate) * up of float32 sums in a_ptr's dtype, rounded where `reference.silu_and_mul` of the
        rounded gate and up rounds."""
        dtype = a_ptr.dtype.element_ty
        g32 = acc_gate.to(dtype).to(tl.float32)
        silu = (g32 / (1.0 + tl.exp(-g32))).to(dtype).to(tl.float32)
        return (silu * acc_up.to(dtype).to(tl.float32)).to(dtype)

    @triton.jit
    def _publish(counters_ptr, block, BN1: tl.constexpr, CK: tl.constexpr):
        """Counts phase-1 block `block` into its chunk's counter once all of this program's stores of it are
        done (the barrier), with release semantics."""
        tl.debug_barrier()
        tl.atomic_add(counters_ptr + (block * BN1) // CK, 1, sem="release", scope="gpu")

    @triton.jit
    def _wait_chunk(counters_ptr, status_ptr, c, inter, BN1: tl.constexpr, CK: tl.constexpr,
                    SPIN_LIMIT: tl.constexpr):
        """Spins (acquire) until chunk c's counter holds all of its phase-1 blocks, at most SPIN_LIMIT polls; a
        wait that gives up is recorded in the status word."""
        target = tl.cdiv(tl.minimum(inter - c * CK, CK), BN1)
        seen = tl.atomic_add(counters_ptr + c, 0, sem="acquire", scope="gpu")
        polls = seen * 0
        while (seen < target) & (polls < SPIN_LIMIT):
            seen = tl.atomic_add(counters_ptr + c, 0, sem="acquire", scope="gpu")
            polls += 1
        if seen < target:
            tl.atomic_xchg(status_ptr, 1, sem="relaxed", scope="gpu")

    @triton.jit
    def _phase1(x_ptr, res_ptr, nw_ptr, wgu_ptr, a_ptr, new_res_ptr, counters_ptr, gate, up,
                M, hidden, inter, eps, stride_xm, stride_rm, stride_am, stride_nm, stride_gu,
                HAS_RESIDUAL: tl.constexpr, SIGNAL: tl.constexpr, BM: tl.constexpr, BN1: tl.constexpr,
                BK1: tl.constexpr, CK: tl.constexpr, DOT: tl.constexpr):
        """This program's phase-1 blocks (pid, pid + P, ...): a[:, block] = silu(gate) * up of the normed x,
        `gate`, `up` being the first block's weights (already in flight). SIGNAL: count each into its chunk."""
        pid, num_programs = tl.program_id(0), tl.num_programs(0)
        act, h = _normed_x(x_ptr, res_ptr, nw_ptr, M, hidden, eps, stride_xm, stride_rm, HAS_RESIDUAL, BM, BK1)
        rows_m = tl.arange(0, BM)
        if HAS_RESIDUAL:
            if pid == 0:
                cols = tl.arange(0, BK1)
                tl.store(new_res_ptr + rows_m[:, None] * stride_nm + cols[None, :], h,
                         mask=(rows_m < M)[:, None] & (cols < hidden)[None, :])
        for block in range(pid, tl.cdiv(inter, BN1), num_programs):
            gate_next, up_next = _load_gate_up(wgu_ptr, block + num_programs, inter, hidden, stride_gu, BN1, BK1)
            acc_gate = _multiply_add(tl.zeros([BN1, BM], tl.float32), gate, act, DOT)
            acc_up = _multiply_add(tl.zeros([BN1, BM], tl.float32), up, act, DOT)
            cols_a, col_mask = _rows(block, inter, BN1)
            tl.store(a_ptr + rows_m[None, :] * stride_am + cols_a[:, None], _silu_mul(acc_gate, acc_up, a_ptr),
                     mask=col_mask[:, None] & (rows_m < M)[None, :])
            if SIGNAL:
                _publish(counters_ptr, block, BN1, CK)
            gate, up = gate_next, up_next

    @triton.jit
    def _phase2(a_ptr, wd_ptr, y_ptr, counters_ptr, status_ptr, w, M, hidden, inter, stride_am, stride_ym, stride_d,
                WAIT: tl.constexpr, BM: tl.constexpr, BN1: tl.constexpr, BN2: tl.constexpr, CK: tl.constexpr,
                DOT: tl.constexpr, SPIN_LIMIT: tl.constexpr):
        """This program's down_proj row blocks (P-1-pid, 2P-1-pid, ...), chunk after chunk: y = a @ Wd.T, `w`
        being the first step's weights (already in flight). WAIT: in the first block, wait for each chunk of a."""
        pid, num_programs = tl.program_id(0), tl.num_programs(0)
        first = num_programs - 1 - pid
        chunks = tl.cdiv(inter, CK)
        steps = tl.cdiv(tl.cdiv(hidden, BN2) - first, num_programs) * chunks  # ≤ 0: no block here
        rows_m = tl.arange(0, BM)
        acc = tl.zeros([BN2, BM], tl.float32)
        for t in range(0, steps):
            w_next = _load_down(wd_ptr, t + 1, first, num_programs, chunks, hidden, inter, stride_d, BN2, CK)
            c = t % chunks
            if WAIT:
                if t < chunks:  # the first block: this chunk of a may not be complete yet
                    _wait_chunk(counters_ptr, status_ptr, c, inter, BN1, CK, SPIN_LIMIT)
            cols, col_mask = _rows(c, inter, CK)
            a = tl.load(a_ptr + rows_m[:, None] * stride_am + cols[None, :],
                        mask=(rows_m < M)[:, None] & col_mask[None, :], other=0.0, cache_modifier=".cg")
            acc = _multiply_add(acc, w, a, DOT)
            if c == chunks - 1:
                rows, row_mask = _rows(first + (t // chunks) * num_programs, hidden, BN2)
                tl.store(y_ptr + rows_m[None, :] * stride_ym + rows[:, None], acc.to(y_ptr.dtype.element_ty),
                         mask=row_mask[:, None] & (rows_m < M)[None, :])
                acc = tl.zeros([BN2, BM], tl.float32)
            w = w_next

    @triton.jit
    def _retire(counters_ptr, exit_ptr, CK: tl.constexpr, inter):
        """Takes the exit ticket once this program is done with the counters; the last program to take it (every
        other program is past its waits) zeroes the counters and the ticket for the next launch."""
        tl.debug_barrier()
        ticket = tl.atomic_add(exit_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == tl.num_programs(0) - 1:
            for c in range(0, tl.cdiv(inter, CK)):
                tl.atomic_xchg(counters_ptr + c, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(exit_ptr, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _first_down(wd_ptr, hidden, inter, stride_d, BN2: tl.constexpr, CK: tl.constexpr):
        """The first phase-2 step's weights of this program: [BN2, CK]."""
        pid, num_programs = tl.program_id(0), tl.num_programs(0)
        return _load_down(wd_ptr, 0, num_programs - 1 - pid, num_programs, tl.cdiv(inter, CK), hidden, inter,
                          stride_d, BN2, CK)

    @triton.jit(do_not_specialize=["M"])
    def _fused_mlp_kernel(x_ptr, res_ptr, nw_ptr, wgu_ptr, wd_ptr, a_ptr, y_ptr, new_res_ptr,
                          counters_ptr, exit_ptr, status_ptr, M, hidden, inter, eps,
                          stride_xm, stride_rm, stride_am, stride_ym, stride_nm, stride_gu, stride_d,
                          HAS_RESIDUAL: tl.constexpr, PHASES: tl.constexpr, BM1: tl.constexpr, BM2: tl.constexpr,
                          BN1: tl.constexpr, BN2: tl.constexpr, BK1: tl.constexpr, CK: tl.constexpr,
                          DOT1: tl.constexpr, DOT2: tl.constexpr, SPIN_LIMIT: tl.constexpr, USE_PDL: tl.constexpr):
        """Persistent program pid of P: its phase-1 blocks, then its phase-2 blocks (PHASES=0, flags between
        them), or only one phase of the two (PHASES=1, 2: one launch each, no flags). Its first weight loads
        go out before the wait for the previous kernel."""
        if PHASES == 2:
            w = _first_down(wd_ptr, hidden, inter, stride_d, BN2, CK)
            pdl_start(USE_PDL)
            _phase2(a_ptr, wd_ptr, y_ptr, counters_ptr, status_ptr, w, M, hidden, inter, stride_am, stride_ym,
                    stride_d, False, BM2, BN1, BN2, CK, DOT2, SPIN_LIMIT)
        else:
            gate, up = _load_gate_up(wgu_ptr, tl.program_id(0), inter, hidden, stride_gu, BN1, BK1)
            pdl_start(USE_PDL)
            _phase1(x_ptr, res_ptr, nw_ptr, wgu_ptr, a_ptr, new_res_ptr, counters_ptr, gate, up, M, hidden, inter,
                    eps, stride_xm, stride_rm, stride_am, stride_nm, stride_gu, HAS_RESIDUAL, PHASES == 0, BM1,
                    BN1, BK1, CK, DOT1)
            if PHASES == 0:
                w = _first_down(wd_ptr, hidden, inter, stride_d, BN2, CK)
                _phase2(a_ptr, wd_ptr, y_ptr, counters_ptr, status_ptr, w, M, hidden, inter, stride_am, stride_ym,
                        stride_d, True, BM2, BN1, BN2, CK, DOT2, SPIN_LIMIT)
                _retire(counters_ptr, exit_ptr, CK, inter)


def _check(x2: torch.Tensor, norm_weight: torch.Tensor, gate_up_weight: torch.Tensor, down_weight: torch.Tensor,
           config: FusedMlpConfig, num_programs: int | None) -> int:
    """The grid a call runs, after the checks of its operands, tiles and grid (ValueError naming what is wrong)."""
    m, hidden = x2.shape
    inter = down_weight.shape[1] if down_weight.dim() == 2 else -1
    if not 1 <= m <= FUSED_MLP_MAX_M:
        raise ValueError(f"fused_mlp: x has {m} rows, the kernel takes 1..{FUSED_MLP_MAX_M}")
    if gate_up_weight.shape != (2 * inter, hidden) or down_weight.shape != (hidden, inter):
        raise ValueError(f"fused_mlp: gate_up_weight {tuple(gate_up_weight.shape)} and down_weight "
                         f"{tuple(down_weight.shape)} do not fit x's {hidden} columns ([2I, H] and [H, I])")
    if norm_weight.shape != (hidden,):
        raise ValueError(f"fused_mlp: norm_weight {tuple(norm_weight.shape)} for x's {hidden} columns")
    if gate_up_weight.stride(-1) != 1 or down_weight.stride(-1) != 1:
        raise ValueError("fused_mlp: the weights' rows must be contiguous")
    if len({x2.dtype, gate_up_weight.dtype, down_weight.dtype}) != 1:
        raise ValueError(f"fused_mlp: x, gate_up_weight and down_weight differ in dtype ({x2.dtype}, "
                         f"{gate_up_weight.dtype}, {down_weight.dtype})")
    if not INTERPRET and (not x2.is_cuda or x2.dtype not in (torch.bfloat16, torch.float16)):
        raise ValueError(f"fused_mlp: needs bf16 or fp16 CUDA tensors, got {x2.dtype} on {x2.device}")
    _check_config(config, inter)
    sms = sm_count(x2.device)
    if num_programs is None:
        return default_num_programs(sms, -(-inter // config.block_n1), 4 * config.block_n1 * hidden,
                                    -(-hidden // config.block_n2), 2 * config.block_n2 * inter)
    if not 1 <= num_programs <= sms:
        raise ValueError(f"fused_mlp: num_programs={num_programs}: 1..{sms} (the SM count: every program must be "
                         "resident at once, or a wait could deadlock)")
    return num_programs


def _check_config(config: FusedMlpConfig, inter: int) -> None:
    sizes = {"block_n1": config.block_n1, "block_n2": config.block_n2, "chunk": config.chunk}
    for name, size in sizes.items():
        if size < 1 or size & (size - 1):
            raise ValueError(f"fused_mlp: {name}={size} is not a power of two")
    if config.chunk < config.block_n1:
        raise ValueError(f"fused_mlp: chunk={config.chunk} holds no whole phase-1 block of {config.block_n1}")
    if (config.dot1 and config.block_n1 < 16) or (config.dot2 and config.block_n2 < 16):
        raise ValueError(f"fused_mlp: tensor cores need 16 rows per block ({config})")
    if -(-inter // config.chunk) > MAX_CHUNKS:
        raise ValueError(f"fused_mlp: {inter} columns make more than {MAX_CHUNKS} chunks of {config.chunk}")


def fused_mlp(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
              gate_up_weight: torch.Tensor, down_weight: torch.Tensor, *, num_programs: int | None = None,
              config: FusedMlpConfig | None = None, two_launches: bool | None = None,
              compile_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.rms_norm_mlp` for x [M ≤ 8, H] in one launch: returns (down_proj(silu(gate) * up) [M, H], the
    residual stream: x + residual, or x itself without a residual), the weights [2I, H] (gate first) and [H, I].

    `num_programs`: the persistent grid (≤ the SM count; default: the most even split of the weight bytes);
    `two_launches`: phase 1 and phase 2 as two launches without flags (default: only under the interpreter);
    `compile_only`: compile without running (a sweep compiles its candidates in parallel first)."""
    require_triton("r1serve.kernels.reference.rms_norm_mlp")
    config = config or FusedMlpConfig()
    x2 = triton_ops.as_rows(x)  # [M, H]
    grid = _check(x2, norm_weight, gate_up_weight, down_weight, config, num_programs)
    m, hidden = x2.shape
    inter = down_weight.shape[1]
    res2 = triton_ops.as_rows(residual) if residual is not None else x2
    new_res = torch.empty_like(x2) if residual is not None else x2
    act = torch.empty((m, inter), dtype=x.dtype, device=x.device)  # [M, I]: silu(gate) * up
    y = torch.empty((m, hidden), dtype=x.dtype, device=x.device)  # [M, H]
    flags = flags_workspace(x.device)
    two = INTERPRET if two_launches is None else two_launches or INTERPRET
    bm1 = 16 if config.dot1 else _pow2(m)
    bm2 = 16 if config.dot2 else _pow2(m)
    kernel = _fused_mlp_kernel[(grid,)] if not compile_only else \
        functools.partial(_fused_mlp_kernel.warmup, grid=(grid,))
    for phases in (PHASES_FIRST, PHASES_SECOND) if two else (PHASES_BOTH,):
        kernel(x2, res2, norm_weight, gate_up_weight, down_weight, act, y, new_res,
               flags[:MAX_CHUNKS], flags[MAX_CHUNKS:], flags[MAX_CHUNKS + 1:], m, hidden, inter, eps,
               x2.stride(0), res2.stride(0), act.stride(0), y.stride(0), new_res.stride(0),
               gate_up_weight.stride(0), down_weight.stride(0),
               HAS_RESIDUAL=residual is not None, PHASES=phases, BM1=bm1, BM2=bm2, BN1=config.block_n1,
               BN2=config.block_n2, BK1=_pow2(hidden), CK=config.chunk, DOT1=config.dot1, DOT2=config.dot2,
               SPIN_LIMIT=SPIN_LIMIT, USE_PDL=triton_ops.use_pdl(), num_warps=config.warps,
               **triton_ops.pdl_launch())
    return y.view(x.shape), new_res.view(x.shape) if residual is not None else x
