"""Bench workloads (exact prompt lengths, seeds, datasets, JSONL), the tokenizer fallback, and flag parsing."""

from __future__ import annotations

import json
import math
import random
import shlex
from pathlib import Path

import pytest

from conftest import SHARED_DATA, TOKENIZER_DIR
from r1serve.bench.cli import parse_config
from r1serve.bench.request import R1_TEMPLATE, Endpoint, build_payload
from r1serve.bench.tokens import COMMON_WORDS, BenchTokenizer, approximate_text
from r1serve.bench.workloads import BenchRequest, LengthRange, WorkloadSpec, build_requests


@pytest.fixture(scope="module")
def tokenizer() -> BenchTokenizer:
    if not (TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip(f"no real tokenizer at {TOKENIZER_DIR}")
    return BenchTokenizer(TOKENIZER_DIR)


def test_random_prompts_have_exact_token_lengths(tokenizer: BenchTokenizer) -> None:
    spec = WorkloadSpec("random", input_len=LengthRange(100, 700), output_len=LengthRange(5, 9))
    requests = build_requests(spec, 20, seed=1, tokenizer=tokenizer)
    for r in requests:
        assert tokenizer.count(r.prompt) == r.prompt_len
        assert 100 <= r.prompt_len <= 700 and 5 <= r.max_tokens <= 9 and r.fixed_output
    assert len({r.prompt_len for r in requests}) > 5  # really ranged
    assert [r.prompt for r in build_requests(spec, 20, seed=1, tokenizer=tokenizer)] == [r.prompt for r in requests]
    assert build_requests(spec, 20, seed=2, tokenizer=tokenizer)[0].prompt != requests[0].prompt


def test_fixed_lengths_and_default_output(tokenizer: BenchTokenizer) -> None:
    requests = build_requests(WorkloadSpec("random", input_len=LengthRange(512, 512)), 5, 0, tokenizer)
    assert {r.prompt_len for r in requests} == {512}
    assert {tokenizer.count(r.prompt) for r in requests} == {512}
    assert {r.max_tokens for r in requests} == {128}


def test_approximation_without_tokenizer_is_one_token_per_word(tokenizer: BenchTokenizer) -> None:
    """The documented approximation: each common word is exactly one token of the R1 (Qwen2) tokenizer."""
    assert all(tokenizer.count(" " + w) == 1 for w in COMMON_WORDS)
    text = approximate_text(300, random.Random(0))
    assert tokenizer.count(text) == 300
    requests = build_requests(WorkloadSpec("random", input_len=LengthRange(64, 64)), 3, 0, None)
    assert {r.prompt_len for r in requests} == {64}
    assert {len(r.prompt.split()) for r in requests} == {64}


def test_shared_prefix_groups(tokenizer: BenchTokenizer) -> None:
    spec = WorkloadSpec("shared-prefix", input_len=LengthRange(20, 20), prefix_len=200, num_groups=3)
    requests = build_requests(spec, 12, seed=0, tokenizer=tokenizer)
    first_words = {" ".join(r.prompt.split()[:200]) for r in requests}
    assert len(first_words) == 3  # three groups share their 200-token prefix
    assert len({r.prompt for r in requests}) == 12  # suffixes differ
    for r in requests:
        assert r.prompt_len == 220 and tokenizer.count(r.prompt) == 220


@pytest.mark.parametrize("name, field", [("gsm8k", "question"), ("math500", "problem")])
def test_math_datasets(name: str, field: str, tokenizer: BenchTokenizer) -> None:
    path = SHARED_DATA / name
    if not (path / "test.jsonl").exists():
        pytest.skip(f"no {path}")
    questions = {json.loads(line)[field] for line in (path / "test.jsonl").open()}
    requests = build_requests(WorkloadSpec(name, dataset_path=SHARED_DATA), 10, 0, tokenizer)
    for r in requests:
        problem, instruction = r.prompt.rsplit("\n", 1)
        assert problem in questions and "\\boxed{}" in instruction
        assert r.max_tokens is None and not r.fixed_output  # the model decides the length
        assert r.prompt_len == tokenizer.count(r.prompt)
    capped = build_requests(WorkloadSpec(name, dataset_path=path, output_len=LengthRange(64, 64)), 3, 0, None)
    assert {r.max_tokens for r in capped} == {64}


def test_jsonl_workload_cycles_and_reads_max_tokens(tmp_path: Path) -> None:
    file = tmp_path / "prompts.jsonl"
    file.write_text('{"prompt": "a"}\n\n{"prompt": "b", "max_tokens": 7}\n')
    requests = build_requests(WorkloadSpec("jsonl", dataset_path=file), 5, 0, None)
    assert sorted(r.prompt for r in requests[:2]) == ["a", "b"]
    assert {(r.prompt, r.max_tokens) for r in requests} == {("a", None), ("b", 7)}


@pytest.mark.parametrize("content, msg", [
    ('{"text": "x"}\n', "no non-empty string field 'prompt'"),
    ("{bad\n", "not valid JSON"),
    ('["x"]\n', "JSON object"),
    ('{"prompt": "x", "max_tokens": -1}\n', "max_tokens"),
    ("", "no records"),
])
def test_bad_jsonl(tmp_path: Path, content: str, msg: str) -> None:
    file = tmp_path / "p.jsonl"
    file.write_text(content)
    with pytest.raises(ValueError, match=msg):
        build_requests(WorkloadSpec("jsonl", dataset_path=file), 1, 0, None)


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs --dataset-path"):
        WorkloadSpec("gsm8k")
    with pytest.raises(ValueError, match="no JSONL file"):
        build_requests(WorkloadSpec("gsm8k", dataset_path=tmp_path), 1, 0, None)
    with pytest.raises(ValueError, match="LOW:HIGH"):
        LengthRange.parse("12:x")
    with pytest.raises(ValueError, match="invalid"):
        LengthRange.parse("9:3")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        BenchTokenizer(tmp_path)


def test_payloads() -> None:
    req = BenchRequest("Hi", 1, 16, fixed_output=True)
    chat = build_payload(Endpoint("http://h", "chat", "m", extra_body={"max_thinking_tokens": 8}), req)
    assert chat["messages"] == [{"role": "user", "content": "Hi"}]
    assert chat["stream"] and chat["stream_options"] == {"include_usage": True}
    assert chat["ignore_eos"] and chat["max_tokens"] == 16 and chat["max_thinking_tokens"] == 8
    assert "temperature" not in chat
    comp = build_payload(Endpoint("http://h", "completions", "m", ignore_eos=False, temperature=0.6,
                                  prompt_template=R1_TEMPLATE), BenchRequest("Q", None, None, False))
    assert comp["prompt"] == "<｜User｜>Q<｜Assistant｜><think>\n"
    assert "ignore_eos" not in comp and "max_tokens" not in comp and comp["temperature"] == 0.6


def documented_sweep_commands() -> list[list[str]]:
    """The `r1serve bench` commands of docs/bench.md's serving-sweep section, as argument lists."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "bench.md").read_text()
    section = text.split("## The serving sweep", 1)[1].split("\n## ", 1)[0]
    joined = section.replace("\\\n", " ")
    return [shlex.split(line)[2:] for line in joined.splitlines() if line.startswith("r1serve bench ")]


def test_cli_expresses_the_serving_sweep() -> None:
    """The two commands of docs/bench.md parse into the documented load points."""
    rate_args, conc_args = documented_sweep_commands()
    rate = parse_config(rate_args)
    assert rate.sweep == "request_rate" and rate.workload.name == "random"
    assert (rate.workload.input_len, rate.workload.output_len) == (LengthRange(512, 512), LengthRange(128, 128))
    assert [(p.request_rate, p.num_prompts, p.concurrency) for p in rate.points] == [(math.inf, 500, None),
                                                                                    (16.0, 500, None)]
    conc = parse_config(conc_args)
    assert conc.sweep == "concurrency"
    assert (conc.workload.input_len, conc.workload.output_len) == (LengthRange(1024, 1024),) * 2
    assert [p.concurrency for p in conc.points] == [1, 16, 64, 256]
    assert all(p.num_prompts >= p.concurrency for p in conc.points)
    two = parse_config(["--url", "http://a:1/v1", "--url", "http://b:2"])
    assert two.urls == ("http://a:1/v1", "http://b:2")


def test_cli_settings_are_json_and_complete() -> None:
    config = parse_config(["--workload", "math500", "--dataset-path", "/d", "--endpoint", "chat",
                           "--goodput", "ttft:500", "tpot:40", "--max-thinking-tokens", "64",
                           "--api-key", "secret", "--duration", "30", "--concurrency", "8"])
    settings = json.loads(json.dumps(config.to_dict()))
    assert settings["workload"]["name"] == "math500" and settings["endpoint"] == "chat"
    assert settings["goodput_slos_ms"] == {"ttft": 500.0, "tpot": 40.0}
    assert settings["extra_body"] == {"max_thinking_tokens": 64}
    assert settings["points"] == [{"concurrency": 8, "request_rate": "inf", "num_prompts": None,
                                   "duration_s": 30.0}]
    assert "secret" not in json.dumps(settings) and settings["api_key_set"]


@pytest.mark.parametrize("argv, msg", [
    (["--concurrency", "1,2", "--request-rate", "1,2"], "not both"),
    (["--concurrency", "1,2,3", "--num-prompts", "1,2"], "give 1 or 3"),
    (["--concurrency", "x"], "comma list"),
    (["--extra-body", "[1]"], "JSON object"),
    (["--goodput", "foo:1"], "NAME:MS"),
    (["--workload", "gsm8k"], "--dataset-path"),
    (["--duration", "5"], "without limit"),
])
def test_cli_bad_flags(argv: list[str], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        parse_config(argv)
