"""Client unit tests against an in-process fake OpenAI server (httpx2 MockTransport): the client-side reasoning
split (full and streamed, tag cut across chunks), server-side split, system-prompt folding, request routing
into extra_body, retries and error types. The real-server tests are in test_client_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx2
import pytest

from r1serve.client import (
    AsyncLLMClient,
    AuthenticationError,
    BadRequestError,
    ClientConnectionError,
    LLMClient,
    ModelNotFoundError,
    NotOpenAICompatibleError,
    ServerError,
    StreamDelta,
    StreamEnd,
    last_boxed,
    split_reasoning,
)
from r1serve.client.reasoning import ReasoningSplitter
from r1serve.client.retry import RetryPolicy
from r1serve.client.settings import normalize_base_url

RAW = "<think>\nLet me add 2 and 2.\nThat is 4.\n</think>\n\nThe answer is \\boxed{4}."
REASONING = "Let me add 2 and 2.\nThat is 4.\n"
ANSWER = "The answer is \\boxed{4}."


@dataclass
class FakeServer:
    """An OpenAI-compatible fake: `text` is what the "model" says; `server_split` sends reasoning_content;
    `failures` are statuses answered (in order) before the first success; `requests` records bodies."""

    text: str = RAW
    server_split: bool = False
    is_r1serve: bool = False
    failures: list[tuple[int, Any]] = field(default_factory=list)
    requests: list[tuple[str, Any]] = field(default_factory=list)
    chunk_size: int = 3

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else None
        self.requests.append((path, body))
        if path == "/version":
            return httpx2.Response(200, json={"version": "0.1.0", "load_format": "dummy"}) if self.is_r1serve \
                else httpx2.Response(404, json={"detail": "Not Found"})
        if self.failures:
            status, payload = self.failures.pop(0)
            return httpx2.Response(status, json=payload) if not isinstance(payload, str) else \
                httpx2.Response(status, text=payload, headers={"content-type": "text/html"})
        if path == "/v1/models":
            return httpx2.Response(200, json={"object": "list", "data": [{"id": "fake-r1", "object": "model"}]})
        if path == "/v1/chat/completions":
            return self._stream() if body.get("stream") else self._full()
        return httpx2.Response(404, json={"detail": "Not Found"})

    def _split(self) -> tuple[str | None, str]:
        if not self.server_split:
            return None, self.text
        reasoning, answer = self.text.split("</think>")
        return reasoning.replace("<think>\n", ""), answer.lstrip()

    def _full(self) -> httpx2.Response:
        reasoning, content = self._split()
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return httpx2.Response(200, json={
            "id": "c1", "object": "chat.completion", "created": 0, "model": "fake-r1",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25,
                      "completion_tokens_details": {"reasoning_tokens": 12}}})

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> str:
        payload = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "fake-r1",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(payload)}\n\n"

    def _stream(self) -> httpx2.Response:
        reasoning, content = self._split()
        pieces = [self._chunk({"role": "assistant", "content": ""})]
        if reasoning is not None:
            pieces += [self._chunk({"reasoning_content": reasoning[i:i + self.chunk_size]})
                       for i in range(0, len(reasoning), self.chunk_size)]
        pieces += [self._chunk({"content": content[i:i + self.chunk_size]})
                   for i in range(0, len(content), self.chunk_size)]
        pieces.append(self._chunk({}, finish="stop"))
        usage = {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25}
        last = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "fake-r1", "choices": [],
                "usage": usage}
        pieces.append(f"data: {json.dumps(last)}\n\n")
        pieces.append("data: [DONE]\n\n")
        return httpx2.Response(200, text="".join(pieces), headers={"content-type": "text/event-stream"})


@contextlib.contextmanager
def serving(fake: FakeServer) -> Iterator[str]:
    """Serve `fake` on a loopback port (for subprocess tests); yields `http://127.0.0.1:PORT` (no /v1)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            request = httpx2.Request(self.command, f"http://fake{self.path}", content=self.rfile.read(length))
            response = fake.handle(request)
            self.send_response(response.status_code)
            self.send_header("content-type", response.headers.get("content-type", "application/json"))
            self.send_header("content-length", str(len(response.content)))
            self.end_headers()
            self.wfile.write(response.content)

        do_POST = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def make_client(fake: FakeServer, **kw: Any) -> LLMClient:
    kw.setdefault("backoff_base", 0.0)
    return LLMClient("http://fake:8000/v1", http_client=httpx2.Client(transport=httpx2.MockTransport(fake.handle)),
                     **kw)


