"""Structured output in the engine: the door's check of constraints, the vocabulary xgrammar sees, the masks, and
the engine's rules (the grammar starts after `</think>`, a constrained answer ends with its grammar, a request
waits for its compile), on the fake runner with the byte-level tokenizer (no model, no shared data)."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import write_model_dir
from r1serve.config import EngineConfig
from r1serve.engine.fake_runner import FakeRunner
from r1serve.engine.grammar import (
    GrammarCompiler,
    check_structured_output,
    choice_grammar,
    grammar_error,
    tokenizer_info,
)
from r1serve.engine.llm_engine import LLMEngine, ReadThenMask
from r1serve.engine.model_runner import ModelRunner, RunnerFactory
from r1serve.engine.scheduler_output import ScheduledSeq
from r1serve.engine.structured import (
    GIL_SWITCH_INTERVAL_S,
    Guide,
    StructuredOutputs,
    TokenMasks,
)
from r1serve.errors import InvalidRequestError
from r1serve.outputs import RequestOutput
from r1serve.sampling_params import SamplingParams, StructuredOutput
from r1serve.tokenizer import ByteTokenizer

xgr = pytest.importorskip("xgrammar")

VOCAB = 151936
THINK_END = 151649


@pytest.mark.parametrize(("kind", "spec"), [
    ("json", '{"type": "nope"}'), ("json", "{not json"), ("regex", "(a"), ("grammar", 'root ::= undefined_rule'),
    ("grammar", "start: unknown_name"), ("choice", "[]"), ("choice", '["a", 1]'), ("choice", "not json"),
])
def test_an_invalid_constraint_is_an_error_naming_the_field(kind: str, spec: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_structured_output(StructuredOutput(kind, spec), "guided_x")  # type: ignore[arg-type]
    assert info.value.param == "guided_x" and "guided_x" in info.value.message
    assert ".cc:" not in info.value.message  # xgrammar's C++ location is dropped


@pytest.mark.parametrize(("kind", "spec"), [
    ("json", '{"type": "object", "properties": {"a": {"type": "integer"}}}'), ("json_object", ""),
    ("regex", "[a-z]{3}"), ("choice", '["yes", "no"]'), ("grammar", 'root ::= "a" | "b"'),
    ("grammar", 'start: "x" | "y"'),
])
def test_a_valid_constraint_passes_the_check(kind: str, spec: str) -> None:
    check_structured_output(StructuredOutput(kind, spec), "field")  # type: ignore[arg-type]


def test_an_unknown_kind_is_refused_when_built() -> None:
    with pytest.raises(InvalidRequestError) as info:
        StructuredOutput("yaml", "")  # type: ignore[arg-type]
    assert info.value.param == "structured_output.kind"


def test_grammar_error_keeps_the_message_without_the_source_location() -> None:
    error = RuntimeError("[09:38:31] /project/cpp/regex_converter.cc:94: Regex parsing error at position 3")
    assert grammar_error(error) == "Regex parsing error at position 3"


def matches(compiled: object, text: bytes) -> bool:
    matcher = xgr.GrammarMatcher(compiled)
    return all(matcher.accept_token(byte) for byte in text) and matcher.is_completed()


def test_choices_with_quotes_escapes_and_unicode_match_exactly_themselves() -> None:
    choices = ['say "hi"', "back\\slash", "tab\tand\nnewline", "héllo"]
    compiler = GrammarCompiler(ByteTokenizer(), VOCAB)
    compiled = compiler.compile(StructuredOutput("choice", json.dumps(choices)))
    for choice in choices:
        assert matches(compiled, choice.encode()), choice
    assert not matches(compiled, b"say hi")
    assert choice_grammar(["a"]) == 'root ::= "a"'


def test_the_byte_tokenizer_vocabulary_keeps_think_tags_and_hides_special_tokens() -> None:
    info = tokenizer_info(ByteTokenizer(), VOCAB)
    assert info.vocab_size == VOCAB and info.stop_token_ids == [151643]
    assert THINK_END not in info.special_token_ids and 151646 in info.special_token_ids  # BOS never allowed
    assert info.decoded_vocab[ord("{")] == b"{" and info.decoded_vocab[THINK_END] == b"</think>"


def test_masks_touch_only_the_constrained_rows() -> None:
    compiler = GrammarCompiler(ByteTokenizer(), VOCAB)
    matcher = xgr.GrammarMatcher(compiler.compile(StructuredOutput("regex", "[ab]")))
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)
    matcher.fill_next_token_bitmask(bitmask, 0)
    masks = TokenMasks(bitmask, rows=[1], num_rows=3)
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    masks.apply(logits)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    tokenizer = ByteTokenizer()
    assert allowed[:2] == [ord("a"), ord("b")] and {tokenizer.decode([t]) for t in allowed} == {"a", "b"}
    assert masks.allowed(1, VOCAB).tolist() == allowed and len(masks.allowed(0, VOCAB)) == VOCAB


def test_first_allowed_is_the_next_allowed_id_cyclically() -> None:
    vocab = 1000  # not a multiple of 32: the last word's high bits lie past the vocabulary
    generator = torch.Generator().manual_seed(0)
    rows = []
    for density in (0.5, 0.01, 0.002):
        rows.append(torch.rand(vocab, generator=generator) < density)
    rows.append(torch.zeros(vocab, dtype=torch.bool))
    rows[-1][[3, 997]] = True  # wraps around past the end
    packed = torch.zeros(len(rows), -(-vocab // 32), dtype=torch.int64)
    for r, row in enumerate(rows):
        for token in row.nonzero().flatten().tolist():
            packed[r, token // 32] |= 1 << (token % 32)
    bitmask = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    masks = TokenMasks(bitmask, rows=[0, 1, 2, 4], num_rows=5)
    for r, row_of_logits in enumerate([0, 1, 2, 4]):
        allowed = rows[r].nonzero().flatten().tolist()
        for token in torch.randint(0, vocab, (50,), generator=generator).tolist() + [0, vocab - 1, 997, 998]:
            later = [t for t in allowed if t >= token]
            assert masks.first_allowed(row_of_logits, token, vocab) == (later or allowed)[0]
    assert masks.first_allowed(3, 123, vocab) == 123  # a free row keeps its token


def test_a_step_s_masks_are_each_guide_s_own_whatever_its_row(byte_model_dir: Path) -> None:
    """`StructuredOutputs.masks` fills the rows of several guides at once (xgrammar's batch matcher): each row
    equals its matcher's own mask, free rows get none, and one guide alone gets the same. The masks' buffer is
    not initialised, so a fill must write every word: into zeros and into ones it gives the same row."""
    engine = make_engine(byte_model_dir)
    specs = ["[ab]{30}", "[0-9]{20}x", "(yes|no){10}"]
    for i, spec in enumerate(specs):
        engine.add_request("plain prompt", constrained("regex", spec), f"g{i}")
    deadline = time.monotonic() + 30  # all compiles done before any step: no request may finish first
    while not all(future.done() for _, future in engine.structured.compiling.values()):
        assert time.monotonic() < deadline, "grammars still compiling after 30 s"
        engine.structured.wait(0.1)
    engine.step()
    engine.add_request("plain prompt", SamplingParams(max_tokens=4), "free")
    guided = [engine.requests[f"g{i}"].seqs[0] for i in range(len(specs))]
    assert all(seq.guide is not None and seq.guide.running for seq in guided)
    seqs = [guided[0], engine.requests["free"].seqs[0], guided[1], guided[2]]
    masks = engine.structured.masks([seq.guide for seq in seqs])
    assert masks is not None and masks.rows == [0, 2, 3]
    for i, seq in zip(masks.rows, [guided[0], guided[1], guided[2]], strict=True):
        own = xgr.allocate_token_bitmask(1, engine.model_config.vocab_size)
        seq.guide.matcher.fill_next_token_bitmask(own, 0)
        assert torch.equal(masks.bitmask[masks.rows.index(i)], own[0])
        zeros = torch.zeros_like(own)
        seq.guide.matcher.fill_next_token_bitmask(zeros, 0)
        assert torch.equal(zeros, own)
    alone = engine.structured.masks([guided[1].guide])
    assert alone is not None and torch.equal(alone.bitmask[0], masks.bitmask[1])

def test_a_step_s_accepts_run_on_the_grammar_thread_ahead_of_the_next_fill(monkeypatch: pytest.MonkeyPatch) -> None:
    """`accept_later` queues a step's tokens on the grammar thread in one batch; each row's verdict (go on,
    "stop", "abort") is its own matcher's. A fill queued behind them sees the accepted states, and a row whose
    grammar they terminated (its sequence is done) allows every token instead of failing the fill."""
    compiled = GrammarCompiler(ByteTokenizer(), VOCAB).compile(StructuredOutput("regex", "[ab]{2}"))
    batch_accept = xgr.BatchGrammarMatcher.batch_accept_token
    threads: list[str] = []

    def recording(matchers, tokens):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return batch_accept(matchers, tokens)

    monkeypatch.setattr(xgr.BatchGrammarMatcher, "batch_accept_token", staticmethod(recording))
    structured = StructuredOutputs(ByteTokenizer(), VOCAB)
    rows = 20
    seqs = [SimpleNamespace(guide=Guide(compiled), request=SimpleNamespace(request_id=f"r{i}"), is_finished=False)
            for i in range(rows)]
    for seq in seqs:
        structured.start(seq)  # type: ignore[arg-type]
    firsts = [ord("a") if i % 7 else ord("z") for i in range(rows)]  # every seventh is refused
    assert structured.accept_later(seqs, firsts)() == [None if i % 7 else "abort" for i in range(rows)]  # type: ignore
    assert threads[0].startswith("r1serve-grammar") and structured.num_running == rows - 3
    going = [seq for i, seq in enumerate(seqs) if i % 7]
    assert structured.accept_later(going, [ord("b")] * len(going))() == [None] * len(going)  # type: ignore[arg-type]
    eos = 151643  # a complete answer ends with the EOS, which its mask alone then allows
    ends = structured.accept_later(going[:5], [eos] * 5)  # type: ignore[arg-type]
    with torch.inference_mode():  # as the runner asks: the buffer is an inference tensor
        waiter = structured.fill_later([seq.guide for seq in going])  # planned while those five still run
    masks = waiter()
    assert ends() == ["stop"] * 5 and structured.num_running == len(going) - 5
    assert masks is not None and masks.rows == list(range(len(going)))
    assert masks.allowed(0, VOCAB).numel() == VOCAB  # terminated: every token (its sample is dropped)
    assert masks.allowed(len(going) - 1, VOCAB).tolist() == [eos]  # "ab" accepted: only the EOS is left
    structured.shutdown()


# ---- the engine, on the fake runner ------------------------------------------------------------------------


class ThinkingRunner(FakeRunner):
    """The fake runner, whose sequences close their reasoning with `</think>` after `THINK_TOKENS` tokens."""

    THINK_TOKENS = 3

    def token_for(self, item: ScheduledSeq) -> int:
        if item.end - item.spec.num_prompt_tokens == self.THINK_TOKENS:
            return THINK_END
        return super().token_for(item)


@pytest.fixture(scope="module")
def byte_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model folder without tokenizer files: the byte-level fallback tokenizer (dummy mode)."""
    from conftest import TINY_CONFIG

    return write_model_dir(tmp_path_factory.mktemp("so") / "tiny", TINY_CONFIG, with_tokenizer=False)


def make_engine(model_dir: Path, runner: RunnerFactory = FakeRunner) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), load_format="dummy", kv_cache_space=0.05),
                     runner_factory=runner)


