"""Token sampling on the GPU in one Triton kernel (plus a memset for small batches), never synchronising with
the host.

Why: the torch sampler (`engine/sampler.py`) makes several passes over the [B, 151936] logits, asks the host
whether 256 candidates cover top-p (a synchronisation; a whole-row sort when they do not) and draws each seeded
row with its own generator (a launch per row). Asynchronous scheduling and CUDA graphs need sampling that never
waits for the host and whose randomness is device data: here a row's token is a pure function of its logits,
its parameters and its 63-bit seed, whatever else is in the batch.

How (docs/kernels.md has the long version): semantics are those of the torch path: logits / temperature, keep
a token if fewer than top_k tokens are strictly more likely and their probability mass (of the whole row) is
below top_p, and if its probability is at least min_p times the largest; draw from the kept tokens
renormalised. The kept set K is "upward closed" (if a token is kept, so is every more likely one), so exact
rejection with a rising pivot needs no sort: draw a token c from the row restricted to {y > pivot} (y: the
log2-probability up to a constant); if c is in K it is the answer (a draw from p restricted to a superset of K,
conditioned to land in K, is a draw from p restricted to K); otherwise no token at most as likely as c is in K,
so the pivot rises to c and the row is drawn again. Pass 0 finds the row's maximum, its argmax (greedy rows stop
there) and round 0's draw; each later pass computes, for the pivot (the last draw), the mass and count of the
tokens above it (its acceptance test) and the next draw among them (used if the test fails). A draw equal to
the maximum, or any draw when neither top-p nor top-k is set, needs no test. A flat row with top_p 0.95 takes
about 2 passes, a peaked one 1. After MAX_ROUNDS rejections (no test reaches it: each round accepts with
probability at least the kept mass, and the pivot's mass halves on average) the most likely token is returned,
which is always in K.

A draw is a two-stage exponential race (argmax of log2(weight) - log2(E), E ~ Exp(1) from Philox keyed by the
row's seed): a group of 32 tokens by its mass of candidates, then a token of the winning group by its weight,
which is exact and needs random numbers and logarithms per group, not per token. Group masses are added as
2**-40 fixed-point integers and every race breaks ties towards the smaller index, so every result is
independent of how a row is split between programs. A small batch spreads each row over several programs (at
most one per SM in all, so that they are all resident) that meet between passes at a barrier of atomics; a
batch of more than half as many rows as SMs runs one program per row. Triton is imported lazily: this module imports
without it, and calling `sample` there raises a RuntimeError.
"""

from __future__ import annotations

import functools

import torch

from r1serve.kernels.triton_support import HAS_TRITON, require_triton, tl, triton

__all__ = ["BLOCK", "HAS_TRITON", "LANES", "MAX_ROUNDS", "programs_per_row", "sample"]

BLOCK = 4096  # tokens per tile: 32 rows of LANES; a lane's column of 32 tokens is a group
LANES = 128  # one lane per thread
NUM_WARPS = LANES // 32
MAX_ROUNDS = 32  # rejection rounds before the fallback to the most likely token
MAX_VOCAB = 1 << 20  # the Philox counters pack (round, group or token) into 32 bits
MAX_SPLIT = 128  # programs per row at most (one compiled variant merges up to this many partial answers)


