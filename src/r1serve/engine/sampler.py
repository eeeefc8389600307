"""Turns a batch of logits into next tokens, each row with its own sampling parameters.

Order: penalties (repetition on prompt and output, presence and frequency on output), `min_tokens` (end
tokens masked), then greedy rows take the argmax and the others are scaled by temperature, cut by top-k,
top-p and min-p, and drawn with the exponential-race trick (argmax of p / q, q ~ Exp(1)). Every row draws its
randomness from its own 63-bit seed: for a request with a seed, a hash of (seed, sample index, token position),
so the same seed gives the same output whatever else is in the batch and however the steps were pipelined; for
the others, a fresh number from the sampler's own random stream. Work that no row needs (sorting for top-p, the
penalty scatter) is skipped. On CUDA the draw itself is one Triton kernel (`kernels/triton_sampling.py`: the same
function, exact top-k/top-p/min-p by rejection, no sort and no host synchronisation); on a CPU it is
`engine/cpu_sampling.py` (the same kept set by a threshold search, then the same race); the torch code
here is their twin.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from r1serve.engine import cpu_sampling
from r1serve.engine.scheduler_output import ScheduledSeq


@dataclass
class RowParams:
    """What a batch's rows ask for that stays fixed while the same sequences run in the same order: flags, and the
    per-row parameters already on the device. Decode steps repeat one batch many times, so the sampler keeps the
    last one (rebuilding it cost ~0.5 ms of host per step at 256 rows on the H200's host)."""

    key: tuple[int, ...]  # the rows' seq_ids
    all_greedy: bool
    any_top_p: bool
    any_top_k: bool
    any_min_p: bool
    any_penalty: bool
    any_min_tokens: bool  # some row has min_tokens (whether it still applies is checked per step)
    seeded: list[bool]  # rows whose request has a seed
    temperature: torch.Tensor | None = None  # [B] float32 (0 for greedy rows)
    top_p: torch.Tensor | None = None  # [B] float32
    top_k: torch.Tensor | None = None  # [B] int64 (vocab size when off)
    min_p: torch.Tensor | None = None  # [B] float32

    @classmethod
    def of(cls, seqs: list[ScheduledSeq], vocab_size: int, device: torch.device) -> RowParams:
        params = [s.spec.params for s in seqs]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        rows = cls(
            key=row_key(seqs), all_greedy=all(p.greedy for p in params),
            any_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
            any_top_k=any(k < vocab_size for k in top_k), any_min_p=any(p.min_p > 0.0 for p in params),
            any_penalty=any(p.needs_penalties for p in params), any_min_tokens=any(p.min_tokens > 0 for p in params),
            seeded=[p.seed is not None for p in params],
        )
        if not rows.all_greedy:
            # rows padded to a multiple of 4 so that every row starts 16-byte aligned: Triton compiles a kernel
            # variant per pointer alignment
            pad = [0] * (-len(seqs) % 4)
            floats = [[p.temperature for p in params] + pad, [p.top_p for p in params] + pad,
                      [p.min_p for p in params] + pad]
            packed = torch.tensor(floats, dtype=torch.float32).to(device, non_blocking=True)[:, : len(seqs)]
            rows.temperature, rows.top_p, rows.min_p = packed[0], packed[1], packed[2]
            rows.top_k = torch.tensor(top_k, dtype=torch.int64).to(device, non_blocking=True)
        return rows


def row_key(seqs: list[ScheduledSeq]) -> tuple[int, ...]:
    return tuple(s.seq_id for s in seqs)


@dataclass
class SamplingBatch:
    """Per-row parameters; the tensors (on the logits' device) exist only when some row samples."""

    seqs: list[ScheduledSeq]  # the step's records of the rows, in order
    all_greedy: bool
    any_top_p: bool
    any_top_k: bool
    any_min_p: bool
    any_penalty: bool
    any_min_tokens: bool
    seeds: list[int]  # one 63-bit seed per row (when some row samples)
    seeded: list[bool]  # rows whose request has a seed
    temperature: torch.Tensor | None = None  # [B] float32 (0 for greedy rows)
    top_p: torch.Tensor | None = None  # [B] float32
    top_k: torch.Tensor | None = None  # [B] int64 (vocab size when off)
    min_p: torch.Tensor | None = None  # [B] float32
    seeds_tensor: torch.Tensor | None = None  # [B] int64: `seeds` on the device

    @classmethod
    def build(cls, seqs: list[ScheduledSeq], vocab_size: int, device: torch.device,
              rng: random.Random | None = None, rows: RowParams | None = None) -> SamplingBatch:
        """This step's batch; `rows`, if given, must be `RowParams.of` the same sequences in the same order."""
        rows = rows if rows is not None else RowParams.of(seqs, vocab_size, device)
        rng = rng or random.Random(0)
        batch = cls(
            seqs=seqs, all_greedy=rows.all_greedy, any_top_p=rows.any_top_p, any_top_k=rows.any_top_k,
            any_min_p=rows.any_min_p, any_penalty=rows.any_penalty,
            any_min_tokens=rows.any_min_tokens and any(s.num_outputs_before < s.params.min_tokens for s in seqs),
            seeds=[], seeded=rows.seeded, temperature=rows.temperature, top_p=rows.top_p, top_k=rows.top_k,
            min_p=rows.min_p,
        )
        if not batch.all_greedy:  # one host-to-device copy per step: the seeds
            batch.seeds = [row_seed(s) if has_seed else rng.getrandbits(63)
                           for s, has_seed in zip(seqs, rows.seeded, strict=True)]
            batch.seeds_tensor = torch.tensor(batch.seeds, dtype=torch.int64).to(device, non_blocking=True)
        return batch


def row_seed(seq: ScheduledSeq) -> int:
    """The seed of a seeded request's draw at the position being sampled (its computed tokens' end)."""
    return hash((seq.spec.params.seed, seq.spec.index, seq.end)) & SEED_MASK


SEED_MASK = (1 << 63) - 1


class Sampler:
    def __init__(self, eos_token_id: int | None, seed: int = 0) -> None:
        self.eos_token_id = eos_token_id
        self.seed = seed
        self.rng = random.Random(seed)  # the seeds of rows whose request has none
        self._generators: dict[torch.device, torch.Generator] = {}
        self._rows: RowParams | None = None  # the last batch's row parameters, reused while its rows stay

    def batch(self, seqs: list[ScheduledSeq], vocab_size: int, device: torch.device) -> SamplingBatch:
        if self._rows is None or self._rows.key != row_key(seqs):
            self._rows = RowParams.of(seqs, vocab_size, device)
        return SamplingBatch.build(seqs, vocab_size, device, self.rng, self._rows)

    def warm_up(self, vocab_size: int, max_batch: int, device: torch.device) -> None:
        """Compiles the CUDA sampling kernel's variants now (a batch small enough to split rows over several
        programs, and a large one), so that no request waits for a compile; Triton caches them on disk."""
        sample = _triton_sample() if device.type == "cuda" else None
        if sample is None:
            return
        for rows in sorted({1, max_batch}):  # parameters laid out as `RowParams.of` and `SamplingBatch.build` do
            width = rows + -rows % 4
            floats = torch.tensor([[0.6] * width, [0.95] * width, [0.0] * width], device=device)[:, :rows]
            top_k = torch.zeros(rows, dtype=torch.int64, device=device)
            seeds = torch.arange(rows, dtype=torch.int64, device=device)
            sample(torch.randn(rows, vocab_size, device=device), floats[0], floats[1], top_k, floats[2], seeds)
        torch.cuda.synchronize(device)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logits [B, V] float32 → next token ids [B] int64."""
        if batch.any_penalty:
            logits = apply_penalties(logits, batch.seqs)
        if batch.any_min_tokens:
            logits = self._mask_end_tokens(logits, batch.seqs)
        if batch.all_greedy:
            return cpu_sampling.greedy_ids(logits) if logits.device.type == "cpu" else logits.argmax(dim=-1)
        if logits.is_cuda and _triton_sample() is not None:  # one kernel, no host synchronisation
            return _triton_sample()(logits.contiguous(), batch.temperature, batch.top_p, batch.top_k, batch.min_p,
                                    batch.seeds_tensor)
        if logits.device.type == "cpu":  # the same kept set and race, without a sort of whole rows
            return cpu_sampling.sample(logits, batch.temperature, batch.top_k if batch.any_top_k else None,
                                       batch.top_p if batch.any_top_p else None,
                                       batch.min_p if batch.any_min_p else None, batch.seeds)
        greedy_ids = logits.argmax(dim=-1)
        probs = self._probabilities(logits, batch)
        sampled = probs.div_(self._exponentials(probs, batch)).argmax(dim=-1)
        return torch.where(batch.temperature == 0.0, greedy_ids, sampled)

    def _probabilities(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        temperature = torch.where(batch.temperature == 0.0, 1.0, batch.temperature)
        logits = logits / temperature[:, None]
        if batch.any_top_k or batch.any_top_p:
            logits = apply_top_k_top_p(logits, batch.top_k if batch.any_top_k else None,
                                        batch.top_p if batch.any_top_p else None)
        probs = logits.softmax(dim=-1)
        if batch.any_min_p:
            threshold = probs.amax(dim=-1, keepdim=True) * batch.min_p[:, None]
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs

    def _exponentials(self, probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """q ~ Exp(1) per element: seeded rows from a generator seeded by their row seed, the rest in one draw."""
        q = torch.empty_like(probs).exponential_(generator=self._generator(probs.device))
        for i, (seed, seeded) in enumerate(zip(batch.seeds, batch.seeded, strict=True)):
            if seeded:
                q[i].exponential_(generator=torch.Generator(device=probs.device).manual_seed(seed))
        return q

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _mask_end_tokens(self, logits: torch.Tensor, seqs: list[ScheduledSeq]) -> torch.Tensor:
        logits = logits.clone()
        for i, seq in enumerate(seqs):
            if seq.num_outputs_before < seq.params.min_tokens:
                ends = list(seq.params.stop_token_ids)
                if self.eos_token_id is not None and not seq.params.ignore_eos:
                    ends.append(self.eos_token_id)
                if ends:
                    logits[i, ends] = -float("inf")
        return logits


@functools.cache
def _triton_sample() -> Callable[..., torch.Tensor] | None:
    """`kernels.triton_sampling.sample` where Triton is installed (it computes the torch path's function, with
    its own random numbers from the same per-row seeds)."""
    from r1serve.kernels import triton_sampling

    return triton_sampling.sample if triton_sampling.HAS_TRITON else None


TOP_P_CANDIDATES = 256  # top-p first looks among this many tokens; a whole-row sort only if they fall short


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Masks to -inf the logits outside each row's top-k and outside the smallest set whose mass reaches top-p."""
    vocab = logits.shape[-1]
    if top_p is None:  # top-k alone: a partial sort suffices
        assert top_k is not None
        active = top_k < vocab
        k_max = int(top_k[active].max())
        kth = torch.topk(logits, k_max, dim=-1).values  # [B, k_max], descending
        threshold = kth.gather(-1, (top_k.clamp(max=k_max) - 1)[:, None])
        threshold = threshold.masked_fill(~active[:, None], -float("inf"))
        return logits.masked_fill(logits < threshold, -float("inf"))
    k = min(vocab, max(TOP_P_CANDIDATES, int(top_k.max()) if top_k is not None else 0))
    values, order = torch.topk(logits, k, dim=-1)  # [B, k], descending
    probs = values.softmax(dim=-1) * (values.logsumexp(-1) - logits.logsumexp(-1)).exp()[:, None]
    if k < vocab and not bool((probs.sum(-1) >= top_p).all()):
        values, order = logits.sort(dim=-1, descending=True)  # rare for a trained model: a flat distribution
        probs = values.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep = mass_before < top_p[:, None]
    if top_k is not None:
        keep &= torch.arange(keep.shape[-1], device=logits.device)[None, :] < top_k[:, None]
    keep[:, 0] = True  # always keep the most likely token
    out = torch.full_like(logits, -float("inf"))
    return out.scatter_(-1, order, values.masked_fill(~keep, -float("inf")))


def apply_penalties(logits: torch.Tensor, seqs: list[ScheduledSeq]) -> torch.Tensor:
    """Repetition penalty (HF semantics) over prompt and output; presence and frequency (OpenAI) over output.
    The rows' records carry their output (`output_token_ids`: a step with penalties is scheduled with every
    token on the host)."""
    batch, vocab = logits.shape
    device = logits.device
    output_counts = torch.zeros(batch, vocab, dtype=torch.float32, device=device)
    seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
    for i, seq in enumerate(seqs):
        output_ids = seq.output_token_ids or []
        out_ids = torch.tensor(output_ids, dtype=torch.int64, device=device)
        output_counts[i].index_add_(0, out_ids, torch.ones(len(out_ids), device=device))
        seen[i, torch.tensor(seq.spec.prompt_token_ids + output_ids, dtype=torch.int64, device=device)] = True
    rep = torch.tensor([s.params.repetition_penalty for s in seqs], dtype=torch.float32, device=device)[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    freq = torch.tensor([s.params.frequency_penalty for s in seqs], dtype=torch.float32, device=device)[:, None]
    pres = torch.tensor([s.params.presence_penalty for s in seqs], dtype=torch.float32, device=device)[:, None]
    return logits - freq * output_counts - pres * (output_counts > 0).float()
