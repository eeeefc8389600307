"""The engine end to end on a tiny Qwen2: parity with transformers, batch invariance, chunked prefill,
preemption, prefix cache, block leaks, seeds, stop strings, the R1 token rules, bad input, failure isolation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from r1serve import LLM, SamplingParams
from r1serve.config import EngineConfig
from r1serve.engine.fake_runner import FakeRunner
from r1serve.engine.llm_engine import LLMEngine
from r1serve.engine.model_runner import ModelRunner, SampledTokens
from r1serve.engine.scheduler_output import SchedulerOutput
from r1serve.errors import EngineDeadError, InvalidRequestError
from r1serve.outputs import RequestOutput
from r1serve.sampling_params import RepetitionGuard

transformers = pytest.importorskip("transformers")

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path) -> LLM:
    return LLM(str(tiny_model_dir), load_format="dummy", dtype="float32", kv_cache_space=0.05)


def prompts_of_mixed_lengths(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 100000) for _ in range(rng.randrange(1, 60))] for _ in range(n)]


def greedy_tokens(llm: LLM, prompts: list[list[int]], max_tokens: int = 12) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_greedy_matches_transformers_generate(hf_model_dir: Path) -> None:
    assert len(list(hf_model_dir.glob("*.safetensors"))) > 1  # really sharded
    llm = LLM(str(hf_model_dir), dtype="float32", kv_cache_space=0.05)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(hf_model_dir, torch_dtype=torch.float32).eval()
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": q}])
               for q in ("What is 1+1?", "Tell me a story about a fox.", "你好")]
    ours = greedy_tokens(llm, prompts, max_tokens=16)
    for prompt, got in zip(prompts, ours, strict=True):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert got == ref


@pytest.mark.slow
def test_batch_invariance(llm: LLM) -> None:
    prompts = prompts_of_mixed_lengths(16)
    alone = [greedy_tokens(llm, [p])[0] for p in prompts[:6]]
    batched = greedy_tokens(llm, prompts)
    assert batched[:6] == alone


@pytest.mark.slow
def test_chunked_prefill_and_preemption_do_not_change_outputs(tiny_model_dir: Path, llm: LLM) -> None:
    prompts = prompts_of_mixed_lengths(16, seed=1)
    reference = greedy_tokens(llm, prompts, max_tokens=20)
    chunked = LLM(str(tiny_model_dir), load_format="dummy", dtype="float32", kv_cache_space=0.05,
                  max_num_batched_tokens=16)
    assert greedy_tokens(chunked, prompts, max_tokens=20) == reference
    tight = LLM(str(tiny_model_dir), load_format="dummy", dtype="float32", num_kv_blocks=12, block_size=16,
                max_model_len=128)
    assert greedy_tokens(tight, prompts, max_tokens=20) == reference
    assert tight.engine.stats().num_preemptions > 0
    assert tight.engine.block_manager.num_free_blocks == 12


def test_prefix_cache_hit_is_counted_and_output_unchanged(llm: LLM) -> None:
    prompt = prompts_of_mixed_lengths(1, seed=7)[0] * 3  # > 2 blocks
    first = greedy_tokens(llm, [prompt])
    hits_before = llm.engine.stats().prefix_cache_hits
    second = greedy_tokens(llm, [prompt])
    assert llm.engine.stats().prefix_cache_hits - hits_before >= 16 * (len(prompt) // 16 - 1)
    assert first == second


def test_n_samples_share_the_prompt(llm: LLM) -> None:
    prompt = prompts_of_mixed_lengths(1, seed=8)[0] * 2
    hits_before = llm.engine.stats().prefix_cache_hits
    out = llm.generate([prompt], SamplingParams(n=4, max_tokens=8, seed=3, top_p=1.0))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different samples
    assert llm.engine.stats().prefix_cache_hits - hits_before >= 3 * 16 * (len(prompt) // 16)


@pytest.mark.slow
def test_no_block_leaks_after_random_requests_and_aborts(llm: LLM) -> None:
    engine = llm.engine
    rng = random.Random(0)
    live: list[str] = []
    for _ in range(200):
        prompt = [rng.randrange(1000, 100000) for _ in range(rng.randrange(1, 40))]
        params = SamplingParams(n=rng.choice([1, 1, 2]), max_tokens=rng.randrange(1, 12), ignore_eos=True,
                                temperature=0.0)
        live.append(engine.add_request(prompt, params))
        if rng.random() < 0.5:
            engine.step()
        if rng.random() < 0.25:
            engine.abort_request(live.pop(rng.randrange(len(live))))
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.scheduler.num_unfinished == 0


@pytest.mark.slow
def test_seeds_reproduce(llm: LLM) -> None:
    prompt = [[1234, 5678, 91011]]
    run = lambda seed: llm.generate(prompt, SamplingParams(max_tokens=16, seed=seed, temperature=1.0, top_p=1.0))[0]
    assert run(5).outputs[0].token_ids == run(5).outputs[0].token_ids
    assert run(5).outputs[0].token_ids != run(6).outputs[0].token_ids


def test_stop_string_across_tokens_is_caught_and_not_emitted(llm: LLM) -> None:
    prompt = [[4242, 777, 31337]]
    full = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    tok = llm.tokenizer
    pieces = [tok.decode(full.token_ids[:i]) for i in range(len(full.token_ids) + 1)]
    # a stop string made of the end of token 5 and the start of token 6
    boundary = len(pieces[6])
    stop = full.text[boundary - 2: boundary + 2]
    assert len(stop) == 4 and stop not in full.text[: boundary - 2]
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    completion = out.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert completion.text == full.text[: full.text.index(stop)]


def test_streaming_deltas_add_up_to_the_text(llm: LLM) -> None:
    deltas, last = [], None
    for out in llm.stream([5, 6, 7], SamplingParams(max_tokens=20, seed=0, top_p=1.0)):
        deltas.append(out.outputs[0].delta_text)
        last = out
    assert last is not None and last.finished
    assert "".join(deltas) == last.outputs[0].text


def test_a_stream_interval_gathers_tokens_and_changes_nothing_else(tiny_model_dir: Path, llm: LLM) -> None:
    """With `stream_interval` 4 a sample's first token goes out alone, then four at a time, the rest at its end;
    the samples are the same as streamed token by token."""
    gathered = LLM(str(tiny_model_dir), load_format="dummy", dtype="float32", kv_cache_space=0.05, stream_interval=4)
    params = SamplingParams(n=2, max_tokens=14, seed=5, top_p=1.0, ignore_eos=True)
    sizes: dict[int, list[int]] = {0: [], 1: []}
    texts: dict[int, str] = {0: "", 1: ""}
    last = None
    for out in gathered.stream([5, 6, 7], params):
        for c in out.outputs:
            sizes[c.index].append(len(c.delta_token_ids))
            texts[c.index] += c.delta_text
        last = out
    assert last is not None and last.finished
    assert sizes == {0: [1, 4, 4, 4, 1], 1: [1, 4, 4, 4, 1]}
    assert [texts[c.index] for c in last.outputs] == [c.text for c in last.outputs]
    one_by_one = llm.generate([[5, 6, 7]], params)[0]
    assert [c.token_ids for c in last.outputs] == [c.token_ids for c in one_by_one.outputs]


def test_thinking_budget_closes_reasoning(llm: LLM) -> None:
    out = llm.chat([{"role": "user", "content": "hi"}],
                   SamplingParams(max_tokens=10, max_thinking_tokens=4, seed=1, ignore_eos=True))[0].outputs[0]
    think_end = llm.tokenizer.think_end_id
    assert out.token_ids.index(think_end) == 5  # 4 reasoning tokens, "\n", then </think>
    assert "\n</think>\n\n" in out.text
    zero = llm.chat([{"role": "user", "content": "hi"}],
                    SamplingParams(max_tokens=6, max_thinking_tokens=0, ignore_eos=True))[0].outputs[0]
    assert zero.text.startswith("\n</think>\n\n")


def test_repetition_guard_stops_a_loop(llm: LLM) -> None:
    guard = RepetitionGuard(max_period=4, min_repeats=4, min_span=8)
    # a huge frequency penalty of the wrong sign makes the model repeat itself
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True, repetition_guard=guard,
                            repetition_penalty=0.01)
    out = llm.generate([[100, 200, 300]], params)[0].outputs[0]
    assert out.finish_reason == "repetition" and len(out.token_ids) < 200


@pytest.mark.parametrize("field, kwargs", [
    ("max_tokens", {"max_tokens": 0}), ("top_p", {"top_p": 1.5}), ("top_p", {"top_p": 0.0}),
    ("temperature", {"temperature": -1.0}), ("n", {"n": 0}),
])
def test_bad_sampling_params_name_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_name_the_field(llm: LLM) -> None:
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([""])
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[1] * 5000])
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate([[1, 2]], SamplingParams(max_tokens=5000))
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_a_failing_request_does_not_stop_the_engine(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = llm.engine
    bad = engine.add_request([1, 2, 3], SamplingParams(max_tokens=5))
    good = engine.add_request([4, 5, 6], SamplingParams(max_tokens=5, ignore_eos=True))
    seq = engine.requests[bad].seqs[0]
    monkeypatch.setattr(seq.detokenizer, "add_tokens", lambda ids: 1 / 0)
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            finals[out.request_id] = out
    assert finals[bad].outputs[0].finish_reason == "abort"
    assert finals[good].outputs[0].finish_reason == "length" and len(finals[good].outputs[0].token_ids) == 5
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("stop_token_ids", [[999_999_999], [2**70], [True]])
def test_stop_token_ids_outside_the_vocabulary_are_refused_with_the_field(llm: LLM, stop_token_ids) -> None:
    with pytest.raises(InvalidRequestError) as info:
        llm.engine.add_request([1, 2, 3], SamplingParams(max_tokens=3, min_tokens=2, stop_token_ids=stop_token_ids))
    assert info.value.param == "stop_token_ids" and not llm.engine.has_unfinished()


class FaultyModelRunner(ModelRunner):
    """The real runner, except that a step carrying the request `fail_for` fails to launch."""

    fail_for: str | None = None

    def execute(self, sched: SchedulerOutput) -> SampledTokens:
        if any(item.request_id == self.fail_for for item in sched.scheduled):
            raise RuntimeError("rows of a bad request")
        return super().execute(sched)


class DeviceFailingRunner(FakeRunner):
    def execute(self, sched: SchedulerOutput) -> SampledTokens:
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")


def run_to_end(engine: LLMEngine) -> dict[str, RequestOutput]:
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            finals[out.request_id] = out
    return finals


def test_a_step_that_fails_for_one_request_aborts_that_request_alone(tiny_model_dir: Path) -> None:
    """A fault in a request's rows of a batched step (here: the runner fails whenever the request is in it) ends
    that request; the others in the same steps run on, and the prefix cache keeps what they computed."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), load_format="dummy", dtype="float32",
                                    kv_cache_space=0.05), runner_factory=FaultyModelRunner)
    engine.runner.fail_for = "bad"
    good_prompt = list(range(1000, 1040))  # 2.5 blocks: two full blocks go into the prefix cache
    engine.add_request([7, 8, 9] * 13, SamplingParams(max_tokens=6, ignore_eos=True), "bad")
    engine.add_request(good_prompt, SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0), "good")
    finals = run_to_end(engine)
    assert finals["bad"].outputs[0].finish_reason == "abort"
    assert finals["good"].outputs[0].finish_reason == "length" and len(finals["good"].outputs[0].token_ids) == 6
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert len(engine.block_manager.cached) >= 2  # the good request's prompt blocks stayed cached
    engine.runner.fail_for = None
    engine.add_request(good_prompt, SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0), "alone")
    alone = run_to_end(engine)["alone"]
    assert alone.outputs[0].token_ids == finals["good"].outputs[0].token_ids
    assert alone.num_cached_tokens == 32


