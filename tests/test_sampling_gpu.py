"""GPU tests of the Triton sampling kernel (`kernels/triton_sampling.py`) against the torch sampler's semantics.

Each test asserts something a wrong kernel fails: a token outside the top-k, top-p or min-p set, frequencies that
do not match the truncated, renormalised reference distribution (`apply_top_k_top_p` of engine/sampler.py, then
softmax and min-p) within a chi-square bound, a seeded row whose token depends on the rest of the batch or on how
the row is split between programs, a CUDA-graph replay that differs from the eager call. Every test is marked
`gpu`: conftest skips them without CUDA, and this module imports on CPU without Triton.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
VOCAB = 151936  # the model's vocabulary
CHI2_Z = 4.753  # one-sided normal quantile of p = 1e-6: a correct sampler fails a chi-square test once in a million


def _kernel():  # imported inside the tests, so that collection works without Triton
    from r1serve.kernels import triton_sampling

    return triton_sampling


def _column(value: float | int | torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(DEVICE, dtype).contiguous()
    return torch.full((batch,), value, dtype=dtype, device=DEVICE)


def random_seeds(batch: int) -> torch.Tensor:
    return torch.randint(0, 2**62, (batch,), dtype=torch.int64, device=DEVICE)


def draw(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0, top_p: float | torch.Tensor = 1.0,
         top_k: int | torch.Tensor = 0, min_p: float | torch.Tensor = 0.0, seeds: torch.Tensor | None = None,
         **kwargs: object) -> torch.Tensor:
    """The kernel on logits [B, V] with per-row (tensor) or shared (number) parameters; random seeds by default."""
    batch = logits.shape[0]
    seeds = random_seeds(batch) if seeds is None else seeds.to(DEVICE)
    out = _kernel().sample(logits, _column(temperature, batch, torch.float32), _column(top_p, batch, torch.float32),
                           _column(top_k, batch, torch.int64), _column(min_p, batch, torch.float32), seeds, **kwargs)
    assert out.shape == (batch,) and out.dtype == torch.int64
    assert bool(((out >= 0) & (out < logits.shape[1])).all()), "token id out of range (row left unwritten?)"
    return out


def reference_probs(row: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
                    min_p: float = 0.0) -> torch.Tensor:
    """The torch path of engine/sampler.py for one row: scale, top-k / top-p mask, softmax, min-p, renormalise."""
    from r1serve.engine.sampler import apply_top_k_top_p

    vocab = row.numel()
    logits = (row.float() / temperature)[None]
    k = torch.tensor([top_k], device=row.device) if 0 < top_k < vocab else None
    p = torch.tensor([top_p], device=row.device) if top_p < 1.0 else None
    if k is not None or p is not None:
        logits = apply_top_k_top_p(logits, k, p)
    probs = logits.softmax(-1)[0].double()
    if min_p > 0.0:
        probs = probs.masked_fill(probs < probs.max() * min_p, 0.0)
    return probs / probs.sum()


def chi2_bound(df: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at 1 - 1e-6."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + CHI2_Z * math.sqrt(a)) ** 3


def assert_frequencies_match(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """Every token in the support of `probs`, and a chi-square test of the counts (cells expected below 5
    merged into one)."""
    n = tokens.numel()
    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()
    probs = probs.cpu()
    outside = int(counts[probs == 0].sum())
    assert outside == 0, f"{outside} draws outside the kept set"
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    tv = 0.5 * float((counts / n - probs).abs().sum())
    assert df == 0 or chi2 < chi2_bound(df), f"chi-square {chi2:.1f} over {df} degrees of freedom (bound "\
                                  f"{chi2_bound(df):.1f}); total variation {tv:.4f}"


def mass_and_count_above(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """Per row: the probability mass and the number of tokens strictly more likely than the drawn one."""
    probs = (logits.double() / temperature).softmax(-1)
    chosen = probs.gather(1, tokens[:, None])
    above = probs > chosen
    return (probs * above).sum(-1), above.sum(-1)


def scattered_row(probs: list[float], vocab: int, rest: float = float("-inf")) -> tuple[torch.Tensor, torch.Tensor]:
    """A row of `vocab` logits whose softmax puts `probs` on random positions (the others at logit `rest`)."""
    positions = torch.randperm(vocab)[:len(probs)]
    row = torch.full((vocab,), rest)
    row[positions] = torch.tensor(probs).log()
    return row.to(DEVICE), positions.to(DEVICE)


# ---------------------------------------------------------------- greedy, top-k, top-p, min-p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_are_the_argmax_in_a_mixed_batch(dtype: torch.dtype) -> None:
    logits = (torch.randn(64, VOCAB, device=DEVICE) * 3).to(dtype)
    greedy = torch.arange(64, device=DEVICE) % 2 == 0
    out = draw(logits, temperature=torch.where(greedy, 0.0, 0.8), top_p=0.9)
    argmax = logits.argmax(-1)  # the first index of the maximum, like the kernel
    assert torch.equal(out[greedy], argmax[greedy])
    assert int((out[~greedy] != argmax[~greedy]).sum()) >= 8  # the sampled rows really sample
    mass, _ = mass_and_count_above(logits[~greedy].float(), out[~greedy], 0.8)
    assert float(mass.max()) < 0.9 + 1e-4


@pytest.mark.parametrize("vocab", [5003, VOCAB])
def test_top_k_never_leaves_the_top_k(vocab: int) -> None:
    logits = torch.randn(256, vocab, device=DEVICE)
    top_k = torch.randint(1, 65, (256,), device=DEVICE)
    top_k[:16] = 1
    out = draw(logits, temperature=1.5, top_k=top_k)
    kth = logits.sort(-1, descending=True).values.gather(1, (top_k - 1)[:, None])[:, 0]
    assert bool((logits.gather(1, out[:, None])[:, 0] >= kth).all()), "a token outside the top-k"
    assert torch.equal(out[:16], logits[:16].argmax(-1))  # top_k = 1 is greedy
    assert int((out[16:] != logits[16:].argmax(-1)).sum()) >= 100


@pytest.mark.parametrize(("top_p", "kept"), [(0.45, 1), (0.7, 2), (0.85, 3), (0.97, 4)])
@pytest.mark.parametrize("rest", [float("-inf"), -40.0])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, kept: int, rest: float) -> None:
    """probs 0.5, 0.3, 0.15, 0.05 on scattered positions of 10,000 tokens: top_p 0.7 keeps the first two
    (0.5 < 0.7 <= 0.8), and the draws among them follow 0.5 : 0.3."""
    probs = [0.5, 0.3, 0.15, 0.05]
    row, positions = scattered_row(probs, 10_000, rest)
    out = draw(row[None].expand(4000, -1).contiguous(), top_p=top_p)
    expected = torch.zeros(10_000, dtype=torch.float64)
    expected[positions[:kept].cpu()] = torch.tensor(probs[:kept], dtype=torch.float64)
    assert_frequencies_match(out, expected / expected.sum())


def test_min_p_drops_tokens_below_its_share_of_the_top() -> None:
    probs = [0.4, 0.3, 0.2, 0.06, 0.04]  # min_p 0.3: threshold 0.12 keeps the first three
    row, positions = scattered_row(probs, 10_000)
    out = draw(row[None].expand(4000, -1).contiguous(), min_p=0.3)
    expected = torch.zeros(10_000, dtype=torch.float64)
    expected[positions[:3].cpu()] = torch.tensor(probs[:3], dtype=torch.float64)
    assert_frequencies_match(out, expected / expected.sum())


def test_min_p_on_flat_rows_of_the_real_vocabulary() -> None:
    logits = torch.randn(256, VOCAB, device=DEVICE) * 2
    out = draw(logits, temperature=1.0, min_p=0.05)
    probs = logits.double().softmax(-1)
    chosen = probs.gather(1, out[:, None])[:, 0]
    assert bool((chosen >= 0.05 * probs.max(-1).values * (1 - 1e-5)).all()), "a token below min_p"
    assert int((out != logits.argmax(-1)).sum()) >= 128  # the argmax holds ~5% of the kept mass


# ---------------------------------------------------------------- the distribution


@pytest.mark.parametrize(("temperature", "top_p", "top_k", "min_p"), [
    (0.7, 0.9, 0, 0.0),
    (1.0, 0.8, 30, 0.0),
    (1.3, 1.0, 0, 0.05),
    (0.6, 0.95, 200, 0.02),
])
def test_frequencies_match_the_reference_distribution(temperature: float, top_p: float, top_k: int,
                                                      min_p: float) -> None:
    """20,000 rows of one 1000-token row (known softmax), distinct seeds: the counts match the torch path's
    truncated, renormalised probabilities (chi-square at p = 1e-6)."""
    gen = torch.Generator().manual_seed(1234)
    row = (torch.randn(1000, generator=gen) * 2.5).to(DEVICE)
    out = draw(row[None].expand(20_000, -1).contiguous(), temperature, top_p, top_k, min_p)
    assert_frequencies_match(out, reference_probs(row, temperature, top_p, top_k, min_p))


def test_frequencies_match_across_tiles() -> None:
    """The same check with the 1000 tokens scattered over 8197 positions (five tiles, -inf elsewhere)."""
    gen = torch.Generator().manual_seed(99)
    values = torch.randn(1000, generator=gen) * 2.0
    positions = torch.randperm(8197, generator=gen)[:1000]
    row = torch.full((8197,), float("-inf"))
    row[positions] = values
    row = row.to(DEVICE)
    out = draw(row[None].expand(20_000, -1).contiguous(), 0.8, 0.9)
    probs = torch.zeros(8197, dtype=torch.float64)
    probs[positions] = reference_probs(values.to(DEVICE), 0.8, 0.9).cpu()
    assert_frequencies_match(out, probs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_rows_of_the_real_vocabulary_stay_in_top_p(dtype: torch.dtype) -> None:
    """Random-weight logits (randn): top_p 0.95 keeps ~95% of 151,936 tokens; the draws stay in the set, are
    spread over it, and need about two passes over the row."""
    logits = torch.randn(256, VOCAB, device=DEVICE).to(dtype)
    passes = torch.zeros(256, dtype=torch.int32, device=DEVICE)
    out = draw(logits, temperature=1.0, top_p=0.95, passes=passes)
    mass, _ = mass_and_count_above(logits.float(), out, 1.0)
    assert float(mass.max()) < 0.95 + 1e-4, "a token outside the top-p set"
    assert out.unique().numel() >= 240
    assert int((mass > 0.5).sum()) >= 64  # the less likely half of the mass is drawn too (expected ~47%)
    mean_passes = float(passes.float().mean())
    print(f"flat {dtype}: mean passes {mean_passes:.2f}, max {int(passes.max())}")
    assert 1.0 <= mean_passes <= 3.0


def test_peaked_rows_mostly_take_one_pass() -> None:
    logits = torch.randn(256, VOCAB, device=DEVICE) * 30
    passes = torch.zeros(256, dtype=torch.int32, device=DEVICE)
    out = draw(logits, temperature=0.6, top_p=0.95, passes=passes)
    mass, _ = mass_and_count_above(logits, out, 0.6)
    assert float(mass.max()) < 0.95 + 1e-4
    print(f"peaked: mean passes {float(passes.float().mean()):.2f}")
    assert float(passes.float().mean()) <= 1.5


# ---------------------------------------------------------------- seeds and batch independence


def mixed_rows(batch: int, vocab: int = VOCAB) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rows flat to peaked with varied parameters (some greedy), and random 63-bit seeds."""
    scale = torch.tensor([1.0, 5.0, 30.0], device=DEVICE)[torch.randint(0, 3, (batch,), device=DEVICE)]
    logits = torch.randn(batch, vocab, device=DEVICE) * scale[:, None]

    def pick(*options: float) -> torch.Tensor:
        return torch.tensor(options, device=DEVICE)[torch.randint(0, len(options), (batch,), device=DEVICE)]

    params = {"temperature": pick(0.0, 0.3, 0.6, 1.0, 1.5), "top_p": pick(0.8, 0.95, 1.0),
              "top_k": pick(0, 20, 1000), "min_p": pick(0.0, 0.0, 0.05), "seeds": random_seeds(batch)}
    return logits, params


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    """The same (row, parameters, seed) gives the same token alone (split over many programs), in a batch of
    256 (one program per row), at another position of another batch, and with splitting turned off."""
    logits, params = mixed_rows(256)
    full = draw(logits, **params)
    for i in range(0, 256, 32):  # alone: B=1 spreads the row over 38 programs
        alone = draw(logits[i:i + 1], **{k: v[i:i + 1] for k, v in params.items()})
        assert int(alone) == int(full[i]), f"row {i}"
    rows = torch.randperm(256, device=DEVICE)[:37]
    others, other_params = mixed_rows(37)
    others[::2] = logits[rows[::2]]  # every other row of a new batch is an old row, at a new position
    for k in other_params:
        other_params[k][::2] = params[k][rows[::2]]
    mixed = draw(others, **other_params)
    assert torch.equal(mixed[::2], full[rows[::2]])
    assert torch.equal(draw(logits[:16], **{k: v[:16] for k, v in params.items()}, max_split=1), full[:16])