if triton is not None:
    _NONE = tl.constexpr(2**31 - 1)  # "no token"
    _LOG2E = tl.constexpr(1.4426950408889634)
    _FIXED_ONE = tl.constexpr(1099511627776.0)  # 2**40: the fixed-point unit of the group masses
    _ROUND_STRIDE = tl.constexpr(1 << 22)  # Philox counters of round r: r * 2**22 + group; + 2**21 + token

    @triton.jit
    def _exponential(r):
        """An Exp(1) variate from a random 32-bit word: -ln(1 - w), w uniform in (0, 1) at 2**-32 resolution.

        Accurate to full relative precision near 0, where races are won: below w = 1/8 by its series (8 terms,
        truncation < 1e-8 relative), above by log2 of 1 - w <= 7/8."""
        bits = r.to(tl.int32, bitcast=True)
        hi = (((bits >> 16) & 0xFFFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        lo = ((bits & 0xFFFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        w = hi * 1.52587890625e-05 + (lo + 0.5) * 2.3283064365386963e-10
        series = w * (1.0 + w * (0.5 + w * (0.3333333333333333 + w * (0.25 + w * (0.2 + w * (
            0.16666666666666666 + w * (0.14285714285714285 + w * 0.125)))))))
        direct = -0.6931471805599453 * tl.log2(1.0 - w)
        return tl.where(w < 0.125, series, direct)

    @triton.jit
    def _race_key(log2_weight, seed, counter):
        """Key of an item of weight 2**log2_weight in the exponential race: log2(weight / E), E ~ Exp(1) from
        Philox word 0 of (seed, counter). The largest key wins with probability weight / (sum of weights)."""
        return log2_weight - tl.log2(_exponential(tl.randint(seed, counter)))

    @triton.jit
    def _best(key, idx, best_key, best_idx):
        """Lane by lane, the larger key; a tie keeps the earlier item (each lane sees its items in order)."""
        win = key > best_key
        return tl.where(win, key, best_key), tl.where(win, idx, best_idx)

    @triton.jit
    def _top(key, idx):
        """The largest key and the smallest index among its ties: the same answer however the row is split."""
        top = tl.max(key, 0)
        return top, tl.min(tl.where(key == top, idx, _NONE), 0)

    @triton.jit
    def _fixed(group_sum):
        """Per-group float sums (at most 32) as integers of 2**-40: exact to add in any order."""
        return (group_sum * _FIXED_ONE).to(tl.int64)

    @triton.jit
    def _load_tile(row_ptr, tile, tile_hi, V, BLOCK: tl.constexpr, LANES: tl.constexpr):
        """A tile as [BLOCK // LANES, LANES] logits, one load (all in flight at once); -inf past the row's end and
        past this program's last tile. Row starts are not known to be aligned, so each load moves one element and
        the compiler lays a lane's whole column (its group) in one thread: reductions over axis 0 stay in-thread."""
        cols = tile * BLOCK + tl.arange(0, BLOCK // LANES)[:, None] * LANES + tl.arange(0, LANES)[None, :]
        return tl.load(row_ptr + cols, mask=(cols < V) & (tile < tile_hi), other=float("-inf"))

    @triton.jit
    def _first_pass(row_ptr, V, tile_lo, tile_hi, scale, seed, BLOCK: tl.constexpr, LANES: tl.constexpr):
        """Pass 0 over this program's tiles: the largest logit and its first index, and the group that wins
        round 0's race over all groups, weighted by its probability mass (2**max times the sum of 2**(y - max)).

        A tile is BLOCK // LANES rows of LANES tokens; group `lane` of a tile is that lane's column, held by one
        thread, so every per-group reduction stays in its thread and the random numbers are per group. The next
        tile is loaded while this one is computed."""
        best_x = tl.full([LANES], float("-inf"), tl.float32)
        best_xi = tl.full([LANES], _NONE, tl.int32)
        best_k = tl.full([LANES], float("-inf"), tl.float32)
        best_kg = tl.full([LANES], _NONE, tl.int32)
        lanes = tl.arange(0, LANES)
        rows = _load_tile(row_ptr, tile_lo, tile_hi, V, BLOCK, LANES)
        for tile in range(tile_lo, tile_hi):
            following = _load_tile(row_ptr, tile + 1, tile_hi, V, BLOCK, LANES)
            x = rows.to(tl.float32)
            x_top, r_top = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
            best_x, best_xi = _best(x_top, tile * BLOCK + r_top * LANES + lanes, best_x, best_xi)
            top = x_top * scale  # scale > 0: the group's largest y
            ref = tl.where(top == float("-inf"), 0.0, top)  # no -inf - -inf
            mass = tl.sum(tl.exp2(x * scale - ref[None, :]), 0)  # sum of 2**(y - top) over the group
            gid = tile * LANES + lanes
            best_k, best_kg = _best(_race_key(top + tl.log2(mass), seed, gid), gid, best_k, best_kg)
            rows = following
        x_max, x_arg = _top(best_x, best_xi)
        k_max, k_group = _top(best_k, best_kg)
        return x_max, x_arg, k_max, k_group

    @triton.jit
    def _stats_pass(row_ptr, V, tile_lo, tile_hi, scale, seed, rnd, pivot, lo, y_max, BLOCK: tl.constexpr,
                    LANES: tl.constexpr):
        """Pass `rnd` >= 1 over this program's tiles: the total weight 2**(y - y_max), the weight and count of the
        tokens above the pivot, and the group that wins round `rnd`'s race, weighted by its mass of candidates
        (tokens above the pivot that min-p keeps)."""
        best_k = tl.full([LANES], float("-inf"), tl.float32)
        best_kg = tl.full([LANES], _NONE, tl.int32)
        count = tl.zeros([LANES], tl.int32)
        total = tl.zeros([LANES], tl.int64)
        mass = tl.zeros([LANES], tl.int64)
        lanes = tl.arange(0, LANES)
        rows = _load_tile(row_ptr, tile_lo, tile_hi, V, BLOCK, LANES)
        for tile in range(tile_lo, tile_hi):
            following = _load_tile(row_ptr, tile + 1, tile_hi, V, BLOCK, LANES)
            y = rows.to(tl.float32) * scale
            above = y > pivot
            w = tl.exp2(y - y_max)
            g_all = tl.sum(w, 0)
            g_above = tl.sum(tl.where(above, w, 0.0), 0)
            g_cand = tl.sum(tl.where(above & (y >= lo), w, 0.0), 0)
            count += tl.sum(above.to(tl.int32), 0)
            total += _fixed(g_all)
            mass += _fixed(g_above)
            gid = tile * LANES + lanes
            best_k, best_kg = _best(_race_key(tl.log2(g_cand), seed, rnd * _ROUND_STRIDE + gid), gid, best_k,
                                    best_kg)
            rows = following
        k_max, k_group = _top(best_k, best_kg)
        return k_max, k_group, tl.sum(count, 0), tl.sum(total, 0), tl.sum(mass, 0)

    @triton.jit
    def _draw_in_group(row_ptr, group, V, scale, pivot, lo, seed, rnd, BLOCK: tl.constexpr, LANES: tl.constexpr):
        """The token of `group` drawn among its candidates (y > pivot, y >= lo) by a race with its own random
        words (the second half of the round's counters); _NONE if there is no group or no candidate in it."""
        r = tl.arange(0, BLOCK // LANES)
        g = tl.where(group == _NONE, 0, group)
        cols = (g // LANES) * BLOCK + r * LANES + g % LANES
        x = tl.load(row_ptr + cols, mask=(group != _NONE) & (cols < V), other=float("-inf"))
        y = x.to(tl.float32) * scale
        counter = rnd * _ROUND_STRIDE + _ROUND_STRIDE // 2 + cols
        key = tl.where((y > pivot) & (y >= lo), _race_key(y, seed, counter), float("-inf"))
        best, token = _top(key, cols)
        return tl.where(best > float("-inf"), token, _NONE)

    @triton.jit
    def _slot(row, rnd, part, MAX_ROUNDS: tl.constexpr, P_PAD: tl.constexpr):
        """Workspace slot of (row, round, program): every round has its own, so no slot is written twice."""
        return (row.to(tl.int64) * (MAX_ROUNDS + 1) + rnd) * P_PAD + part

    @triton.jit
    def _barrier(flags_ptr, row, part, num_progs, stage, P_PAD: tl.constexpr):
        """The programs of one row meet: publish this program's stage (release), wait until every program of the
        row has published it (acquire). Needs them all resident at once, which the launch guarantees."""
        tl.debug_barrier()  # every thread's workspace stores come before the release
        tl.atomic_xchg(flags_ptr + row * P_PAD + part, stage, sem="release", scope="gpu")
        offs = tl.arange(0, P_PAD)
        live = offs < num_progs
        ptrs = flags_ptr + row * P_PAD + offs
        seen = tl.min(tl.where(live, tl.atomic_add(ptrs, 0, mask=live, sem="acquire", scope="gpu"), stage), 0)
        while seen < stage:
            seen = tl.min(tl.where(live, tl.atomic_add(ptrs, 0, mask=live, sem="acquire", scope="gpu"), stage), 0)
        tl.debug_barrier()

    @triton.jit
    def _share_first(wsf_ptr, wsi_ptr, flags_ptr, row, part, num_progs, x_max, x_arg, k_max, k_arg,
                     MAX_ROUNDS: tl.constexpr, P_PAD: tl.constexpr):
        """Publishes pass 0's partial answer (max, argmax, race key, its group) and merges those of all the row's
        programs, the same way in each."""
        s = _slot(row, 0, part, MAX_ROUNDS, P_PAD)
        tl.store(wsf_ptr + 2 * s, x_max)
        tl.store(wsf_ptr + 2 * s + 1, k_max)
        tl.store(wsi_ptr + 4 * s, x_arg.to(tl.int64))
        tl.store(wsi_ptr + 4 * s + 1, k_arg.to(tl.int64))
        _barrier(flags_ptr, row, part, num_progs, part * 0 + 1, P_PAD)
        offs = tl.arange(0, P_PAD)
        live = offs < num_progs
        s = _slot(row, 0, 0, MAX_ROUNDS, P_PAD) + offs
        xs = tl.load(wsf_ptr + 2 * s, mask=live, other=float("-inf"), cache_modifier=".cg")
        ks = tl.load(wsf_ptr + 2 * s + 1, mask=live, other=float("-inf"), cache_modifier=".cg")
        xis = tl.load(wsi_ptr + 4 * s, mask=live, other=_NONE, cache_modifier=".cg").to(tl.int32)
        kis = tl.load(wsi_ptr + 4 * s + 1, mask=live, other=_NONE, cache_modifier=".cg").to(tl.int32)
        x_max, x_arg = _top(xs, xis)
        k_max, k_arg = _top(ks, kis)
        return x_max, x_arg, k_max, k_arg

    @triton.jit
    def _share_stats(wsf_ptr, wsi_ptr, flags_ptr, row, part, num_progs, rnd, k_max, k_arg, count, total, mass,
                     MAX_ROUNDS: tl.constexpr, P_PAD: tl.constexpr):
        """Publishes a later pass's partial answer and merges those of all the row's programs."""
        s = _slot(row, rnd, part, MAX_ROUNDS, P_PAD)
        tl.store(wsf_ptr + 2 * s, k_max)
        tl.store(wsi_ptr + 4 * s, k_arg.to(tl.int64))
        tl.store(wsi_ptr + 4 * s + 1, count.to(tl.int64))
        tl.store(wsi_ptr + 4 * s + 2, total)
        tl.store(wsi_ptr + 4 * s + 3, mass)
        _barrier(flags_ptr, row, part, num_progs, rnd + 1, P_PAD)
        offs = tl.arange(0, P_PAD)
        live = offs < num_progs
        s = _slot(row, rnd, 0, MAX_ROUNDS, P_PAD) + offs
        ks = tl.load(wsf_ptr + 2 * s, mask=live, other=float("-inf"), cache_modifier=".cg")
        kis = tl.load(wsi_ptr + 4 * s, mask=live, other=_NONE, cache_modifier=".cg").to(tl.int32)
        counts = tl.load(wsi_ptr + 4 * s + 1, mask=live, other=0, cache_modifier=".cg")
        totals = tl.load(wsi_ptr + 4 * s + 2, mask=live, other=0, cache_modifier=".cg")
        masses = tl.load(wsi_ptr + 4 * s + 3, mask=live, other=0, cache_modifier=".cg")
        k_max, k_arg = _top(ks, kis)
        return k_max, k_arg, tl.sum(counts, 0).to(tl.int32), tl.sum(totals, 0), tl.sum(masses, 0)

    @triton.jit(do_not_specialize=["row_stride", "V", "num_tiles", "tiles_per_prog", "num_progs"])  # few compiles
    def _sample_kernel(logits_ptr, row_stride, temperature_ptr, top_p_ptr, top_k_ptr, min_p_ptr, seeds_ptr,
                       out_ptr, passes_ptr, flags_ptr, wsf_ptr, wsi_ptr, V, num_tiles, tiles_per_prog, num_progs,
                       BLOCK: tl.constexpr, LANES: tl.constexpr, MAX_ROUNDS: tl.constexpr, SPLIT: tl.constexpr,
                       P_PAD: tl.constexpr):
        """Program (row, part): tiles [part * tiles_per_prog, ...) of the row; part 0 writes the token and the
        number of passes it made."""
        row = tl.program_id(0)
        part = tl.program_id(1)
        row_ptr = logits_ptr + row.to(tl.int64) * row_stride
        temperature = tl.load(temperature_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        top_k = tl.load(top_k_ptr + row)
        min_p = tl.load(min_p_ptr + row)
        seed = tl.load(seeds_ptr + row)
        sampled = temperature > 0.0
        scale = _LOG2E / tl.where(sampled, temperature, 1.0)  # y = logit * scale: log2-probability + constant
        tile_lo = part * tiles_per_prog
        tile_hi = tl.minimum(tile_lo + tiles_per_prog, num_tiles)

        x_max, x_arg, k_max, group = _first_pass(row_ptr, V, tile_lo, tile_hi, scale, seed, BLOCK, LANES)
        if SPLIT:
            x_max, x_arg, k_max, group = _share_first(wsf_ptr, wsi_ptr, flags_ptr, row, part, num_progs, x_max,
                                                      x_arg, k_max, group, MAX_ROUNDS, P_PAD)
        cand = _draw_in_group(row_ptr, group, V, scale, float("-inf"), float("-inf"), seed, part * 0, BLOCK, LANES)
        y_max = x_max * scale
        lo = tl.where(min_p > 0.0, y_max + tl.log2(min_p), float("-inf"))  # min-p: keep y >= lo
        k_cap = tl.where((top_k > 0) & (top_k < V), top_k, V + 1)
        cut = (top_p < 1.0) | (k_cap <= V)  # can top-p or top-k reject a token?
        found = cand < V
        y_c = tl.load(row_ptr + tl.minimum(cand, V - 1)).to(tl.float32) * scale
        quick = found & ((y_c == y_max) | (~cut & (y_c >= lo)))  # accepted without a test
        plain = sampled & (k_cap != 1)
        done = ~plain | quick | ~found
        result = tl.where(plain & quick, cand, x_arg)
        rnd = part * 0 + 1  # passes made so far
        while (~done) & (rnd <= MAX_ROUNDS):
            k_max, group, count, total, mass = _stats_pass(row_ptr, V, tile_lo, tile_hi, scale, seed, rnd, y_c, lo,
                                                           y_max, BLOCK, LANES)
            if SPLIT:
                k_max, group, count, total, mass = _share_stats(wsf_ptr, wsi_ptr, flags_ptr, row, part, num_progs,
                                                                rnd, k_max, group, count, total, mass, MAX_ROUNDS,
                                                                P_PAD)
            in_p = (top_p >= 1.0) | (mass.to(tl.float64) < top_p.to(tl.float64) * total.to(tl.float64))
            keep = (y_c >= lo) & in_p & (count < k_cap)
            nxt = _draw_in_group(row_ptr, group, V, scale, y_c, lo, seed, rnd, BLOCK, LANES)
            found = nxt < V
            y_n = tl.load(row_ptr + tl.minimum(nxt, V - 1)).to(tl.float32) * scale
            quick = ~keep & found & ((y_n == y_max) | (~cut & (y_n >= lo)))
            result = tl.where(keep, cand, tl.where(quick, nxt, result))
            done = keep | quick | ~found
            cand = nxt
            y_c = y_n
            rnd += 1
        tl.store(out_ptr + row, result.to(tl.int64), mask=part == 0)  # past MAX_ROUNDS: still the argmax
        tl.store(passes_ptr + row, rnd, mask=part == 0)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def programs_per_row(batch: int, vocab: int, sms: int, max_split: int | None = None) -> tuple[int, int]:
    """(programs per row, tiles per program). A small batch spreads each row over several programs, all resident
    at once (batch x programs <= SMs: they wait for each other between passes); the split depends only on the
    shapes and the device, never on the data, so a CUDA graph captures it."""
    tiles = -(-vocab // BLOCK)
    split = max(1, min(tiles, MAX_SPLIT, sms // max(batch, 1), max_split if max_split is not None else tiles))
    per_program = -(-tiles // split)
    return -(-tiles // per_program), per_program


def _check(logits: torch.Tensor, params: dict[str, tuple[torch.Tensor, torch.dtype]]) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"sample: logits must be [B, V] with contiguous rows, got {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"sample: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if not 0 < logits.shape[1] < MAX_VOCAB:
        raise ValueError(f"sample: vocabulary size must be in [1, {MAX_VOCAB}), got {logits.shape[1]}")
    for name, (t, dtype) in params.items():
        if t.shape != (logits.shape[0],) or t.dtype != dtype or t.device != logits.device or t.stride(0) != 1:
            raise ValueError(f"sample: {name} must be a contiguous [{logits.shape[0]}] {dtype} tensor on "
                             f"{logits.device}, got {tuple(t.shape)} {t.dtype} on {t.device}")


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           min_p: torch.Tensor, seeds: torch.Tensor, *, max_split: int | None = None,
           passes: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] (float32 or bf16, contiguous rows), temperature [B] float32 (0 = greedy: argmax),
    top_p [B] float32 (1.0 = off), top_k [B] int64 (<= 0 or >= V = off), min_p [B] float32 (0 = off),
    seeds [B] int64 (any 63-bit value; the row's whole randomness comes from it) -> token ids [B] int64.

    One kernel launch (two when rows are split over several programs: the barrier flags are zeroed first), no
    host synchronisation, CUDA-graph capturable. `max_split` caps the programs per row (1: never split);
    `passes`, an optional [B] int32 tensor, receives the number of passes each row made over its logits."""
    require_triton("r1serve.engine.sampler.Sampler")
    _check(logits, {"temperature": (temperature, torch.float32), "top_p": (top_p, torch.float32),
                    "top_k": (top_k, torch.int64), "min_p": (min_p, torch.float32), "seeds": (seeds, torch.int64)})
    batch, vocab = logits.shape
    device = logits.device
    out = torch.empty(batch, dtype=torch.int64, device=device)
    if batch == 0:
        return out
    if passes is None:
        passes = torch.empty(batch, dtype=torch.int32, device=device)
    elif passes.shape != (batch,) or passes.dtype != torch.int32 or passes.device != device:
        raise ValueError(f"sample: passes must be a [{batch}] int32 tensor on {device}")
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 1
    split, per_program = programs_per_row(batch, vocab, sms, max_split)
    if split > 1:
        flags = torch.zeros(batch * MAX_SPLIT, dtype=torch.int32, device=device)
        slots = batch * (MAX_ROUNDS + 1) * MAX_SPLIT
        wsf = torch.empty(2 * slots, dtype=torch.float32, device=device)
        wsi = torch.empty(4 * slots, dtype=torch.int64, device=device)
    else:
        flags, wsf, wsi = out, out, out  # not touched by the one-program-per-row kernel
    _sample_kernel[(batch, split)](
        logits, logits.stride(0), temperature, top_p, top_k, min_p, seeds, out, passes, flags, wsf, wsi, vocab,
        triton.cdiv(vocab, BLOCK), per_program, split, BLOCK=BLOCK, LANES=LANES, MAX_ROUNDS=MAX_ROUNDS,
        SPLIT=split > 1, P_PAD=MAX_SPLIT, num_warps=NUM_WARPS, num_stages=1)
    return out
