"""Sampler: greedy, temperature, top-k, top-p, min-p, penalties, min_tokens, per-request seeds."""

from __future__ import annotations

import pytest
import torch

from r1serve.engine.sampler import Sampler, SamplingBatch, apply_penalties, apply_top_k_top_p
from r1serve.engine.scheduler import sampling_record
from r1serve.engine.scheduler_output import ScheduledSeq
from r1serve.engine.sequence import Request, Sequence
from r1serve.engine.stopping import is_repeating
from r1serve.sampling_params import RepetitionGuard, SamplingParams

VOCAB = 50


def make_seqs(params: list[SamplingParams], prompt: list[int] | None = None,
              outputs: list[int] | None = None) -> list[Sequence]:
    seqs = []
    for i, p in enumerate(params):
        prompt_ids = prompt or [1, 2, 3]
        request = Request(f"r{i}", None, prompt_ids, p)
        seq = Sequence(request, 0, prompt_ids + (outputs or []), len(prompt_ids))
        seq.num_computed_tokens = seq.num_tokens
        request.seqs.append(seq)
        seqs.append(seq)
    return seqs


def records(seqs: list[Sequence]) -> list[ScheduledSeq]:
    """The step's records that sample each sequence's next token."""
    return [sampling_record(seq) for seq in seqs]


def sample(logits: torch.Tensor, seqs: list[Sequence], seed: int = 0) -> list[int]:
    return Sampler(eos_token_id=0, seed=seed)(logits, SamplingBatch.build(records(seqs), VOCAB, logits.device)).tolist()


def test_greedy_is_argmax_whatever_the_seed() -> None:
    logits = torch.randn(4, VOCAB)
    seqs = make_seqs([SamplingParams(temperature=0.0)] * 4)
    assert sample(logits, seqs, seed=1) == sample(logits, seqs, seed=2) == logits.argmax(-1).tolist()


def test_greedy_and_random_rows_mix() -> None:
    logits = torch.randn(2, VOCAB)
    seqs = make_seqs([SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=1.0)])
    assert sample(logits, seqs)[0] == int(logits[0].argmax())


def test_top_k_one_is_greedy_and_top_k_limits_choices() -> None:
    logits = torch.randn(1, VOCAB).repeat(200, 1)
    top3 = set(logits[0].topk(3).indices.tolist())
    seqs = make_seqs([SamplingParams(temperature=5.0, top_p=1.0, top_k=3)] * 200)
    got = set(sample(logits, seqs))
    assert got <= top3 and len(got) > 1
    one = make_seqs([SamplingParams(temperature=5.0, top_p=1.0, top_k=1)])
    assert sample(logits[:1], one) == [int(logits[0].argmax())]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05] + [0.0] * (VOCAB - 4)])
    logits = probs.clamp_min(1e-12).log()
    masked = apply_top_k_top_p(logits, None, torch.tensor([0.7]))
    kept = torch.isfinite(masked[0]).nonzero().flatten().tolist()
    assert kept == [0, 1]  # 0.5 < 0.7 ≤ 0.8
    masked = apply_top_k_top_p(logits, None, torch.tensor([0.01]))
    assert torch.isfinite(masked[0]).nonzero().flatten().tolist() == [0]


def test_top_k_and_top_p_together() -> None:
    logits = torch.arange(VOCAB, dtype=torch.float32)[None, :] / 10
    masked = apply_top_k_top_p(logits, torch.tensor([5]), torch.tensor([0.999]))
    assert torch.isfinite(masked[0]).sum() == 5


def test_min_p_drops_unlikely_tokens() -> None:
    logits = torch.full((300, VOCAB), -10.0)
    logits[:, 3], logits[:, 4] = 5.0, 4.0  # token 4 has p ≈ 0.37 of token 3's
    seqs = make_seqs([SamplingParams(temperature=1.0, top_p=1.0, min_p=0.5)] * 300)
    assert set(sample(logits, seqs)) == {3}


def test_seed_reproduces_and_is_independent_of_the_batch() -> None:
    logits = torch.randn(1, VOCAB)
    seeded = SamplingParams(temperature=1.0, top_p=1.0, seed=42)
    alone = [sample(logits, make_seqs([seeded]))[0] for _ in range(1)]
    in_batch = sample(torch.cat([torch.randn(3, VOCAB), logits]),
                      make_seqs([SamplingParams(temperature=1.0)] * 3 + [seeded]))[3]
    assert alone[0] == in_batch
    draws = {sample(logits, make_seqs([SamplingParams(temperature=1.0, top_p=1.0, seed=s)]))[0] for s in range(30)}
    assert len(draws) > 1


