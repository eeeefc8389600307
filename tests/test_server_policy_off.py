"""The real server with every usage rule switched off by its flag (and `--enforce-temperature` on its own),
behind `--api-key`: what reaches the model is then the request as sent, and the header says nothing applied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from r1serve.tokenizer import load_tokenizer
from server_utils import ServerHandle, running_server

MODEL = "DeepSeek-R1-Distill-Qwen-1.5B"
KEY = "s3cret-key"
OFF_FLAGS = ("--no-fold-system-prompt", "--no-r1-sampling-defaults", "--no-force-thinking",
             "--no-strip-history-reasoning", "--no-reasoning-split", "--no-thinking-budget",
             "--no-repetition-guard", "--enforce-temperature")


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Any:
    with running_server(tiny_model_dir, "--dtype", "float32", "--max-model-len", "512", "--api-key", KEY,
                        *OFF_FLAGS) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)


def test_api_key_is_required_on_v1_routes_only(server: ServerHandle) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()


def test_prompt_is_the_request_as_sent(client: OpenAI, tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, temperature=0.6,
                                                           top_p=0.9, seed=11, max_tokens=4,
                                                           extra_body={"ignore_eos": True,
                                                                       "max_thinking_tokens": 1})
    chat = raw.parse()
    assert raw.headers["x-r1serve-policy"] == "none"
    expected_ids = tokenizer.encode_chat(messages, force_thinking=False)  # system segment kept, no <think>
    assert not tokenizer.decode(expected_ids, skip_special_tokens=False).endswith("<think>\n")
    completion = client.completions.create(model=MODEL, prompt=expected_ids, temperature=0.6, top_p=0.9, seed=11,
                                           max_tokens=4, extra_body={"ignore_eos": True})
    assert chat.usage.prompt_tokens == len(expected_ids)
    message = chat.choices[0].message
    assert message.content == completion.choices[0].text  # raw text: no split, no budget-forced </think>
    assert message.reasoning_content is None
    assert chat.usage.completion_tokens_details.reasoning_tokens == 0  # no <think> was opened


def test_switched_off_rules_leave_no_trace_in_the_header(client: OpenAI) -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "<think>\nold\n</think>\n\nA1"}, {"role": "user", "content": "Q2"}]
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=1,
                                                           temperature=0.6)
    assert raw.headers["x-r1serve-policy"] == "none"  # no defaults, no folding, no stripping, no guard
    for temperature in (1.5, None):  # None: OpenAI's default 1.0 (rule 2 is off), clamped all the same
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=1, **({"temperature": temperature} if temperature else {}))
        assert raw.headers["x-r1serve-policy"] == "temperature-out-of-range,temperature-clamped"


@pytest.mark.slow
def test_without_the_guard_a_loop_runs_to_max_tokens(client: OpenAI) -> None:
    # the request that the default server stops with "repetition" after 112 tokens (tests/test_server.py)
    out = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=130, temperature=0,
                                    extra_body={"ignore_eos": True, "repetition_penalty": 0.05})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 130