def make_async_client(fake: FakeServer, **kw: Any) -> AsyncLLMClient:
    async def handler(request: httpx2.Request) -> httpx2.Response:
        await request.aread()
        return fake.handle(request)

    kw.setdefault("backoff_base", 0.0)
    transport = httpx2.MockTransport(handler)
    return AsyncLLMClient("http://fake:8000", http_client=httpx2.AsyncClient(transport=transport), **kw)


def chat_bodies(fake: FakeServer) -> list[dict[str, Any]]:
    return [body for path, body in fake.requests if path == "/v1/chat/completions"]


# --- the pure parts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    (RAW, (REASONING, ANSWER)),
    ("reasoning only, cut off", ("reasoning only, cut off", "")),
    ("no open tag</think>answer", ("no open tag", "answer")),
    ("<think>x</think>", ("x", "")),
    ("</think>\n\njust the answer", ("", "just the answer")),
    ("a</think>b</think>c", ("a", "b</think>c")),
])
def test_split_reasoning(text: str, expected: tuple[str, str]) -> None:
    assert split_reasoning(text) == expected


def test_streaming_splitter_agrees_at_every_cut() -> None:
    for i in range(len(RAW) + 1):
        for j in range(i, len(RAW) + 1):
            splitter = ReasoningSplitter()
            deltas = splitter.feed(RAW[:i]) + splitter.feed(RAW[i:j]) + splitter.feed(RAW[j:]) + splitter.finish()
            kinds = [d.kind for d in deltas]
            assert kinds == sorted(kinds, key=lambda k: k == "answer"), "reasoning must come before answer"
            assert "".join(d.text for d in deltas if d.kind == "reasoning") == REASONING
            assert "".join(d.text for d in deltas if d.kind == "answer") == ANSWER


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{4}.", "4"), ("\\boxed{\\frac{1}{2}} then \\boxed{3}", "3"), ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("no box", None), ("cut \\boxed{12", None), ("\\fbox{7} quoting \\boxed{}", "7"), ("\\boxed 5.", "5"),
])
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


def test_retry_policy_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(max_retries=5, backoff_base=0.5, backoff_max=3.0, jitter=0.0)
    assert [policy.delay_s(a) for a in range(4)] == [0.5, 1.0, 2.0, 3.0]
    assert policy.delay_s(0, retry_after_s=10.0) == 3.0
    assert policy.should_retry(4, True) and not policy.should_retry(5, True) and not policy.should_retry(0, False)
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=-1)


def test_base_url_normalisation_and_bad_urls() -> None:
    assert normalize_base_url("http://h:8000") == "http://h:8000/v1"
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000/v1"
    for bad in ("", "localhost:8000", "ftp://h/v1"):
        with pytest.raises(BadRequestError, match="base_url"):
            LLMClient(bad)


# --- the sync client against the fake ---------------------------------------------------------------------

def test_client_split_full_response_and_auto_model() -> None:
    fake = FakeServer()
    result = make_client(fake).chat_completion([{"role": "user", "content": "2+2?"}], max_tokens=50)
    assert (result.reasoning, result.content) == (REASONING, ANSWER)
    assert result.reasoning_source == "client" and result.model == "fake-r1" and result.finish_reason == "stop"
    assert result.usage is not None and result.usage.reasoning_tokens == 12 and result.usage.total_tokens == 25
    body = chat_bodies(fake)[0]
    assert body["model"] == "fake-r1" and body["max_tokens"] == 50 and "temperature" not in body


