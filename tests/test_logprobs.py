"""Logprobs in the engine: the device gather against a torch log_softmax reference, top-k order, the sampled
token's logprob, prompt logprobs against transformers' logits (chunked prefill, prefix cache, n > 1), and the
records' shapes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from r1serve import LLM, SamplingParams
from r1serve.engine.logprobs import FORCED, LogprobPlan, PromptSpan, StepLogprobs, gather, record_prompt
from r1serve.errors import InvalidRequestError

transformers = pytest.importorskip("transformers")


def test_gather_equals_log_softmax_and_orders_the_top() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 1000) * 4
    targets = torch.tensor([3, 999, 0, 512, 7])
    out = gather(logits, targets, 4)
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert out.shape == (5, 10)
    torch.testing.assert_close(out[:, 0].double(), reference[torch.arange(5), targets], atol=1e-5, rtol=0)
    ranks = (reference > reference[torch.arange(5), targets].unsqueeze(-1)).sum(-1) + 1
    assert out[:, 1].long().tolist() == ranks.tolist() and out[1, 1] > 1  # the rank counts what is likelier
    top_values, top_ids = out[:, 2:6], out[:, 6:10].long()
    assert bool((top_values[:, :-1] >= top_values[:, 1:]).all())  # most likely first
    torch.testing.assert_close(top_values.double(), reference.gather(-1, top_ids), atol=1e-5, rtol=0)
    assert torch.equal(top_ids[:, 0], reference.argmax(-1))
    assert gather(logits, targets, 0).shape == (5, 2)
    assert torch.equal(gather(logits, reference.argmax(-1), 0)[:, 1], torch.ones(5))  # the top token: rank 1


def test_unpack_keeps_each_rows_own_k() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    sampled = logits.argmax(-1)
    plan = LogprobPlan(sample_rows=[0, 2], sample_ks=[1, 3])
    packed = gather(logits[[0, 2]], sampled[[0, 2]], 3).flatten()
    samples, prompts = StepLogprobs(plan, packed).unpack()
    assert set(samples) == {0, 2} and prompts == {}
    assert len(samples[0][1]) == 1 and len(samples[2][1]) == 3
    assert samples[2][1][0] == int(sampled[2]) and samples[2][0] == pytest.approx(samples[2][2][0])
    assert samples[0][3] == samples[2][3] == 1  # the rank of the argmax
    span = PromptSpan(item=4, row=0, first_token=1, targets=[5, 6], k=0)
    packed = gather(logits[:2], torch.tensor([5, 6]), 0).flatten()
    _, prompts = StepLogprobs(LogprobPlan(prompt=[span]), packed).unpack()
    assert [len(e[1]) for e in prompts[4]] == [0, 0]


def test_record_prompt_drops_the_repeats_of_a_recomputed_prompt() -> None:
    recorded: list = [None]
    record_prompt(recorded, 1, [(-1.0, (), (), 1), (-2.0, (), (), 1)])
    record_prompt(recorded, 1, [(-9.0, (), (), 1), (-9.0, (), (), 1), (-3.0, (), (), 1)])  # recomputed
    assert [e[0] for e in recorded[1:]] == [-1.0, -2.0, -3.0]
    with pytest.raises(AssertionError):
        record_prompt(recorded, 7, [(-1.0, (), (), 1)])


def test_sampling_params_refuse_negative_counts() -> None:
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(**{name: -1})
        assert info.value.param == name


@pytest.fixture(scope="module")
def hf_model(hf_model_dir: Path) -> torch.nn.Module:
    return transformers.Qwen2ForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(hf_model_dir: Path) -> LLM:
    return LLM(str(hf_model_dir), dtype="float32", kv_cache_space=0.05)


def reference_logprobs(hf_model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position: row p is the distribution of token p + 1."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


PROMPT = [1000 + 37 * i % 90000 for i in range(41)]


@pytest.mark.parametrize("chunked", [False, True], ids=["whole-prefill", "chunked-prefill"])
def test_logprobs_match_transformers(hf_model_dir: Path, hf_model: torch.nn.Module, llm: LLM, chunked: bool) -> None:
    if chunked:  # a 41-token prompt in chunks of 16
        llm = LLM(str(hf_model_dir), dtype="float32", kv_cache_space=0.05, max_num_batched_tokens=16, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = llm.generate([PROMPT], params)[0]
    sample = out.outputs[0]
    reference = reference_logprobs(hf_model, PROMPT + sample.token_ids)
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(PROMPT)
    assert out.prompt_logprobs[0] is None
    for j in range(1, len(PROMPT)):
        logprob, top_ids, top_values, rank = out.prompt_logprobs[j]
        assert logprob == pytest.approx(float(reference[j - 1, PROMPT[j]]), abs=1e-4)
        assert rank == int((reference[j - 1] > reference[j - 1, PROMPT[j]]).sum()) + 1
        assert list(top_ids) == reference[j - 1].topk(2).indices.tolist()
        assert len(top_values) == 2
    assert sample.logprobs is not None and len(sample.logprobs) == len(sample.token_ids) == 6
    for i, (token, (logprob, top_ids, top_values, _)) in enumerate(zip(sample.token_ids, sample.logprobs,
                                                                       strict=True)):
        row = reference[len(PROMPT) - 1 + i]
        assert logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert top_ids[0] == token and top_values[0] == pytest.approx(logprob)  # greedy: the sample is the top
        assert list(top_values) == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)


def test_logprobs_are_of_the_raw_distribution_and_skip_the_prefix_cache(llm: LLM, hf_model: torch.nn.Module) -> None:
    llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=1))  # PROMPT's blocks now cached
    params = SamplingParams(temperature=2.0, top_k=5, seed=3, max_tokens=4, ignore_eos=True, logprobs=0,
                            prompt_logprobs=0, n=2)
    out = llm.generate([PROMPT], params)[0]
    assert len(out.prompt_logprobs) == len(PROMPT)  # computed again, not taken from the cache
    assert out.num_cached_tokens == 0
    for sample in out.outputs:
        reference = reference_logprobs(hf_model, PROMPT + sample.token_ids)
        for i, (token, (logprob, top_ids, _, rank)) in enumerate(zip(sample.token_ids, sample.logprobs,
                                                                     strict=True)):
            assert top_ids == () and 1 <= rank <= 5  # drawn under top_k=5: one of the five likeliest
            assert logprob == pytest.approx(float(reference[len(PROMPT) - 1 + i, token]), abs=1e-4)


def test_prompt_logprobs_equal_the_sampled_tokens_logprobs(llm: LLM) -> None:
    """The prompt path (every position's logits, through the lm_head in chunks) and the sampling path agree: the
    output fed back as a prompt gets the logprobs it was sampled with."""
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=8, ignore_eos=True, logprobs=2)
    sample = llm.generate([PROMPT], params)[0].outputs[0]
    again = llm.generate([PROMPT + sample.token_ids], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    fed_back = again.prompt_logprobs[len(PROMPT):]
    assert [e[0] for e in fed_back] == pytest.approx([e[0] for e in sample.logprobs], abs=1e-4)
    assert [e[1] for e in fed_back] == [e[1] for e in sample.logprobs]


def test_requests_that_do_not_ask_get_none(llm: LLM) -> None:
    asks = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=1)
    plain = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    with_logprobs, without = llm.generate([PROMPT, PROMPT[:9]], [asks, plain])
    assert without.outputs[0].logprobs is None and without.prompt_logprobs is None
    assert with_logprobs.prompt_logprobs is None and len(with_logprobs.outputs[0].logprobs) == 3
    assert llm.engine.num_logprob_requests == 0


def test_forced_budget_tokens_carry_no_logprob(llm: LLM) -> None:
    think = llm.tokenizer.think_start_id
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1, max_thinking_tokens=2)
    sample = llm.generate([PROMPT + [think]], params)[0].outputs[0]
    assert len(sample.logprobs) == len(sample.token_ids)
    forced = [i for i, entry in enumerate(sample.logprobs) if entry == FORCED]
    assert forced and sample.token_ids[forced[0]:forced[-1] + 1] == llm.engine.think_close_ids
    assert all(math.isfinite(e[0]) for i, e in enumerate(sample.logprobs) if i not in forced)