def test_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([[0.0, 1.0] + [-30.0] * (VOCAB - 2)]).repeat(4000, 1)
    seqs = make_seqs([SamplingParams(temperature=1.0, top_p=1.0)] * 4000)
    share = sum(1 for t in sample(logits, seqs) if t == 1) / 4000
    assert abs(share - torch.sigmoid(torch.tensor(1.0)).item()) < 0.03


def test_penalties() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 5], logits[0, 6], logits[0, 7] = 2.0, -2.0, 1.0
    seq = make_seqs([SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)],
                    prompt=[6], outputs=[5, 5])[0]
    out = apply_penalties(logits, records([seq]))[0]
    assert out[5].item() == pytest.approx(2.0 / 2.0 - 0.5 * 2 - 0.25)  # repetition, frequency x2, presence
    assert out[6].item() == pytest.approx(-4.0)  # prompt token: repetition only (negative logit multiplied)
    assert out[7].item() == pytest.approx(1.0)  # unseen


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 0], logits[0, 9] = 10.0, 9.0  # eos (0) then a stop id (9) are the likeliest
    seqs = make_seqs([SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[9])])
    assert sample(logits, seqs)[0] not in (0, 9)


def test_repetition_guard_catches_loops_only() -> None:
    guard = RepetitionGuard(max_period=50, min_repeats=4, min_span=32)
    loop = list(range(100, 140)) + [1, 2, 3, 4, 5, 6, 7] * 10
    assert is_repeating(loop, guard)
    assert not is_repeating(list(range(200)), guard)
    assert not is_repeating([1, 2, 3] * 5, guard)  # 15 tokens: under min_span
    assert is_repeating([9] * 40, guard)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 8, 13])
def test_parameter_rows_start_16_byte_aligned(rows: int) -> None:
    """Triton compiles a kernel variant per pointer alignment (~20 s for the sampling kernel): every parameter row
    of a batch must start 16-byte aligned whatever the batch size, and hold exactly its rows."""
    params = [SamplingParams(temperature=0.5 + i / 100, top_p=0.9, top_k=5, seed=i) for i in range(rows)]
    batch = SamplingBatch.build(records(make_seqs(params)), VOCAB, torch.device("cpu"))
    tensors = [batch.temperature, batch.top_p, batch.min_p, batch.top_k, batch.seeds_tensor]
    assert all(t is not None and t.shape == (rows,) and t.stride(0) == 1 for t in tensors)
    assert all(t.data_ptr() % 16 == 0 for t in tensors)
    assert batch.temperature.tolist() == pytest.approx([p.temperature for p in params])
    assert batch.seeds_tensor.tolist() == batch.seeds and batch.top_k.tolist() == [5] * rows


def test_row_parameters_are_reused_while_the_rows_stay_and_rebuilt_when_they_change() -> None:
    sampler = Sampler(eos_token_id=0)
    seqs = make_seqs([SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=0.0),
                      SamplingParams(temperature=1.2, min_tokens=3)])
    first = sampler.batch(records(seqs), VOCAB, torch.device("cpu"))
    second = sampler.batch(records(seqs), VOCAB, torch.device("cpu"))
    assert second.temperature is first.temperature and second.top_k is first.top_k  # not rebuilt
    assert second.seeds != first.seeds  # unseeded rows draw fresh seeds every step
    assert first.any_min_tokens and first.any_top_p and not first.all_greedy
    seqs[2].append_tokens([7, 8, 9])  # its min_tokens are now met: checked per step, not cached
    assert not sampler.batch(records(seqs), VOCAB, torch.device("cpu")).any_min_tokens
    changed = sampler.batch(records([seqs[1], seqs[0]]), VOCAB, torch.device("cpu"))  # other rows, other order
    assert changed.temperature.tolist() == pytest.approx([0.0, 0.7])
    assert changed.top_p.tolist() == pytest.approx([seqs[1].params.top_p, 0.9])
    greedy = sampler.batch(records([seqs[1]]), VOCAB, torch.device("cpu"))
    assert greedy.all_greedy and greedy.temperature is None
