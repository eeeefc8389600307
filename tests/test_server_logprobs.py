"""Logprobs through the real server (tiny dummy model, the real tokenizer), with clients nobody here wrote: the
`openai` SDK for chat `logprobs` / `top_logprobs`, completions `logprobs` and `echo`, streamed and not; and
lm-evaluation-harness's `local-completions` / `local-chat-completions` models on two-item local tasks
(tests/data/lm_eval), whose log-likelihoods must be the ones our own /v1/completions echo returns."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from conftest import REPO, TOKENIZER_DIR
from server_utils import ServerHandle, running_server

MODEL = "DeepSeek-R1-Distill-Qwen-1.5B"
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
PROMPT = "The quick brown fox jumps over the lazy dog because"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Any:
    with running_server(tiny_model_dir, "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "8",
                        "--max-logprobs", "5") as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=120)


def chat(client: OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi there"}],
                                          max_tokens=8, **GREEDY, **kwargs)


def test_chat_logprobs_cover_every_token_with_ordered_tops(client: OpenAI) -> None:
    response = chat(client, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 8
    for item in content:
        assert item.bytes == list(item.token.encode("utf-8"))
        tops = item.top_logprobs
        assert len(tops) == 3 and [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        assert all(t.logprob <= 0.0 for t in tops)
        assert item.token == tops[0].token and item.logprob == pytest.approx(tops[0].logprob)  # greedy
    assert chat(client).choices[0].logprobs is None  # not asked, not there
    bare = chat(client, logprobs=True).choices[0].logprobs.content
    assert [i.logprob for i in bare] == pytest.approx([i.logprob for i in content])
    assert all(i.top_logprobs == [] for i in bare)


def test_chat_stream_chunks_carry_their_tokens_logprobs(client: OpenAI) -> None:
    whole = chat(client, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    streamed = []
    for chunk in chat(client, logprobs=True, top_logprobs=2, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed.extend(choice.logprobs.content)
    assert [i.token for i in streamed] == [i.token for i in whole]
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in whole], abs=1e-5)


def test_completion_logprobs_and_echo(client: OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=2, **GREEDY)
    choice = plain.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == choice.text and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert token in top and top[token] == pytest.approx(logprob) and 2 <= len(top) <= 3
        assert logprob == pytest.approx(max(top.values()))  # greedy
    echo = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=2, echo=True, **GREEDY)
    echoed = echo.choices[0]
    num_prompt = echo.usage.prompt_tokens
    assert echoed.text == PROMPT + choice.text
    assert len(echoed.logprobs.tokens) == num_prompt + 4
    assert echoed.logprobs.token_logprobs[0] is None and echoed.logprobs.top_logprobs[0] is None
    assert all(x is not None and x <= 0.0 for x in echoed.logprobs.token_logprobs[1:])
    assert echoed.logprobs.token_logprobs[num_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-5)
    offsets = echoed.logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].logprobs is None


def test_completion_stream_with_echo_matches_the_full_response(client: OpenAI) -> None:
    kwargs = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "logprobs": 1, "echo": True, **GREEDY}
    whole = client.completions.create(**kwargs).choices[0]
    text, tokens, token_logprobs, offsets = "", [], [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                token_logprobs += choice.logprobs.token_logprobs
                offsets += choice.logprobs.text_offset
    assert text == whole.text and tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert token_logprobs[0] is None
    assert token_logprobs[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-5)


def test_max_tokens_0_with_echo_scores_the_prompt_alone(client: OpenAI) -> None:
    """OpenAI's legacy scoring call: the prompt's text and logprobs, nothing generated, no completion tokens."""
    kwargs = {"model": MODEL, "prompt": PROMPT, "logprobs": 1, "echo": True, **GREEDY}
    scored = client.completions.create(max_tokens=0, **kwargs)
    choice, reference = scored.choices[0], client.completions.create(max_tokens=3, **kwargs).choices[0]
    num_prompt = scored.usage.prompt_tokens
    assert choice.text == PROMPT and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    assert len(choice.logprobs.tokens) == num_prompt and choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs == pytest.approx(reference.logprobs.token_logprobs[:num_prompt], abs=1e-5)
    text, tokens = "", []
    for chunk in client.completions.create(max_tokens=0, stream=True, **kwargs):
        for part in chunk.choices:
            text += part.text
            tokens += part.logprobs.tokens if part.logprobs is not None else []
    assert text == PROMPT and tokens == choice.logprobs.tokens


def test_vllm_prompt_logprobs_give_each_prompt_token_with_its_rank(client: OpenAI) -> None:
    """vLLM's `prompt_logprobs: k`: per prompt token after the first, a dict from token id to logprob, rank and
    decoded token, holding the prompt token and the k likeliest (rank 1..k); the same figures as echo's."""
    kwargs = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "temperature": 0.0}
    response = client.completions.create(**kwargs, extra_body={"prompt_logprobs": 2})
    entries = response.choices[0].model_extra["prompt_logprobs"]
    echo = client.completions.create(**kwargs, logprobs=0, echo=True).choices[0].logprobs
    num_prompt = response.usage.prompt_tokens
    assert len(entries) == num_prompt and entries[0] is None
    for j, entry in enumerate(entries[1:], start=1):
        ranks = sorted(item["rank"] for item in entry.values())
        assert ranks[:2] == [1, 2] and 2 <= len(entry) <= 3 and all(item["logprob"] <= 0 for item in entry.values())
        assert any(item["decoded_token"] == echo.tokens[j] and item["logprob"] == pytest.approx(
            echo.token_logprobs[j], abs=1e-5) for item in entry.values())  # the prompt token itself
    chat_response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=2, extra_body={"prompt_logprobs": 0})
    chat_entries = chat_response.model_extra["prompt_logprobs"]
    assert len(chat_entries) == chat_response.usage.prompt_tokens and chat_entries[0] is None
    assert all(len(e) == 1 and next(iter(e.values()))["rank"] >= 1 for e in chat_entries[1:])