def test_a_device_failure_ends_the_engine_with_engine_dead_error(tiny_model_dir: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), load_format="dummy", kv_cache_space=0.05),
                       runner_factory=DeviceFailingRunner)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(EngineDeadError, match="device failed"):
        engine.step()


def test_kv_cache_too_small_for_max_model_len_is_a_clear_error(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        LLMEngine(EngineConfig(model=str(tiny_model_dir), load_format="dummy", num_kv_blocks=2, max_model_len=4096))


def test_thinking_budget_applies_only_inside_reasoning(llm: LLM) -> None:
    plain = llm.generate([[100, 200, 300]], SamplingParams(max_tokens=8, max_thinking_tokens=2, ignore_eos=True,
                                                            temperature=0.0))[0].outputs[0]
    assert llm.tokenizer.think_end_id not in plain.token_ids  # no <think> in the prompt: nothing to close


@pytest.mark.slow
def test_pipelined_steps_give_the_outputs_of_steps_read_one_at_a_time(llm: LLM) -> None:
    """The engine launches step N+1 before reading step N; forcing it to read first must change nothing, also for
    the thinking budget (whose forced tokens void a sample in flight), seeds, n, stop strings and length limits."""
    chat = llm.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    requests = [
        (chat, SamplingParams(max_tokens=14, max_thinking_tokens=3, temperature=0.0, ignore_eos=True)),
        (chat, SamplingParams(max_tokens=14, max_thinking_tokens=5, seed=3, temperature=1.0, top_p=0.9, n=2,
                              ignore_eos=True)),
        ([4242, 777, 31337], SamplingParams(max_tokens=1, temperature=0.0)),
        ([11, 22, 33, 44], SamplingParams(max_tokens=20, seed=7, temperature=0.8, min_tokens=5)),
        ([5, 6, 7], SamplingParams(max_tokens=9, temperature=0.0, stop=["a"], ignore_eos=True)),
    ]

    def run() -> list[list[tuple[list[int], str | None]]]:
        outs = llm.generate([p for p, _ in requests], [sp for _, sp in requests])
        return [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outs]

    pipelined = run()
    llm.engine.num_sync_requests += 1  # as if a request with penalties were running: read each step first
    try:
        one_at_a_time = run()
    finally:
        llm.engine.num_sync_requests -= 1
    assert pipelined == one_at_a_time
    budget = pipelined[0][0][0]
    assert budget.index(llm.tokenizer.think_end_id) == 4  # 3 reasoning tokens, "\n", </think>
    assert len(pipelined[2][0][0]) == 1
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_a_cpu_engine_takes_the_threads_it_is_given_and_says_so(tiny_model_dir: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    before = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="r1serve"):
            LLM(str(tiny_model_dir), load_format="dummy", dtype="float32", kv_cache_space=0.01, num_cpu_threads=1)
        assert torch.get_num_threads() == 1
        assert "CPU engine: 1 threads" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_the_fake_runner_gives_a_sequence_the_same_tokens_alone_and_in_a_batch(tiny_model_dir: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), load_format="dummy", kv_cache_space=0.05),
                       runner_factory=FakeRunner)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = prompts_of_mixed_lengths(6, seed=3)
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, f"batch-{i}", stream=False)
    batch = run_to_end(engine)
    engine.add_request(prompts[2], params, "alone", stream=False)
    alone = run_to_end(engine)["alone"].outputs[0].token_ids
    assert alone == batch["batch-2"].outputs[0].token_ids and len(alone) == 8
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def _as_delta(out: RequestOutput) -> tuple:
    return (out.request_id, out.finished, out.num_cached_tokens,
            [(c.index, c.delta_text, c.delta_token_ids, c.finish_reason, c.stop_reason, c.delta_logprobs)
             for c in out.outputs], out.prompt_logprobs)