def run_to_end(engine: LLMEngine) -> dict[str, RequestOutput]:
    final: dict[str, RequestOutput] = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            return final
        for out in engine.step():
            final[out.request_id] = out
    raise AssertionError("the engine did not finish")


def constrained(kind: str, spec: str, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_tokens=40, structured_output=StructuredOutput(kind, spec), **kwargs)  # type: ignore


THINK_PROMPT = "<｜User｜>hi<｜Assistant｜><think>\n"


def test_without_reasoning_the_whole_output_follows_the_grammar_and_ends_with_it(byte_model_dir: Path) -> None:
    engine = make_engine(byte_model_dir)
    engine.add_request("plain prompt", constrained("regex", "[a-c]{4}x", ignore_eos=True), "r")
    out = run_to_end(engine)["r"].outputs[0]
    assert re.fullmatch("[a-c]{4}x", out.text) and out.finish_reason == "stop"
    assert engine.structured.num_running == 0


def test_the_reasoning_is_free_and_the_answer_after_think_is_constrained(byte_model_dir: Path) -> None:
    engine = make_engine(byte_model_dir, ThinkingRunner)
    engine.add_request(THINK_PROMPT, constrained("choice", '["yes", "no"]'), "r")
    out = run_to_end(engine)["r"].outputs[0]
    reasoning, answer = out.text.split("</think>")
    assert len(reasoning) == ThinkingRunner.THINK_TOKENS and not re.fullmatch("yes|no", reasoning)
    assert answer in ("yes", "no") and out.finish_reason == "stop"
    assert out.token_ids[ThinkingRunner.THINK_TOKENS] == THINK_END