def test_counts_over_max_logprobs_are_400s_naming_the_field(server: ServerHandle) -> None:
    cases = [("/v1/completions", {"prompt": PROMPT, "logprobs": 6}, "logprobs"),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                       "top_logprobs": 6}, "top_logprobs"),
             ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 6}, "prompt_logprobs"),
             ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
             ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens")]
    for route, body, param in cases:
        response = httpx.post(f"{server.url}{route}", json={"model": MODEL, **body}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
        message = response.json()["error"]["message"]
        assert "--max-logprobs" in message or "stream" in message or "echo" in message


# ---- lm-evaluation-harness ----------------------------------------------------------------------------------


@pytest.fixture
def lm_eval_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    lm_eval = pytest.importorskip("lm_eval")
    monkeypatch.chdir(REPO)  # the tasks' data_files are relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    from lm_eval.tasks import TaskManager

    return lm_eval, TaskManager(include_path=str(REPO / "tests" / "data" / "lm_eval"))


def run_lm_eval(lm_eval_env: Any, model: str, base_url: str, tasks: list[str], **kwargs: Any) -> dict[str, Any]:
    lm_eval, task_manager = lm_eval_env
    model_args = (f"model={MODEL},base_url={base_url},tokenizer_backend=huggingface,tokenizer={TOKENIZER_DIR},"
                  "num_concurrent=1,max_retries=1")
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=2, log_samples=True,
                                   task_manager=task_manager, **kwargs)


@pytest.mark.slow
def test_lm_eval_local_completions_loglikelihood_and_generation(lm_eval_env: Any, server: ServerHandle) -> None:
    results = run_lm_eval(lm_eval_env, "local-completions", f"{server.base_url}/completions",
                          ["r1serve_loglik", "r1serve_gen"])
    samples = results["samples"]["r1serve_loglik"]
    assert len(samples) == 2
    for sample in samples:
        loglik, is_greedy = sample["resps"][0][0]
        doc = sample["doc"]
        expected = echo_loglikelihood(server, doc["context"], doc["continuation"])
        assert math.isfinite(loglik) and loglik < 0.0
        assert loglik == pytest.approx(expected, abs=1e-4)
        assert isinstance(is_greedy, bool)
    assert math.isfinite(results["results"]["r1serve_loglik"]["perplexity,none"])
    generated = results["samples"]["r1serve_gen"]
    assert len(generated) == 2 and all(isinstance(s["resps"][0][0], str) for s in generated)
    assert results["results"]["r1serve_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)


def echo_loglikelihood(server: ServerHandle, context: str, continuation: str) -> float:
    """The continuation's log-likelihood from our own /v1/completions echo, as lm-eval computes it (the
    continuation's tokens are those after the context's; the tokenizer's BOS is not added, as lm-eval sends)."""
    def ids(text: str) -> list[int]:
        body = {"model": MODEL, "prompt": text, "add_special_tokens": False}
        return httpx.post(f"{server.url}/tokenize", json=body, timeout=30).json()["tokens"]

    context_ids = ids(context)
    whole = ids(context + continuation)
    body = {"model": MODEL, "prompt": whole, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0.0}
    choice = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    return sum(choice["logprobs"]["token_logprobs"][len(context_ids):len(whole)])


@pytest.mark.slow
def test_lm_eval_local_chat_completions_generation(lm_eval_env: Any, server: ServerHandle) -> None:
    results = run_lm_eval(lm_eval_env, "local-chat-completions", f"{server.base_url}/chat/completions",
                          ["r1serve_gen"], apply_chat_template=True)
    generated = results["samples"]["r1serve_gen"]
    assert len(generated) == 2 and all(isinstance(s["resps"][0][0], str) for s in generated)
    assert "exact_match,none" in results["results"]["r1serve_gen"]
