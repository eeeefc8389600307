"""The app in-process, on a scripted engine whose output the test chooses: `</think>` cut across deltas, an
engine that fails mid-stream, a handler bug, the loading and overloaded states; and the flags generated from
`ServerSettings`. The split, policy, errors and SSE code under test are the real ones; only the engine is fake.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from r1serve.outputs import CompletionOutput, RequestOutput
from r1serve.sampling_params import SamplingParams
from r1serve.server import ServerSettings, create_app, server_state
from r1serve.server.cli import build_parser, main, parse_settings
from r1serve.server.sse import SSE_DONE, parse_sse_data, sse_event
from r1serve.tokenizer import load_tokenizer

MODEL = "DeepSeek-R1-Distill-Qwen-1.5B"
CHAT = {"model": MODEL, "messages": [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Q"}]}


class ScriptedEngine:
    """Streams the given text pieces as one sample (one token id per byte: the byte-level tokenizer)."""

    def __init__(self, pieces: list[str], fail_at: int | None = None, error: Exception | None = None) -> None:
        self.tokenizer = load_tokenizer(None)
        self.max_model_len = 256
        self.pieces, self.fail_at = pieces, fail_at
        self.error = error or RuntimeError("scripted engine failure")
        self.calls: list[tuple[Any, SamplingParams]] = []

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        self.calls.append((prompt, params))
        text, token_ids = "", []
        for i, piece in enumerate(self.pieces):
            if i == self.fail_at:
                raise self.error
            ids = self.tokenizer.encode(piece)
            text, token_ids = text + piece, token_ids + ids
            last = i == len(self.pieces) - 1
            sample = CompletionOutput(0, text, list(token_ids), "stop" if last else None, None, piece, ids)
            yield RequestOutput(request_id or "r", None, list(prompt), [sample], finished=last)
            await asyncio.sleep(0)

    async def abort(self, request_id: str) -> None:
        return None

    def stats(self) -> Any:
        return SimpleNamespace(num_running=0, num_waiting=0, num_total_blocks=8, num_free_blocks=8, kv_usage=0.0,
                               num_prompt_tokens=0, num_generation_tokens=0, prefix_cache_queries=0,
                               prefix_cache_hits=0, num_preemptions=0)

    def shutdown(self) -> None:
        return None


def make_client(engine: Any, **settings: Any) -> TestClient:
    return TestClient(create_app(engine, ServerSettings(model=f"/models/{MODEL}", **settings)),
                      raise_server_exceptions=False)


def stream(client: TestClient, body: dict[str, Any]) -> list[Any]:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        return parse_sse_data(list(response.iter_lines()))


SPLIT_PIECES = ["Let me ", "think</", "thi", "nk", ">\n", "\nThe answer", " is 4."]


def test_think_end_cut_across_deltas_streamed_and_full() -> None:
    client = make_client(ScriptedEngine(SPLIT_PIECES))
    payloads = stream(client, {**CHAT, "stream_options": {"include_usage": True}})
    assert payloads[-1] == "[DONE]"
    deltas = [p["choices"][0]["delta"] for p in payloads[:-1] if p["choices"]]
    assert all(not (d.get("content") and d.get("reasoning_content")) for d in deltas)
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Let me think"
    assert "".join(d.get("content") or "" for d in deltas) == "The answer is 4."
    reasoning_tokens = payloads[-2]["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert reasoning_tokens == len("Let me think")  # no </think> id in the output: re-encoded reasoning

    full = client.post("/v1/chat/completions", json=CHAT)
    message = full.json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("Let me think", "The answer is 4.")
    assert full.headers["x-r1serve-policy"] == ("system-folded,forced-thinking,default-temperature,default-top-p,"
                                                "repetition-guard,reasoning-split")


def test_think_end_token_counts_reasoning_by_id() -> None:
    engine = ScriptedEngine(["abc", "</think>", "\n\nok"])
    body = make_client(engine).post("/v1/chat/completions", json=CHAT).json()
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3  # a, b, c; then the </think> id
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "ok", "reasoning_content": "abc",
                                             "reasoning": "abc"}


def test_policy_reaches_the_engine() -> None:
    engine = ScriptedEngine(["x"])
    client = make_client(engine, max_thinking_tokens=7)
    body = {**CHAT, "max_completion_tokens": 9, "some_future_field": {"x": 1}}  # unknown fields: ignored
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    prompt, params = engine.calls[0]
    assert params.max_tokens == 9
    text = engine.tokenizer.decode(prompt, skip_special_tokens=False)
    assert text.endswith("<｜User｜>Sys\n\nQ<｜Assistant｜><think>\n")  # folded system, forced thinking
    assert (params.temperature, params.top_p, params.max_thinking_tokens) == (0.6, 0.95, 7)
    assert params.repetition_guard is not None


def test_engine_failure_mid_stream_is_reported_in_band_and_server_keeps_serving(
        caplog: pytest.LogCaptureFixture) -> None:
    engine = ScriptedEngine(["a", "b", "c"], fail_at=2)
    client = make_client(engine)
    with caplog.at_level(logging.ERROR, logger="r1serve.server"):
        payloads = stream(client, CHAT)
    assert payloads[-1] == "[DONE]"
    assert payloads[-2]["error"]["type"] == "internal_server_error" and "Traceback" not in str(payloads)
    assert len([r for r in caplog.records if r.exc_info]) == 1  # logged once, with its traceback
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 500 and "Traceback" not in response.text
    assert response.json()["error"]["type"] == "internal_server_error"
    engine.fail_at = None
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_engine_refusal_is_a_400() -> None:
    client = make_client(ScriptedEngine(["a"], fail_at=0, error=ValueError("max_tokens: too many")))
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 400 and "max_tokens" in response.json()["error"]["message"]


def test_bug_in_a_handler_is_a_plain_500(caplog: pytest.LogCaptureFixture) -> None:
    engine = ScriptedEngine(["a"])
    engine.tokenizer = SimpleNamespace(encode_chat=lambda *a, **k: {}["missing"], think_start_id=None)
    client = make_client(engine)
    with caplog.at_level(logging.ERROR):
        response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 500
    assert response.json()["error"]["message"].startswith("internal server error")
    assert "KeyError" not in response.text and "Traceback" not in response.text
    assert sum(1 for r in caplog.records if r.exc_info) == 1


def test_loading_then_ready_and_overloaded() -> None:
    app = create_app(None, ServerSettings(model=MODEL, max_pending_requests=1))
    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/health").status_code == 503 and client.get("/health").json() == {"status": "loading"}
    loading = client.post("/v1/chat/completions", json=CHAT)
    assert loading.status_code == 503 and loading.json()["error"]["code"] == "model_loading"
    assert client.get("/v1/models").status_code == 503
    assert "r1serve_model_loaded 0.0" in client.get("/metrics").text
    state = server_state(app)
    state.engine = ScriptedEngine(["a"])
    assert client.get("/health").json() == {"status": "ok"}
    state.in_flight.add("someone-else")
    busy = client.post("/v1/chat/completions", json=CHAT)
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "overloaded"


def test_flags_are_generated_from_settings() -> None:
    parser = build_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for name in ServerSettings.model_fields:
        assert "--" + name.replace("_", "-") in flags, name
    for flag in ("--model", "--served-model-name", "--host", "--port", "--tensor-parallel-size", "--api-key",
                 "--gpu-memory-utilization", "--max-model-len", "--quantization", "--dtype", "--load-format",
                 "--max-num-seqs", "--log-file", "--seed", "--kv-cache-space", "--enforce-eager",
                 "--max-num-batched-tokens", "--block-size", "--no-enable-prefix-caching", "--no-fold-system-prompt",
                 "--no-r1-sampling-defaults", "--enforce-temperature", "--no-force-thinking",
                 "--no-strip-history-reasoning", "--no-reasoning-split", "--no-thinking-budget",
                 "--max-thinking-tokens", "--no-repetition-guard"):
        assert flag in flags, flag
    settings = parse_settings(["--served-model-name", "a", "--served-model-name", "b", "--no-enable-prefix-caching",
                               "--max-model-len", "1024", "--no-repetition-guard", "--model", "/x/My-Model/"])
    assert settings.model_names() == ["a", "b", "/x/My-Model/", "My-Model"]
    engine_config = settings.engine_config()
    assert engine_config.max_model_len == 1024 and not engine_config.enable_prefix_caching
    assert not settings.policy_config().repetition_guard and settings.policy_config().fold_system_prompt
    assert (settings.host, settings.port, settings.max_model_len) == ("127.0.0.1", 8000, 1024)


@pytest.mark.parametrize(("argv", "message"), [
    (["--tensor-parallel-size", "2"], "not supported yet"),
    (["--quantization", "gptq"], "invalid choice"),
    (["--quantization", "bogus"], "invalid choice"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["--max-num-seqs", "x"], "invalid int value"),
])
def test_invalid_flags_are_one_line_and_exit_2(argv: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "--no-fold-system-prompt" in capsys.readouterr().out


def test_sse_framing_round_trip() -> None:
    event = sse_event({"a": "中文", "b": [1, 2]})
    assert event == 'data: {"a":"中文","b":[1,2]}\n\n'
    assert parse_sse_data((event + SSE_DONE).splitlines()) == [{"a": "中文", "b": [1, 2]}, "[DONE]"]


TRICKY_TEXTS = ["", " tok", 'a "quoted" \\ back\\slash', "line\nbreak\ttab\r", "\x00\x01\x1f\x7f", "中文 ünï", "🙂",
                "\u2028\u2029", "</think>", "data: [DONE]\n\n"]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_event_template_fills_the_bytes_sse_event_writes(text: str) -> None:
    from r1serve.server.sse import TEXT_SLOT, EventTemplate

    def data(value: str) -> dict[str, Any]:
        return {"id": "x", "choices": [{"index": 0, "delta": {"reasoning_content": value, "reasoning": value}}]}

    assert EventTemplate(data(TEXT_SLOT)).fill(text) == sse_event(data(text))


def test_event_template_needs_a_slot() -> None:
    from r1serve.server.sse import EventTemplate

    with pytest.raises(ValueError, match="TEXT_SLOT"):
        EventTemplate({"id": "x"})


def _sample(index: int, text: str, finish: str | None = None) -> CompletionOutput:
    return CompletionOutput(index, text, [1], finish, None, text, [1])


@pytest.mark.parametrize("split,alias", [(True, True), (True, False), (False, False)])
def test_chat_events_are_the_bytes_of_one_chunk_per_choice(split: bool, alias: bool) -> None:
    """`SampleStream.events` (templates, one string per output) writes what serialising each choice of
    `SampleStream.choices` as its own chunk writes, for reasoning, a tag cut across outputs, the answer and the
    finish chunk of two interleaved samples."""
    from r1serve.server.protocol import chat_chunk
    from r1serve.server.serving_chat import ChatChunks, ChatJob, SampleStream

    job = ChatJob("chatcmpl-1", MODEL, [1], SamplingParams(n=2), split, alias, True, False)
    chunks = ChatChunks(job, 1700000000)
    fast = {i: SampleStream(True) for i in (0, 1)}
    plain = {i: SampleStream(True) for i in (0, 1)}
    script = [(0, "Let ", None), (1, 'me "think"\n', None), (0, "us</th", None), (1, "中文</think>", None),
              (0, "ink>\n\nThe", None), (1, "\n\n42", None), (0, " answer", None), (0, "", "stop"),
              (1, " done", "length")]
    fast_events, plain_events = [], []
    for index, text, finish in script:
        fast_events.append(fast[index].events(_sample(index, text, finish), job, chunks, None))
        plain_events.append("".join(sse_event(chat_chunk(job.request_id, 1700000000, MODEL, [choice]))
                                    for choice in plain[index].choices(_sample(index, text, finish), split, alias)))
    assert fast_events == plain_events
    payloads = parse_sse_data("".join(fast_events).splitlines())
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum("reasoning" in p["choices"][0]["delta"] for p in payloads) == (4 if alias else 0)