def test_the_thinking_budget_closes_the_reasoning_and_starts_the_grammar(byte_model_dir: Path) -> None:
    engine = make_engine(byte_model_dir)
    engine.add_request(THINK_PROMPT, constrained("regex", "[0-9]{3}", max_thinking_tokens=5), "r")
    out = run_to_end(engine)["r"].outputs[0]
    reasoning, answer = out.text.split("</think>")
    assert len(reasoning) == 5 + 1  # the budget, and the "\n" of the forced close
    assert re.fullmatch("[0-9]{3}", answer.strip()) and out.finish_reason == "stop"


def test_free_requests_keep_their_tokens_beside_constrained_ones(byte_model_dir: Path) -> None:
    engine = make_engine(byte_model_dir, ThinkingRunner)
    free = SamplingParams(max_tokens=12, ignore_eos=True)
    engine.add_request(THINK_PROMPT, free, "alone")
    alone = run_to_end(engine)["alone"].outputs[0].token_ids
    engine.add_request(THINK_PROMPT, free, "free")
    engine.add_request(THINK_PROMPT, constrained("regex", "[a-z]{6}"), "guided")
    outs = run_to_end(engine)
    assert outs["free"].outputs[0].token_ids == alone
    assert re.fullmatch("[a-z]{6}", outs["guided"].outputs[0].text.split("</think>")[1])


