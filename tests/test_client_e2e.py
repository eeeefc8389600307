"""The client against a real r1serve server subprocess (tiny dummy model, real tokenizer): every method, sync
and async; streamed deltas in order (reasoning before answer); the server's split and policy header; retries
while a server is not up yet and then is; each error type a real server can produce."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from r1serve.client import (
    AsyncLLMClient,
    AuthenticationError,
    BadRequestError,
    ChatResult,
    ClientConnectionError,
    ClientTimeoutError,
    LLMClient,
    ModelNotFoundError,
    StreamDelta,
    StreamEnd,
    last_boxed,
)
from server_utils import ServerHandle, free_port, running_server, server_command, stop_server

MODEL = "DeepSeek-R1-Distill-Qwen-1.5B"
KEY = "sekret-key"
FAST = ("--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4")
SHORT = {"max_tokens": 8, "max_thinking_tokens": 3}  # 3 tokens of reasoning, "</think>", a few of answer
HELLO = [{"role": "user", "content": "Hello"}]


_SERVER = pytest.StashKey[ServerHandle]()


def shared_server(request: pytest.FixtureRequest, model_dir: Path) -> ServerHandle:
    """One server (with `--api-key KEY`) for all the client, check and chat tests of a pytest session: it
    starts on first use and stops when the session ends (start-up costs seconds on a busy CI machine)."""
    config = request.config
    if _SERVER not in config.stash:
        stack = contextlib.ExitStack()
        config.stash[_SERVER] = stack.enter_context(running_server(model_dir, *FAST, "--api-key", KEY))
        config.add_cleanup(stack.close)
    return config.stash[_SERVER]


@pytest.fixture()
def server(request: pytest.FixtureRequest, tiny_model_dir: Path) -> ServerHandle:
    return shared_server(request, tiny_model_dir)


@pytest.fixture()
def client(server: ServerHandle) -> Iterator[LLMClient]:
    with LLMClient(server.base_url, api_key=KEY, timeout=60) as c:
        yield c


def test_models_and_server_info(client: LLMClient) -> None:
    assert MODEL in client.list_models()
    assert client.resolve_model() == client.list_models()[0]
    assert any(entry.get("max_model_len") == 512 for entry in client.list_model_details())
    info = client.server_info()
    assert info.is_r1serve and info.dummy_weights and info.load_format == "dummy"
    assert client.health() is True


def test_chat_completion_split_by_server(client: LLMClient) -> None:
    result = client.chat_completion(HELLO, temperature=0.6, seed=1, **SHORT)
    assert isinstance(result, ChatResult)
    assert result.reasoning_source == "server" and "reasoning-split" in (result.policy or "")
    assert result.reasoning and "</think>" not in result.content and "</think>" not in result.reasoning
    assert result.finish_reason in ("stop", "length")
    assert result.usage is not None and 0 < result.usage.completion_tokens <= SHORT["max_tokens"]
    reasoning_tokens = result.usage.reasoning_tokens
    assert reasoning_tokens is not None and 0 < reasoning_tokens < result.usage.completion_tokens
    assert result.model == client.resolve_model() and result.latency_s > 0 and result.ttft_s is None


def test_stream_reasoning_before_answer(client: LLMClient) -> None:
    items = list(client.stream_chat(HELLO, **SHORT))
    end = items[-1]
    deltas = items[:-1]
    assert isinstance(end, StreamEnd) and all(isinstance(d, StreamDelta) for d in deltas)
    kinds = [d.kind for d in deltas]
    assert kinds[0] == "reasoning" and "answer" in kinds, kinds
    assert "reasoning" not in kinds[kinds.index("answer"):], "no reasoning after the answer started"
    assert all(d.text for d in deltas) and not any("</think>" in d.text for d in deltas)
    assert end.usage is not None and end.usage.completion_tokens <= SHORT["max_tokens"]
    assert end.ttft_s is not None and 0 < end.ttft_s <= end.latency_s
    assert end.reasoning_source == "server"
    same = client.chat_completion(HELLO, stream=True, **SHORT)
    assert not isinstance(same, ChatResult)
    assert same.result().reasoning


def test_system_prompt_left_to_the_server_and_simple_chat(client: LLMClient) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, *HELLO]
    result = client.chat_completion(messages, **SHORT)
    assert "system-folded" in (result.policy or ""), "r1serve folds the system prompt itself"
    answer = client.simple_chat("Hello", system_message="Answer briefly.", **SHORT)
    assert isinstance(answer, str)
    math = client.solve_math("What is 1 + 1?", **SHORT)
    assert math.result.reasoning and math.reasoning == math.result.reasoning
    assert math.text.startswith(math.reasoning.rstrip())
    assert math.answer == last_boxed(math.text)


def test_errors_from_a_real_server(server: ServerHandle) -> None:
    with pytest.raises(ModelNotFoundError, match="nope"):
        LLMClient(server.base_url, api_key=KEY, model="nope").simple_chat("Hi", max_tokens=2)
    with pytest.raises(AuthenticationError, match="API key"):
        LLMClient(server.base_url, api_key="wrong").simple_chat("Hi", max_tokens=2)
    started = time.monotonic()
    with pytest.raises(BadRequestError, match="max_tokens|context|long"):
        LLMClient(server.base_url, api_key=KEY, model=MODEL, backoff_base=1.0).simple_chat("Hi", max_tokens=100_000)
    assert time.monotonic() - started < 1.0, "a 400 is not retried"
    with pytest.raises(ClientTimeoutError, match="did not answer in time"):
        LLMClient(server.base_url, api_key=KEY, model=MODEL, timeout=0.05).simple_chat(
            "Hi", max_tokens=64, ignore_eos=True)


def test_async_client_methods(server: ServerHandle) -> None:
    async def main() -> None:
        async with AsyncLLMClient(server.url, api_key=KEY, timeout=60) as client:
            assert MODEL in await client.list_models()
            assert (await client.server_info()).is_r1serve
            results = await asyncio.gather(*(client.chat_completion(HELLO, seed=i, **SHORT) for i in range(2)))
            assert all(isinstance(r, ChatResult) and r.reasoning_source == "server" for r in results)
            kinds = [item.kind async for item in client.stream_chat(HELLO, **SHORT) if isinstance(item, StreamDelta)]
            assert kinds[0] == "reasoning" and "reasoning" not in kinds[kinds.index("answer"):]
            assert isinstance(await client.simple_chat("Hi", system_message="Be brief.", **SHORT), str)
            assert (await client.solve_math("1+1?", language="zh", **SHORT)).result.reasoning
            assert await client.health()
        with pytest.raises(AuthenticationError):
            await AsyncLLMClient(server.base_url, api_key="wrong").list_models()

    asyncio.run(main())


@pytest.mark.slow
def test_client_waits_for_a_server_that_starts_later(tiny_model_dir: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    client = LLMClient(f"http://127.0.0.1:{port}/v1", max_retries=200, backoff_base=0.1, backoff_max=0.5, timeout=60)
    outcome: dict[str, object] = {}

    def call() -> None:
        try:
            outcome["result"] = client.chat_completion(HELLO, **SHORT)
        except Exception as e:  # noqa: BLE001  (reported by the assertion below)
            outcome["error"] = e

    caplog.set_level(logging.INFO, logger="r1serve.client")
    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive(), f"the client gave up before the server started: {outcome}"
    with open(tmp_path / "server.log", "wb") as log:
        process = subprocess.Popen(server_command(tiny_model_dir, port, *FAST), stdout=log, stderr=subprocess.STDOUT)
    try:
        thread.join(timeout=120)
        log_text = (tmp_path / "server.log").read_text()
        assert isinstance(outcome.get("result"), ChatResult), f"{outcome}; server log:\n{log_text}"
        assert any("cannot connect" in r.getMessage() for r in caplog.records), "it retried connection errors"
    finally:
        stop_server(process)
    with pytest.raises(ClientConnectionError, match="cannot connect"):
        LLMClient(f"http://127.0.0.1:{port}/v1", model=MODEL, max_retries=1, backoff_base=0.0).simple_chat("Hi")
