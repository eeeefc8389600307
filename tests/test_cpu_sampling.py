"""The CPU draw (engine/cpu_sampling.py) keeps the torch path's tokens and draws from their distribution."""

from __future__ import annotations

import pytest
import torch

from r1serve.engine import cpu_sampling
from r1serve.engine.sampler import apply_top_k_top_p

VOCAB = 6000  # above TOP_P_CANDIDATES, so flat rows take the bisection


def torch_path_kept(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                    min_p: torch.Tensor | None) -> torch.Tensor:
    """The sampler's torch path: masked logits, softmax, then min-p → the kept tokens [B, V] bool."""
    masked = apply_top_k_top_p(logits, top_k, top_p) if top_k is not None or top_p is not None else logits
    probs = masked.softmax(dim=-1)
    if min_p is not None:
        probs = probs.masked_fill(probs < probs.amax(dim=-1, keepdim=True) * min_p[:, None], 0.0)
    return probs > 0


def cpu_kept(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
             min_p: torch.Tensor | None) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    return (probs >= cpu_sampling.kept_cut(probs, top_k, top_p, min_p)[:, None]) & (probs > 0)


@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0])  # flat (bisection), middling, peaked (the 256 candidates)
@pytest.mark.parametrize("knobs", ["top_p", "top_k", "top_k+top_p", "min_p", "all"])
def test_kept_set_is_the_torch_paths(scale: float, knobs: str) -> None:
    gen = torch.Generator().manual_seed(int(scale * 100) + len(knobs))
    logits = torch.randn(5, VOCAB, generator=gen) * scale
    top_p = torch.tensor([0.95, 0.5, 0.99, 0.9, 0.1]) if "top_p" in knobs or knobs == "all" else None
    top_k = torch.tensor([VOCAB, 40, 700, 3, VOCAB]) if "top_k" in knobs or knobs == "all" else None
    min_p = torch.tensor([0.0, 0.1, 0.3, 0.05, 0.0]) if "min_p" in knobs or knobs == "all" else None
    expected = torch_path_kept(logits, top_k, top_p, min_p)
    got = cpu_kept(logits, top_k, top_p, min_p)
    assert torch.equal(got, expected), (got.sum(-1), expected.sum(-1))


def test_a_row_of_top_p_one_keeps_every_token_beside_rows_that_cut() -> None:
    probs = (torch.randn(2, VOCAB) * 8.0).softmax(-1)  # peaked: the torch path's cumsum reaches 1.0 early
    cut = cpu_sampling.kept_cut(probs, None, torch.tensor([0.5, 1.0]), None)
    assert cut[1] == 0.0 and cut[0] > 0.0


def test_a_row_without_top_p_does_not_prolong_the_bisection(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(5))
    probs = (logits * torch.tensor([[0.05], [10.0]])).softmax(-1)  # flat (bisection), then p over ~90 octaves
    checks = []
    resolved = cpu_sampling._band_resolved
    monkeypatch.setattr(cpu_sampling, "_band_resolved", lambda band: checks.append(1) or resolved(band))
    cut = cpu_sampling.kept_cut(probs, None, torch.tensor([0.95, 1.0]), None)
    assert cut[1] == 0.0 and cut[0] > 0.0
    assert len(checks) < 8  # the row of top-p 1.0 alone would run all MAX_BISECTIONS halvings


def test_top_p_cut_is_exact_at_the_boundary() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05] + [0.0] * 296])
    for top_p, kept in ((0.7, 2), (0.8, 2), (0.81, 3), (0.01, 1), (0.999, 4)):
        cut = cpu_sampling.kept_cut(probs, None, torch.tensor([top_p]), None)
        assert int(((probs >= cut[:, None]) & (probs > 0)).sum()) == kept, top_p


def test_bisection_matches_the_candidates_on_flat_rows() -> None:
    probs = (torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(3)) * 0.1).softmax(-1)
    top_p = torch.tensor([0.95, 0.6, 0.3])
    ordered = probs.sort(dim=-1, descending=True).values
    assert torch.equal(cpu_sampling._bisect_cut(probs, top_p),
                       cpu_sampling._cut_in_sorted(ordered, torch.zeros(3), top_p))


def test_bisection_stops_on_ties_of_bf16_logits() -> None:
    logits = (torch.randn(2, 151936, generator=torch.Generator().manual_seed(4)) * 0.5).bfloat16().float()
    probs = logits.softmax(-1)  # a few hundred distinct values: ties of many entries at the cut
    top_p = torch.tensor([0.95, 0.5])
    ordered = probs.sort(dim=-1, descending=True).values
    expected = cpu_sampling._cut_in_sorted(ordered, torch.zeros(2), top_p)
    assert torch.equal(cpu_sampling._bisect_cut(probs, top_p), expected)
    tie = torch.where(probs == expected[:, None], probs, -1.0)
    assert bool(((tie >= 0).sum(dim=-1) > cpu_sampling.BAND).all())  # one value, too many entries to count
    assert cpu_sampling._band_resolved(tie) and not cpu_sampling._band_resolved(probs)


