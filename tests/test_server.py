"""The real `r1serve serve` process with a tiny dummy model, the usage rules on (the defaults), driven by the
official `openai` SDK and raw HTTP: chat and completions, streamed and not, the reasoning split, usage, the
policy header, every bad input, disconnects freeing KV blocks, 32 concurrent streams, metrics."""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from r1serve.r1_rules import split_reasoning
from r1serve.server.sse import parse_sse_data
from r1serve.tokenizer import load_tokenizer
from server_utils import ServerHandle, running_server

MODEL = "DeepSeek-R1-Distill-Qwen-1.5B"
BUDGET = 4  # the server's default thinking budget (--max-thinking-tokens)
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 16
SERVER_ARGS = ("--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
               "--max-thinking-tokens", str(BUDGET), "--served-model-name", "r1-alias")


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Any:
    with running_server(tiny_model_dir, *SERVER_ARGS) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


def post(server: ServerHandle, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120, **kwargs)


def stream_payloads(server: ServerHandle, path: str, body: dict[str, Any]) -> list[Any]:
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return parse_sse_data(list(response.iter_lines()))


def metric(server: ServerHandle, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    match = re.search(rf"^{re.escape(name + labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def wait_all_blocks_free(server: ServerHandle, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (metric(server, "r1serve_num_requests_running") == 0 and metric(server, "r1serve_num_requests_waiting") == 0
                and metric(server, "r1serve_kv_cache_free_blocks") == metric(server, "r1serve_kv_cache_total_blocks")):
            return
        time.sleep(0.2)
    raise AssertionError(f"KV blocks not all free after {timeout_s} s:\n{server.read_log()[-3000:]}")


def test_models_version_health(server: ServerHandle) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = httpx.get(f"{server.url}/v1/models").json()
    ids = [card["id"] for card in models["data"]]
    assert MODEL in ids and "r1-alias" in ids and any(i.endswith("/" + MODEL) for i in ids)
    assert all(card["max_model_len"] == MAX_MODEL_LEN for card in models["data"])
    version = httpx.get(f"{server.url}/version").json()
    assert version["load_format"] == "dummy" and version["dummy_weights"] is True
    assert version["quantization"] == "none"
    assert version["device"] == "cpu" and version["kernels"] == "torch" and version["attention"] == "torch"
    assert version["dtype"] in ("float32", "bfloat16") and version["kv_cache_dtype"] == version["dtype"]
    assert httpx.get(f"{server.url}/openapi.json").json()["info"]["title"] == "r1serve"
    assert httpx.get(f"{server.url}/docs").status_code == 200


@pytest.mark.slow
def test_seed_client_code_works_unchanged(server: ServerHandle) -> None:
    class LLMClient:  # the seeds' client, verbatim
        def __init__(self, base_url="http://localhost:8000/v1"):
            self.client = OpenAI(base_url=base_url, api_key="not-needed")

        def simple_chat(self, user_message, system_message=None):
            messages = []
            if system_message:
                messages.append({"role": "system", "content": system_message})
            messages.append({"role": "user", "content": user_message})
            r = self.client.chat.completions.create(model="DeepSeek-R1-Distill-Qwen-1.5B", messages=messages,
                                                    temperature=0.6, max_tokens=64)
            return r.choices[0].message.content

        def stream_chat(self, messages):
            for chunk in self.client.chat.completions.create(model="DeepSeek-R1-Distill-Qwen-1.5B",
                                                             messages=messages, stream=True, max_tokens=64):
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content

    llm = LLMClient(base_url=server.base_url)
    with ThreadPoolExecutor(1) as pool:  # both at once: the engine batches them (CPU time is scarce here)
        answer_future = pool.submit(llm.simple_chat, "What is 2+2?", "You are a helpful assistant.")
        pieces = list(llm.stream_chat([{"role": "user", "content": "Count to three."}]))
        answer = answer_future.result()
    assert isinstance(answer, str) and answer  # the thinking budget closed the reasoning: there is an answer
    assert pieces and all(isinstance(p, str) for p in pieces)


def test_chat_reasoning_split_full_and_streamed_agree(server: ServerHandle, client: OpenAI) -> None:
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0,
               "max_tokens": 10}
    raw = client.chat.completions.with_raw_response.create(**request, extra_body={"ignore_eos": True})
    full = raw.parse()
    policy = raw.headers["x-r1serve-policy"].split(",")
    assert {"forced-thinking", "reasoning-split", f"thinking-budget={BUDGET}", "repetition-guard",
            "temperature-out-of-range", "default-top-p"} <= set(policy)
    message, usage = full.choices[0].message, full.usage
    assert message.reasoning_content and message.content  # the budget forced </think> after 4 tokens
    assert "</think>" not in message.reasoning_content + message.content
    assert full.choices[0].finish_reason == "length"
    assert usage.completion_tokens == 10 and usage.total_tokens == usage.prompt_tokens + 10
    assert usage.completion_tokens_details.reasoning_tokens == BUDGET + 1  # 4 sampled + the forced "\n"

    payloads = stream_payloads(server, "/v1/chat/completions",
                               {**request, "ignore_eos": True, "stream_options": {"include_usage": True}})
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["reasoning_content"]  # the role comes with the first text
    assert not any("role" in c["choices"][0]["delta"] for c in chunks[1:] if c["choices"])
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert not any(d.get("content") and d.get("reasoning_content") for d in deltas)  # never both in one chunk
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == message.reasoning_content
    assert "".join(d.get("content") or "" for d in deltas) == message.content
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    assert chunks[-1]["choices"] == []
    streamed_usage = chunks[-1]["usage"]
    assert (streamed_usage["prompt_tokens"], streamed_usage["completion_tokens"]) == (usage.prompt_tokens, 10)
    assert streamed_usage["completion_tokens_details"] == {"reasoning_tokens": BUDGET + 1}