def test_client_split_stream_has_no_mixed_delta() -> None:
    fake = FakeServer(chunk_size=2)
    items = list(make_client(fake).stream_chat([{"role": "user", "content": "2+2?"}], temperature=0.6))
    deltas = [i for i in items if isinstance(i, StreamDelta)]
    assert isinstance(items[-1], StreamEnd) and all(isinstance(i, StreamDelta) for i in items[:-1])
    first_answer = next(k for k, d in enumerate(deltas) if d.kind == "answer")
    assert all(d.kind == "reasoning" for d in deltas[:first_answer])
    assert all(d.kind == "answer" for d in deltas[first_answer:])
    assert "".join(d.text for d in deltas[:first_answer]) == REASONING
    assert "".join(d.text for d in deltas[first_answer:]) == ANSWER
    end = items[-1]
    assert end.finish_reason == "stop" and end.usage is not None and end.usage.completion_tokens == 20
    assert end.ttft_s is not None and 0 <= end.ttft_s <= end.latency_s
    assert chat_bodies(fake)[0]["stream_options"] == {"include_usage": True}


def test_server_split_is_used_as_is() -> None:
    fake = FakeServer(server_split=True, is_r1serve=True)
    client = make_client(fake)
    full = client.chat_completion([{"role": "user", "content": "q"}])
    assert (full.reasoning, full.content, full.reasoning_source) == (REASONING, ANSWER, "server")
    streamed = client.stream_chat([{"role": "user", "content": "q"}]).result()
    assert (streamed.reasoning, streamed.content, streamed.reasoning_source) == (REASONING, ANSWER, "server")


