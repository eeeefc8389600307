"""The sampler's draw on a CPU: the distribution of `sampler.Sampler`'s torch path, without a sort of the row.

The torch path masks top-k / top-p by sorting (a whole 151,936-entry row when its 256 most likely tokens fall
short of top-p, as random weights and flat distributions do) and races one Exp(1) number per entry. On a 2-core
CPU that sort costs ~100 ms per row, more than a decode step of a small model (the race ~3 ms). Here
each row's kept set is `{p >= cut}`, with the cut found by a search instead: among the 256 most likely tokens
where they reach top-p, else by bisection on the probability until few entries remain between the bounds, which
are then ordered exactly. The kept set is the same as the torch path's (a token is kept while the mass of the
tokens more likely than it is below top-p, it is among the top-k, and p >= min_p * max p); tokens tied at the cut
are all kept. The draw is the torch path's exponential race, its Exp(1) numbers from the row's 63-bit seed
(`SamplingBatch.seeds`), so a seeded request draws the same token whatever else is in the batch, and the same
token as on the torch path.
"""

from __future__ import annotations

import torch

ARGMAX_BLOCK = 128  # `greedy_ids` finds each row's best block of this many entries first
TOP_P_CANDIDATES = 256  # top-p first looks among this many tokens (as the torch path does)
BAND = 64  # the bisection stops once at most this many entries lie between its bounds
MAX_BISECTIONS = 60  # float32 halvings: past these only tied values remain between the bounds


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
           min_p: torch.Tensor | None, seeds: list[int]) -> torch.Tensor:
    """logits [B, V] float32 (penalties applied), the rows' parameters [B] (None: no row uses it) and seeds →
    next token ids [B] int64; rows of temperature 0 take the argmax."""
    greedy = greedy_ids(logits)
    probs = (logits / torch.where(temperature == 0.0, 1.0, temperature)[:, None]).softmax(dim=-1)  # [B, V]
    sampled = draw(probs, kept_cut(probs, top_k, top_p, min_p), seeds)
    return torch.where(temperature == 0.0, greedy, sampled)


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] → `logits.argmax(dim=-1)` [B] int64, the same index (the first of tied maxima; NaN counts as
    the maximum). torch's CPU argmax reads a [8, 151,936] float32 batch at ~5 GB/s (1 ms on 2 threads) where
    `amax` is ten times faster, so each row's first block holding its maximum is found by `amax` over blocks of
    `ARGMAX_BLOCK` entries, then the argmax within that block alone."""
    batch, vocab = logits.shape
    if vocab % ARGMAX_BLOCK or not logits.is_contiguous():
        return logits.argmax(dim=-1)
    blocks = logits.view(batch, vocab // ARGMAX_BLOCK, ARGMAX_BLOCK)
    best = blocks.amax(dim=-1).argmax(dim=-1)  # [B] the first block holding the row's maximum
    within = blocks[torch.arange(batch, device=logits.device), best].argmax(dim=-1)  # [B]
    return best * ARGMAX_BLOCK + within


def kept_cut(probs: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
             min_p: torch.Tensor | None) -> torch.Tensor:
    """probs [B, V] → the cut [B]: each row keeps the tokens with p >= cut (0 where nothing is masked)."""
    batch, vocab = probs.shape
    cut = torch.zeros(batch, dtype=probs.dtype)
    candidates = None
    k_max = int(top_k.masked_fill(top_k >= vocab, 0).max()) if top_k is not None else 0  # over rows using it
    if top_p is not None or k_max > 0:
        count = min(vocab, max(TOP_P_CANDIDATES, k_max))
        candidates = torch.topk(probs, count, dim=-1).values  # [B, count], descending
    if top_k is not None and candidates is not None:
        kth = candidates.gather(-1, (top_k.clamp(max=candidates.shape[-1]) - 1)[:, None]).squeeze(-1)
        cut = torch.where(top_k < vocab, kth, cut)
    if top_p is not None and candidates is not None:
        active = top_p < 1.0  # the others search with top-p 0 (done at once), then keep every token
        cut = torch.maximum(cut, torch.where(active, top_p_cut(probs, candidates, top_p * active), 0.0))
    if min_p is not None:
        cut = torch.maximum(cut, probs.amax(dim=-1) * min_p)
    return cut


def top_p_cut(probs: torch.Tensor, candidates: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The top-p cut [B]: the least p among the tokens that the mass of more likely tokens has not reached top_p
    before. From the row's most likely `candidates` [B, C] (descending) where their mass reaches top_p."""
    if bool((candidates.sum(dim=-1) >= top_p).all()):
        return _cut_in_sorted(candidates, torch.zeros_like(top_p), top_p)
    return _bisect_cut(probs, top_p)