def test_a_row_repeated_in_a_batch_with_one_seed_gives_one_token_and_seeds_differ() -> None:
    row = torch.randn(1, VOCAB, device=DEVICE)
    same = draw(row.expand(64, -1).contiguous(), top_p=0.95, seeds=torch.full((64,), 12345))
    assert same.unique().numel() == 1
    different = draw(row.expand(256, -1).contiguous(), top_p=0.95, seeds=torch.arange(256) * 7919 + 1)
    assert different.unique().numel() >= 240


def test_split_and_unsplit_rows_agree_over_many_rounds() -> None:
    """top_k 3 on flat rows needs many rejection rounds: every round's statistics, merged across 2..38 programs,
    must give the token of the one-program row."""
    logits = torch.randn(8, VOCAB, device=DEVICE)
    seeds = random_seeds(8)
    passes = torch.zeros(8, dtype=torch.int32, device=DEVICE)
    one = draw(logits, top_k=3, seeds=seeds, max_split=1, passes=passes)
    assert float(passes.float().mean()) > 3  # the case does exercise many rounds
    kth = logits.topk(3, -1).values[:, -1]
    assert bool((logits.gather(1, one[:, None])[:, 0] >= kth).all())
    for split in (2, 7, None):
        assert torch.equal(draw(logits, top_k=3, seeds=seeds, max_split=split), one), f"max_split={split}"
    assert torch.equal(draw(logits[:1], top_k=3, seeds=seeds[:1]), one[:1])