def test_system_prompt_folded_for_other_servers_not_for_r1serve() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "hmm</think>\n\nHello!"}, {"role": "user", "content": "Again"}]
    fake = FakeServer()
    make_client(fake).chat_completion(messages)
    sent = chat_bodies(fake)[0]["messages"]
    assert sent[0] == {"role": "user", "content": "Be brief.\n\nHi"}
    assert sent[1] == {"role": "assistant", "content": "Hello!"} and len(sent) == 3
    r1 = FakeServer(is_r1serve=True)
    make_client(r1).chat_completion(messages)
    assert chat_bodies(r1)[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    forced = FakeServer(is_r1serve=True)
    make_client(forced, fold_system_prompt=True).simple_chat("Hi", system_message="Be brief.")
    assert chat_bodies(forced)[0]["messages"] == [{"role": "user", "content": "Be brief.\n\nHi"}]


def test_extra_keywords_go_to_extra_body_and_sdk_params_stay() -> None:
    fake = FakeServer()
    make_client(fake, model="m").chat_completion(
        [{"role": "user", "content": "q"}], top_p=0.9, seed=3, stop=["x"], max_thinking_tokens=16, ignore_eos=True)
    body = chat_bodies(fake)[0]
    assert body["model"] == "m" and body["top_p"] == 0.9 and body["seed"] == 3 and body["stop"] == ["x"]
    assert body["max_thinking_tokens"] == 16 and body["ignore_eos"] is True
    assert all(path != "/v1/models" for path, _ in fake.requests), "an explicit model needs no /v1/models"


def test_simple_chat_and_solve_math() -> None:
    fake = FakeServer()
    client = make_client(fake)
    assert client.simple_chat("2+2?") == ANSWER
    math = client.solve_math("What is 2+2?", language="zh")
    assert math.answer == "4" and math.reasoning == REASONING and ANSWER in math.text
    assert chat_bodies(fake)[-1]["messages"][0]["content"].endswith("请逐步推理，并将最终答案放在\\boxed{}内。")
    with pytest.raises(BadRequestError, match="language"):
        client.solve_math("x", language="fr")


def test_bad_messages_are_refused_before_sending() -> None:
    fake = FakeServer()
    client = make_client(fake, model="m")
    for bad, match in [([], "non-empty"), ("hi", "non-empty"), ([{"role": "robot", "content": "x"}], "role"),
                       ([{"role": "user", "content": 3}], "content")]:
        with pytest.raises(BadRequestError, match=match):
            client.chat_completion(bad)
    with pytest.raises(BadRequestError, match="n must be 1"):
        client.chat_completion([{"role": "user", "content": "x"}], n=2)
    assert chat_bodies(fake) == []


def test_503_is_retried_400_and_500_are_not() -> None:
    fake = FakeServer(failures=[(503, {"error": {"message": "loading"}})] * 2)
    assert make_client(fake, model="m", max_retries=3).simple_chat("q") == ANSWER
    assert len(chat_bodies(fake)) == 3
    for status, error in [(400, BadRequestError), (500, ServerError)]:
        fake = FakeServer(failures=[(status, {"error": {"message": "nope", "type": "x"}})])
        with pytest.raises(error, match="nope"):
            make_client(fake, model="m", max_retries=3).simple_chat("q")
        assert len(chat_bodies(fake)) == 1, f"{status} must not be retried"
    fake = FakeServer(failures=[(503, {"error": {"message": "loading"}})] * 3)
    with pytest.raises(ServerError, match="503"):
        make_client(fake, model="m", max_retries=2).simple_chat("q")


@pytest.mark.parametrize("status,payload,error,match", [
    (401, {"error": {"message": "bad key"}}, AuthenticationError, "API key"),
    (404, {"error": {"message": "The model `m` does not exist."}}, ModelNotFoundError, "does not exist"),
    (404, "<html>Not Found</html>", NotOpenAICompatibleError, "not an OpenAI-compatible API"),
    (404, {"detail": "Not Found"}, NotOpenAICompatibleError, "not an OpenAI-compatible API"),
])
def test_error_types(status: int, payload: Any, error: type[Exception], match: str) -> None:
    fake = FakeServer(failures=[(status, payload)])
    with pytest.raises(error, match=match):
        make_client(fake, model="m").simple_chat("q")


def test_non_openai_model_list_and_closed_port() -> None:
    fake = FakeServer(failures=[(200, "<html>hello</html>")])
    with pytest.raises(NotOpenAICompatibleError, match="model list"):
        make_client(fake).list_models()
    client = LLMClient("http://127.0.0.1:9/v1", model="m", max_retries=1, backoff_base=0.0, timeout=5.0)
    with pytest.raises(ClientConnectionError, match="cannot connect to http://127.0.0.1:9/v1"):
        client.simple_chat("q")


# --- the async client against the fake --------------------------------------------------------------------

def test_async_client_methods() -> None:
    async def main() -> None:
        fake = FakeServer(failures=[(503, {"error": {"message": "loading"}})])
        async with make_async_client(fake) as client:
            assert await client.list_models() == ["fake-r1"]
            result = await client.chat_completion([{"role": "user", "content": "q"}])
            assert (result.reasoning, result.content) == (REASONING, ANSWER)
            deltas = [d async for d in client.stream_chat([{"role": "user", "content": "q"}])]
            assert isinstance(deltas[-1], StreamEnd)
            assert "".join(d.text for d in deltas[:-1] if d.kind == "answer") == ANSWER
            stream = await client.chat_completion([{"role": "user", "content": "q"}], stream=True)
            assert (await stream.result()).reasoning == REASONING
            assert await client.simple_chat("q", system_message="s") == ANSWER
            assert (await client.solve_math("2+2")).answer == "4"
            assert chat_bodies(fake)[-2]["messages"][0]["content"] == "s\n\nq"
        bad = FakeServer(failures=[(400, {"error": {"message": "too long"}})])
        with pytest.raises(BadRequestError, match="too long"):
            await make_async_client(bad, model="m").simple_chat("q")

    asyncio.run(main())


def test_stream_errors_mid_stream_and_non_streaming_servers() -> None:
    class ErrorMidStream(FakeServer):
        def _stream(self) -> httpx2.Response:
            first = self._chunk({"content": "thinking"})
            error = json.dumps({"error": {"message": "engine died", "type": "server_error"}})
            return httpx2.Response(200, text=f"{first}data: {error}\n\n", headers={"content-type": "text/event-stream"})

    stream = make_client(ErrorMidStream(), model="m").stream_chat([{"role": "user", "content": "q"}])
    with pytest.raises(ServerError, match="engine died"):
        list(stream)

    class IgnoresStream(FakeServer):
        def _stream(self) -> httpx2.Response:
            return self._full()

    with pytest.raises(NotOpenAICompatibleError, match="no stream events"):
        list(make_client(IgnoresStream(), model="m").stream_chat([{"role": "user", "content": "q"}]))