def _cut_in_sorted(values: torch.Tensor, mass_above: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """values [B, C] descending (padding < 0 at the end), `mass_above` [B] the mass of the tokens above them →
    the least value whose exclusive mass (above + the values before it) is below top_p; +inf where none is."""
    before = mass_above[:, None] + values.clamp_min(0.0).cumsum(dim=-1) - values.clamp_min(0.0)
    kept = (before < top_p[:, None]) & (values >= 0.0)
    return torch.where(kept, values, torch.inf).amin(dim=-1)


def _bisect_cut(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The top-p cut by bisection on p: the mass above `hi` stays below top_p and the mass above `lo` reaches
    it, so the cut lies in (lo, hi]. Every few halvings the entries outside (lo, hi] leave the search (those
    above hi into `mass_above`), so later passes read a shrinking band; once few entries remain, they are
    ordered and the cut read exactly."""
    lo = torch.zeros_like(top_p)
    hi = probs.amax(dim=-1)
    band, mass_above = probs, torch.zeros_like(top_p)  # [B, W] the entries in play (padding -1)
    for step in range(1, MAX_BISECTIONS + 1):
        mid = (lo + hi) / 2
        mass = mass_above + torch.where(band > mid[:, None], band, 0.0).sum(dim=-1)
        below_p = mass < top_p  # the cut is <= mid
        hi, lo = torch.where(below_p, mid, hi), torch.where(below_p, lo, mid)
        if step % 4 == 0:
            band, mass_above = _narrow(band, lo, hi, mass_above)
            if _band_resolved(band):
                break
    band, mass_above = _narrow(band, lo, hi, mass_above, always=True)
    ordered = band.sort(dim=-1, descending=True).values
    cut = _cut_in_sorted(ordered, mass_above, top_p)  # the band's largest entry is kept unless the band is empty,
    return torch.where(torch.isinf(cut), 0.0, cut)  # which happens only where the whole row's mass is below top_p


def _narrow(band: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, mass_above: torch.Tensor,
            always: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """band [B, W] → its entries in (lo, hi], packed left into [B, W'] (padding -1), and `mass_above` plus the
    mass of the entries above hi; unchanged unless W' <= W / 4 or `always` (packing costs more than it saves
    while most entries remain)."""
    keep = (band > lo[:, None]) & (band <= hi[:, None])
    counts = keep.sum(dim=-1)
    if not always and int(counts.max()) * 4 > band.shape[1]:
        return band, mass_above
    mass_above = mass_above + torch.where(band > hi[:, None], band, 0.0).sum(dim=-1)
    rows, cols = keep.nonzero(as_tuple=True)  # row by row, in order
    slots = torch.arange(rows.numel()) - (counts.cumsum(0) - counts)[rows]
    packed = torch.full((band.shape[0], max(1, int(counts.max()))), -1.0, dtype=band.dtype)
    packed[rows, slots] = band[rows, cols]
    return packed, mass_above


def _band_resolved(band: torch.Tensor) -> bool:
    """Whether every row of the band [B, W] (padding -1) holds at most `BAND` entries or one value alone (ties:
    bf16 logits take few distinct values, so a tie can hold thousands of entries that no bisection separates)."""
    in_band = band >= 0.0
    few = in_band.sum(dim=-1) <= BAND
    if bool(few.all()):
        return True
    bottom = torch.where(in_band, band, 2.0).amin(dim=-1)
    return bool((few | (band.amax(dim=-1) <= bottom)).all())


def draw(probs: torch.Tensor, cut: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """One token per row from probs [B, V] restricted to p >= cut [B], by the torch path's exponential race:
    argmax of p / q, q ~ Exp(1) from a generator seeded with the row's seed. A seeded row thus draws the token the
    torch path draws, and a tiny change of the logits (another batch's rounding in the matmuls) rarely changes the
    winner, where an inverse CDF over 151,936 entries would shift with it."""
    q = torch.empty_like(probs)  # [B, V]
    for i, seed in enumerate(seeds):
        q[i].exponential_(generator=torch.Generator().manual_seed(seed))
    return torch.where(probs >= cut[:, None], probs, 0.0).div_(q).argmax(dim=-1)