def test_a_stream_interval_sends_fewer_chunks_of_the_same_text(tiny_model_dir: Path, client: OpenAI) -> None:
    """`--stream-interval 4` (vLLM's flag): the role still comes with the first text, the chunks carry about four
    tokens each, and the reasoning and answer are those of the full response."""
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0,
               "max_tokens": 16}
    message = client.chat.completions.create(**request, extra_body={"ignore_eos": True}).choices[0].message
    with running_server(tiny_model_dir, *SERVER_ARGS, "--stream-interval", "4") as gathered:
        payloads = stream_payloads(gathered, "/v1/chat/completions", {**request, "ignore_eos": True})
    deltas = [c["choices"][0]["delta"] for c in payloads[:-1] if c["choices"]]
    assert deltas[0]["role"] == "assistant" and deltas[0]["reasoning_content"]
    texts = [d for d in deltas if d.get("content") or d.get("reasoning_content")]
    assert 3 <= len(texts) <= 6  # 1 + 4 + 4 + 4 + 3 tokens, the answer's start splitting one output in two
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == message.reasoning_content
    assert "".join(d.get("content") or "" for d in deltas) == message.content


def test_chat_prompt_is_the_r1_template_with_forced_thinking(server: ServerHandle, client: OpenAI,
                                                              tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=3,
                                          extra_body={"ignore_eos": True})
    expected_ids = tokenizer.encode_chat([{"role": "user", "content": "Be brief.\n\nHi"}])
    assert tokenizer.decode(expected_ids, skip_special_tokens=False).endswith("<｜Assistant｜><think>\n")
    completion = client.completions.create(model=MODEL, prompt=expected_ids, temperature=0, max_tokens=3,
                                           extra_body={"ignore_eos": True})
    assert chat.usage.prompt_tokens == completion.usage.prompt_tokens == len(expected_ids)
    reasoning, content, _ = split_reasoning(completion.choices[0].text)
    assert (chat.choices[0].message.reasoning_content, chat.choices[0].message.content) == (reasoning, content)