# ---------------------------------------------------------------- shapes, dtypes, CUDA graphs


@pytest.mark.parametrize("vocab", [1, 7, 2049, 100_003])
@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_vocabulary_sizes_batches_and_dtypes(vocab: int, batch: int, dtype: torch.dtype) -> None:
    logits = (torch.randn(batch, vocab, device=DEVICE) * 2).to(dtype)
    greedy = torch.arange(batch, device=DEVICE) % 2 == 1
    out = draw(logits, temperature=torch.where(greedy, 0.0, 1.0), top_k=5)
    assert torch.equal(out[greedy], logits[greedy].argmax(-1))
    kth = logits.float().sort(-1, descending=True).values[:, min(5, vocab) - 1]
    assert bool((logits.float().gather(1, out[:, None])[:, 0] >= kth).all())
    if vocab == 1:
        assert bool((out == 0).all())


@pytest.mark.parametrize("batch", [1, 256])
def test_cuda_graph_replay_matches_eager(batch: int) -> None:
    """Capture `sample` once, write new logits into the captured buffer, replay: the eager call with the same
    seeds gives the same tokens (and so no host synchronisation happened inside: capture would have failed)."""
    ts = _kernel()
    logits, params = mixed_rows(batch)
    args = [params[k].to(dtype).contiguous() for k, dtype in [
        ("temperature", torch.float32), ("top_p", torch.float32), ("top_k", torch.int64), ("min_p", torch.float32),
        ("seeds", torch.int64)]]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile outside the capture
        ts.sample(logits, *args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ts.sample(logits, *args)
    for _ in range(3):
        fresh, fresh_params = mixed_rows(batch)
        logits.copy_(fresh)
        args[4].copy_(fresh_params["seeds"])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, ts.sample(logits, *args))