def test_a_request_aborted_while_its_grammar_compiles_ends_cleanly(byte_model_dir: Path) -> None:
    engine = make_engine(byte_model_dir)
    engine.add_request("p", constrained("json_object", ""), "r")
    out = engine.abort_request("r")
    assert out is not None and out.outputs[0].finish_reason == "abort" and not engine.has_unfinished()
    engine.step()  # the compile finishing later finds nothing to schedule
    assert not engine.structured.compiling


def test_a_constraint_that_fails_to_compile_aborts_its_request_alone(byte_model_dir: Path) -> None:
    engine = make_engine(byte_model_dir)
    engine.add_request("p", constrained("regex", "(unclosed"), "bad")
    engine.add_request("p", SamplingParams(max_tokens=4, ignore_eos=True), "good")
    outs = run_to_end(engine)
    assert outs["bad"].outputs[0].finish_reason == "abort"
    assert outs["good"].outputs[0].finish_reason == "length"


class OrderRecordingRunner(FakeRunner):
    """The fake runner, recording for each step whether its masks came late, whether the step before had been
    read when they were asked for, and whether the step before's sampling was still waiting at this launch."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.steps: list[tuple[bool, bool]] = []  # (late masks, the step before was still unread at launch)
        self.deferred_at_launch: list[bool] = []

    def execute(self, sched, late_masks=None):  # type: ignore[no-untyped-def]
        unread = isinstance(late_masks, ReadThenMask) and late_masks.previous is not None
        self.steps.append((late_masks is not None, unread))
        self.deferred_at_launch.append(self._deferred is not None)
        return super().execute(sched, late_masks)


def test_a_constrained_step_launches_before_the_step_before_is_read(byte_model_dir: Path) -> None:
    """While a guide runs, the step is launched first and the step before is read when the runner asks for the
    masks (host work beside the device's forward pass), and the answer still follows its grammar."""
    engine = make_engine(byte_model_dir, OrderRecordingRunner)
    runner = engine.runner
    assert isinstance(runner, OrderRecordingRunner)
    engine.add_request("plain prompt", constrained("regex", "[a-c]{12}x", ignore_eos=True), "r")
    out = run_to_end(engine)["r"].outputs[0]
    assert re.fullmatch("[a-c]{12}x", out.text) and out.finish_reason == "stop"
    late = [step for step in runner.steps if step[0]]
    assert len(late) >= 10 and all(unread for _, unread in late)
    assert runner.steps[0] == (False, False)  # the first step has no step before: masks up front
    # each late step's sampling waited for its masks until the next launch: the fill overlapped that host work
    assert sum(runner.deferred_at_launch) >= len(late) - 1


def test_the_masks_are_filled_on_the_grammar_thread(byte_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(byte_model_dir)
    threads: list[str] = []
    fill = engine.structured._fill

    def recording_fill(matchers, bitmask):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        fill(matchers, bitmask)

    monkeypatch.setattr(engine.structured, "_fill", recording_fill)
    engine.add_request("plain prompt", constrained("regex", "[a-c]{12}x", ignore_eos=True), "r")
    out = run_to_end(engine)["r"].outputs[0]
    assert re.fullmatch("[a-c]{12}x", out.text) and out.finish_reason == "stop"
    assert threads[0] == "MainThread"  # the first step's masks, up front
    assert len(threads) >= 10 and all(name.startswith("r1serve-grammar") for name in threads[1:])
    assert sys.getswitchinterval() <= GIL_SWITCH_INTERVAL_S


def test_a_fill_that_fails_aborts_the_constrained_requests_alone(byte_model_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(byte_model_dir)
    fill = engine.structured._fill

    def failing_late_fill(matchers, bitmask):  # type: ignore[no-untyped-def]
        if threading.current_thread().name.startswith("r1serve-grammar"):
            raise RuntimeError("no masks today")
        fill(matchers, bitmask)

    monkeypatch.setattr(engine.structured, "_fill", failing_late_fill)
    engine.add_request("plain prompt", constrained("regex", "[a-c]{12}x", ignore_eos=True), "guided")
    engine.add_request("plain prompt", SamplingParams(max_tokens=20, ignore_eos=True), "free")
    outs = run_to_end(engine)
    assert outs["guided"].outputs[0].finish_reason == "abort"  # its unmasked token was outside the grammar
    assert outs["free"].outputs[0].finish_reason == "length" and len(outs["free"].outputs[0].token_ids) == 20
    assert engine.structured.num_running == 0 and not engine.has_unfinished()


def test_a_deferred_sampling_read_outside_a_launch_runs_in_inference_mode(byte_model_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A step's deferred sampling may run when its tokens are read (the last step launched), outside `execute`; on
    CUDA it copies into a pinned buffer made in inference mode, which only inference mode may write."""
    engine = make_engine(byte_model_dir, ModelRunner)
    modes: list[bool] = []
    sampler = engine.runner.sampler

    class Recording:
        def __getattr__(self, name: str) -> object:
            return getattr(sampler, name)

        def __call__(self, logits: torch.Tensor, batch: object) -> torch.Tensor:
            modes.append(torch.is_inference_mode_enabled())
            return sampler(logits, batch)

    monkeypatch.setattr(engine.runner, "sampler", Recording())
    engine.add_request("plain prompt", constrained("regex", "[a-c]{6}x", ignore_eos=True), "r")
    for _ in range(1000):  # the grammar compiles; the prefill samples at once; the first decode's sampling waits
        engine.step()
        if engine.runner._deferred is not None:
            break
        time.sleep(0.005)
    assert engine.in_flight is not None and len(modes) == 1
    assert not torch.is_inference_mode_enabled()
    assert len(engine.in_flight.sampled.tolist()) == 1  # read as the engine reads the last step launched
    assert modes == [True, True]


def test_a_grammar_that_ends_beside_others_leaves_them_constrained(byte_model_dir: Path) -> None:
    """The real runner (CPU): a short grammar terminates while the next step's fill, planned before its last
    token was read, still covers its row; the fill allows every token there, and the other rows keep their
    masks (a failed fill would leave them free, and their grammars would abort them)."""
    engine = make_engine(byte_model_dir, ModelRunner)
    specs = {"short": "[ab]{3}", "long": "[c-f]{24}", "longer": "[0-9]{30}"}
    for name, spec in specs.items():
        engine.add_request("plain prompt", constrained("regex", spec, ignore_eos=True), name)
    outs = run_to_end(engine)
    for name, spec in specs.items():
        out = outs[name].outputs[0]
        assert out.finish_reason == "stop" and re.fullmatch(spec, out.text), (name, out.finish_reason, out.text)
