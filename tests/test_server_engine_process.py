"""The server with `--engine-process` (the default) and `--no-engine-process`: the engine in a child process or
on a thread serves the same API, frees the blocks of a client that leaves, and shuts down cleanly on SIGTERM."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from server_utils import running_server, stop_server
from test_server import wait_all_blocks_free

MODEL = "DeepSeek-R1-Distill-Qwen-1.5B"


@pytest.fixture(scope="module", params=["--engine-process", "--no-engine-process"])
def server(tiny_model_dir: Path, request: pytest.FixtureRequest):
    with running_server(tiny_model_dir, request.param, "--max-model-len", "512") as handle:
        yield handle


def test_chat_and_stream_with_reasoning_split(server) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
    extra = {"max_thinking_tokens": 3, "ignore_eos": True}
    full = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=10, extra_body=extra)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 10
    assert full.usage.completion_tokens_details.reasoning_tokens == 4  # 3 + the "\n" before </think>
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=10, stream=True, extra_body=extra))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_concurrent_streams_complete(server) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="none")

    def one(i: int) -> int:
        stream = client.completions.create(model=MODEL, prompt=f"count {i}", max_tokens=8, stream=True,
                                           extra_body={"ignore_eos": True})
        return sum(1 for _ in stream)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert all(n > 1 for n in pool.map(one, range(16)))
    wait_all_blocks_free(server)


def test_disconnect_frees_blocks(server) -> None:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i > 3:
                break
    wait_all_blocks_free(server)


@pytest.mark.slow
def test_sigterm_exits_cleanly(tiny_model_dir: Path) -> None:
    with running_server(tiny_model_dir, "--engine-process", "--max-model-len", "512") as handle:
        assert stop_server(handle.process) == 0