def test_tokenize_counts_what_chat_sends_with_the_real_tokenizer(server: ServerHandle, tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = post(server, "/tokenize", {"model": MODEL, "messages": messages}).json()
    expected = tokenizer.encode_chat([{"role": "user", "content": "Be brief.\n\nHi"}])  # rules 1 and 3
    assert body == {"count": len(expected), "max_model_len": MAX_MODEL_LEN, "tokens": expected, "token_strs": None}
    chat = post(server, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == body["count"]
    text = post(server, "/detokenize", {"model": MODEL, "tokens": expected}).json()["prompt"]
    assert text.endswith("Be brief.\n\nHi<｜Assistant｜><think>\n")


def test_responses_api_through_the_sdk_full_and_streamed(client: OpenAI) -> None:
    extra = {"ignore_eos": True}
    full = client.responses.create(model=MODEL, input="Hi", instructions="Be brief.", max_output_tokens=10,
                                   temperature=0, extra_body=extra)
    assert full.status == "incomplete" and full.usage.output_tokens == 10
    assert [item.type for item in full.output] == ["reasoning", "message"]
    assert full.usage.output_tokens_details.reasoning_tokens == BUDGET + 1
    events = list(client.responses.create(model=MODEL, input="Hi", instructions="Be brief.", max_output_tokens=10,
                                          temperature=0, stream=True, extra_body=extra))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    streamed = events[-1].response
    assert streamed.output[0].content[0].text == full.output[0].content[0].text
    assert streamed.output_text == full.output_text


def test_request_thinking_budget_overrides_default_and_history_is_stripped(server: ServerHandle) -> None:
    messages = [{"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "<think>\nold\n</think>\n\nA1"},
                {"role": "user", "content": "Q2"}]
    response = post(server, "/v1/chat/completions", {"model": "r1-alias", "messages": messages, "max_tokens": 5,
                                                      "max_thinking_tokens": 1, "ignore_eos": True,
                                                      "temperature": 0.6, "top_p": 0.9, "seed": 3})
    assert response.status_code == 200, response.text
    policy = response.headers["x-r1serve-policy"].split(",")
    assert "history-stripped" in policy and "thinking-budget=1" in policy
    assert not {"system-folded", "default-temperature", "default-top-p", "temperature-out-of-range"} & set(policy)
    body = response.json()
    assert body["model"] == "r1-alias"
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 2


def test_reasoning_that_never_closes_is_all_reasoning(client: OpenAI) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          extra_body={"ignore_eos": True})  # 3 < budget: no </think>
    choice = chat.choices[0]
    assert choice.finish_reason == "length" and choice.message.content == ""
    assert choice.message.reasoning_content
    assert chat.usage.completion_tokens_details.reasoning_tokens == 3


def test_completions_text_ids_n_seed_and_stream(server: ServerHandle, client: OpenAI) -> None:
    text = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, n=2, seed=5,
                                     extra_body={"ignore_eos": True})
    assert sorted(c.index for c in text.choices) == [0, 1]
    assert text.object == "text_completion" and text.usage.completion_tokens == 8
    again = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, n=2, seed=5,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in text.choices]  # same seed, same samples

    body = {"model": MODEL, "prompt": [151646, 9707], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    full = post(server, "/v1/completions", body).json()
    assert full["usage"]["prompt_tokens"] == 2 and "x-r1serve-policy" not in full
    payloads = stream_payloads(server, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert payloads[-1] == "[DONE]" and payloads[-2]["usage"]["completion_tokens"] == 4
    text_chunks = [p["choices"][0] for p in payloads[:-2]]
    assert "".join(c["text"] for c in text_chunks) == full["choices"][0]["text"]
    assert text_chunks[-1]["finish_reason"] == "length"


def test_stop_string_ends_the_output(client: OpenAI) -> None:
    base = client.completions.create(model=MODEL, prompt="Stop here", max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[len(base) // 2:len(base) // 2 + 1]
    assert stop.strip(), f"need a visible character to stop on: {base!r}"
    stopped = client.completions.create(model=MODEL, prompt="Stop here", max_tokens=8, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True}).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == base[:base.index(stop)]


@pytest.mark.parametrize(("body", "status", "param"), [
    ("{not json", 400, None),
    ({"model": MODEL, "messages": "hi"}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}, 400, "max_tokens"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_MODEL_LEN}, 400,
     "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": MAX_NUM_SEQS + 1}, 400, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": -1}, 400,
     "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 400, "stop[0]"),
])
def test_bad_chat_input_gets_an_openai_error(server: ServerHandle, body: Any, status: int, param: str | None) -> None:
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {
        "json": body}
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert "Traceback" not in response.text


def test_bad_completion_input_and_unknown_route(server: ServerHandle) -> None:
    cases = [({"model": MODEL, "prompt": ""}, "prompt"), ({"model": MODEL, "prompt": [-1]}, "prompt[0]"),
             ({"model": MODEL, "prompt": "x", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
             ({"model": MODEL, "prompt": "x", "logprobs": 21}, "logprobs"),
             ({"model": MODEL, "prompt": ["a", "b"]}, "prompt")]
    for body, param in cases:
        response = post(server, "/v1/completions", body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (body, response.text)
    missing = httpx.get(f"{server.url}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{server.url}/health").status_code == 200  # and the server still serves


def test_openai_sdk_raises_typed_errors(client: OpenAI) -> None:
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)


@pytest.mark.slow
def test_repetition_guard_stops_a_loop(client: OpenAI) -> None:
    # a repetition penalty below 1 rewards repeating: the random model loops on one token at once
    out = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=200, temperature=0,
                                    extra_body={"ignore_eos": True, "repetition_penalty": 0.05})
    assert out.choices[0].finish_reason == "repetition" and out.usage.completion_tokens < 200


def test_disconnect_mid_stream_frees_kv_blocks(server: ServerHandle) -> None:
    before = metric(server, "r1serve_generation_tokens_total")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data:") for line in received)
    wait_all_blocks_free(server)
    assert metric(server, "r1serve_generation_tokens_total") - before < 400  # it was aborted, not finished


def test_disconnect_while_waiting_for_full_response_frees_kv_blocks(server: ServerHandle) -> None:
    body = {"model": MODEL, "prompt": "Go on", "max_tokens": MAX_MODEL_LEN - 8, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    wait_all_blocks_free(server)
    assert "client disconnected; aborted" in server.read_log()


def test_32_concurrent_streams_all_complete(server: ServerHandle) -> None:
    async def one(client: AsyncOpenAI, i: int) -> tuple[str | None, int]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"stream {i}"}], max_tokens=4, stream=True,
            temperature=0, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        finish, tokens = None, -1
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return finish, tokens

    async def run_all() -> list[tuple[str | None, int]]:
        async with AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    assert asyncio.run(run_all()) == [("length", 4)] * 32
    wait_all_blocks_free(server)


def test_metrics_expose_traffic_latency_and_engine_state(server: ServerHandle) -> None:
    text = httpx.get(f"{server.url}/metrics").text
    assert 'r1serve_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'r1serve_http_requests_total{route="/v1/chat/completions",status="400"}' in text
    assert 'r1serve_requests_finished_total{finish_reason="length"}' in text
    for name in ("r1serve_time_to_first_token_seconds_count", "r1serve_inter_token_latency_seconds_count",
                 "r1serve_e2e_request_latency_seconds_count", "r1serve_prompt_tokens_total",
                 "r1serve_generation_tokens_total", "r1serve_prefix_cache_queries_total"):
        assert metric(server, name) > 0, name
    assert 0.0 <= metric(server, "r1serve_kv_cache_usage_ratio") <= 1.0
    assert metric(server, "r1serve_model_loaded") == 1.0
    assert metric(server, "r1serve_prefix_cache_hits_total") >= 0