def test_step_deltas_are_the_deltas_of_step_outputs(tiny_model_dir: Path) -> None:
    """Two engines on the same requests and tokens: each step's deltas (what the child process sends) are the
    deltas of `step()`'s outputs, streamed or not, with n, stop strings, logprobs, an abort and the end."""
    config = EngineConfig(model=str(tiny_model_dir), load_format="dummy", dtype="float32", kv_cache_space=0.05,
                          stream_interval=2)
    engines = [LLMEngine(config) for _ in range(2)]
    requests = [
        ([11, 22, 33], SamplingParams(max_tokens=9, ignore_eos=True, n=2, seed=1), True),
        ([5, 6, 7, 8], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=["a"], logprobs=2), True),
        ([40, 41, 42], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=1), False),
        ([70, 71, 72], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True), True),
    ]
    for engine in engines:
        for i, (prompt, params, stream) in enumerate(requests):
            engine.add_request(prompt, params, f"r{i}", stream=stream)
    steps, seen_prompt_logprobs, seen_logprobs = 0, False, False
    while engines[0].has_unfinished():
        outputs, deltas = engines[0].step(), engines[1].step_deltas()
        assert [_as_delta(o) for o in outputs] == deltas
        seen_prompt_logprobs = seen_prompt_logprobs or any(o.prompt_logprobs for o in outputs)
        seen_logprobs = seen_logprobs or any(c.delta_logprobs for o in outputs for c in o.outputs)
        steps += 1
        if steps == 3:
            assert _as_delta(engines[0].abort_request("r3")) == engines[1].abort_delta("r3")
    assert not engines[1].has_unfinished() and steps > 3 and seen_prompt_logprobs and seen_logprobs
    assert engines[1].abort_delta("r3") is None


def test_deferred_sampled_tokens_sample_once_and_keep_a_failure() -> None:
    calls: list[int] = []

    def later() -> SampledTokens:
        calls.append(1)
        return SampledTokens(torch.tensor([5, 7]), None)

    tokens = SampledTokens.deferred(later)
    assert calls == []  # nothing runs until the runner's next launch or the read
    tokens.resolve()
    assert tokens.tolist() == [5, 7] and calls == [1]

    def failing() -> SampledTokens:
        raise RuntimeError("sampler failed")

    broken = SampledTokens.deferred(failing)
    with pytest.raises(RuntimeError, match="sampler failed"):
        broken.resolve()
    with pytest.raises(RuntimeError, match="sampler failed"):  # the step's read fails too, never reads []
        broken.tolist()