def test_draw_follows_the_kept_distribution() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, -30.0] + [-1e9] * 96]).repeat(6000, 1)
    ones = torch.ones(6000)
    ids = cpu_sampling.sample(logits, ones, None, torch.full((6000,), 0.9), None, list(range(6000)))
    counts = torch.bincount(ids, minlength=100).float()
    probs = logits[0].softmax(-1)
    assert counts[3:].sum() == 0  # beyond top-p (p ≈ 0.09 of the mass is token 0, which top-p 0.9 drops)
    kept = probs[1:3] / probs[1:3].sum()
    assert counts[0] == 0 and torch.allclose(counts[1:3] / 6000, kept, atol=0.02)


def test_seed_reproduces_the_token_whatever_the_batch() -> None:
    logits = torch.randn(1, VOCAB) * 0.3
    seeded = cpu_sampling.sample(logits, torch.ones(1), None, torch.tensor([0.95]), None, [1234])
    batch = torch.cat([torch.randn(2, VOCAB), logits])
    in_batch = cpu_sampling.sample(batch, torch.ones(3), None, torch.full((3,), 0.95), None, [5, 6, 1234])
    assert int(in_batch[2]) == int(seeded[0])
    draws = {int(cpu_sampling.sample(logits, torch.ones(1), None, None, None, [s])[0]) for s in range(20)}
    assert len(draws) > 10  # a flat row: different seeds, different tokens


def test_a_seeded_row_draws_the_torch_paths_token() -> None:
    """The same kept set and the same race (Exp(1) from the row's seed): the CPU path's token is the torch path's,
    on flat rows (the bisection) and peaked ones (the candidates)."""
    for scale in (0.05, 1.0, 8.0):
        logits = torch.randn(8, VOCAB) * scale
        top_p, seeds = torch.full((8,), 0.9), [11 * i + 3 for i in range(8)]
        probs = apply_top_k_top_p(logits, None, top_p).softmax(dim=-1)
        q = torch.stack([torch.empty(VOCAB).exponential_(generator=torch.Generator().manual_seed(s)) for s in seeds])
        ours = cpu_sampling.sample(logits, torch.ones(8), None, top_p, None, seeds)
        assert ours.tolist() == probs.div(q).argmax(dim=-1).tolist(), scale


def test_temperature_zero_rows_take_the_argmax() -> None:
    logits = torch.randn(4, VOCAB)
    temperature = torch.tensor([0.0, 0.6, 0.0, 1.0])
    ids = cpu_sampling.sample(logits, temperature, None, torch.full((4,), 0.95), None, [1, 2, 3, 4])
    assert ids[0] == logits[0].argmax() and ids[2] == logits[2].argmax()


def test_tokens_of_zero_probability_are_never_drawn() -> None:
    logits = torch.full((2000, 50), -float("inf"))
    logits[:, 7], logits[:, 49] = 0.0, 0.0
    ids = cpu_sampling.sample(logits, torch.ones(2000), None, None, None, list(range(2000)))
    assert set(ids.tolist()) == {7, 49}


def test_narrowing_keeps_the_band_in_order_and_counts_the_mass_above() -> None:
    band = torch.tensor([[0.4, 0.1, 0.3, 0.05, 0.15], [0.2, 0.2, 0.6, -1.0, 0.0]])
    packed, mass_above = cpu_sampling._narrow(band, torch.tensor([0.1, 0.0]), torch.tensor([0.3, 0.2]),
                                              torch.tensor([0.0, 0.5]), always=True)
    assert packed.tolist() == [[0.30000001192092896, 0.15000000596046448], [0.20000000298023224, 0.20000000298023224]]
    assert torch.allclose(mass_above, torch.tensor([0.4, 1.1]))
    unchanged, same_mass = cpu_sampling._narrow(band, torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]),
                                                torch.tensor([0.0, 0.5]))  # most entries remain: no packing
    assert unchanged is band and same_mass.tolist() == [0.0, 0.5]


@pytest.mark.parametrize("vocab", [151936, 1000, 256])
def test_greedy_ids_equal_argmax_with_ties_and_nan(vocab: int) -> None:
    logits = torch.randn(6, vocab).bfloat16().float()  # bf16 values: many ties
    logits[1] = 0.0  # one value everywhere: the first index
    logits[2, [5, vocab - 1]] = 100.0  # tied maxima in different blocks: the first
    logits[3, [vocab - 2, vocab - 1]] = 100.0  # tied maxima at the end of the last block
    logits[4, 7] = float("nan")  # NaN counts as the maximum, as in argmax
    assert torch.equal(cpu_sampling.greedy_ids(logits), logits.argmax(dim=-1))
    assert cpu_sampling.greedy_ids(logits)[1] == 0 and cpu_sampling.greedy_ids(logits)[2] == 5
    assert torch.equal(cpu_sampling.greedy_ids(logits[:, :-1]), logits[:, :-1].argmax(dim=-1))  # not contiguous
