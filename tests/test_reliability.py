"""The server under hostile or unlucky use: one bad request never hurts another, overload is refused with
`Retry-After`, huge bodies and prompts are refused fast without stalling anyone, idle connections are closed,
disconnects and aborts free every KV block and are counted, and a dead engine is reported and ends the process
with a non-zero code (for its supervisor to restart it). Each test is a regression test of a failure found by
trying these things against the real server (a tiny dummy model on CPU)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from server_utils import ServerHandle, free_port, running_server

MODEL = "DeepSeek-R1-Distill-Qwen-1.5B"
MAX_MODEL_LEN = 256
MAX_NUM_SEQS = 4
MAX_PENDING = 8
SERVER_ARGS = ("--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
               "--max-pending-requests", str(MAX_PENDING), "--max-request-body-mb", "1",
               "--timeout-request-header", "1", "--timeout-keep-alive", "1")


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Any:
    with running_server(tiny_model_dir, *SERVER_ARGS) as handle:
        yield handle


def post(server: ServerHandle, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kwargs)


def metrics_text(server: ServerHandle) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=30).text


def metric(server: ServerHandle, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", metrics_text(server), re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def wait_all_blocks_free(server: ServerHandle, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        total = metric(server, "r1serve_kv_cache_total_blocks")
        if total > 0 and metric(server, "r1serve_kv_cache_free_blocks") == total:
            return
        time.sleep(0.2)
    raise AssertionError("KV blocks still in use: " + metrics_text(server))


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"], error  # every error says what kind it is
    if param is not None:
        assert error["param"] == param, error
    return error


def long_completion(max_tokens: int = 60) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Tell me a story", "max_tokens": max_tokens, "ignore_eos": True}


# ---- one bad request never hurts another --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stop_token_ids", [[999_999_999], [2**70], [-1]])
def test_stop_token_ids_outside_the_vocabulary_are_a_400_and_spare_a_concurrent_request(
        server: ServerHandle, stop_token_ids: list[int]) -> None:
    async def both() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            innocent = client.post("/v1/completions", json=long_completion(24))
            bad = client.post("/v1/completions", json={**long_completion(8), "min_tokens": 2,
                                                       "stop_token_ids": stop_token_ids})
            return await asyncio.gather(innocent, bad)

    innocent, bad = asyncio.run(both())
    assert assert_openai_error(bad, 400)["param"].startswith("stop_token_ids")  # (or the item: stop_token_ids[0])
    assert innocent.status_code == 200, innocent.text
    choice = innocent.json()["choices"][0]
    assert choice["finish_reason"] == "length" and innocent.json()["usage"]["completion_tokens"] == 24


def test_prompt_token_ids_outside_the_vocabulary_are_a_400(server: ServerHandle) -> None:
    error = assert_openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": [1, 2, 10**9]}), 400,
                                "prompt")
    assert "vocabulary" in error["message"]


@pytest.mark.parametrize("body", [
    {"model": MODEL, "prompt": "x\ud800y", "max_tokens": 2},
    {"model": MODEL, "messages": [{"role": "user", "content": "x\ud800y"}], "max_tokens": 2},
])
def test_a_lone_surrogate_is_a_400_not_a_500(server: ServerHandle, body: dict[str, Any]) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    raw = json.dumps(body)  # json keeps the lone surrogate as the escape \ud800
    response = httpx.post(f"{server.url}{path}", content=raw, headers={"content-type": "application/json"},
                          timeout=30)
    assert_openai_error(response, 400)
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


# ---- big bodies and prompts ---------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_a_413_without_reading_it(server: ServerHandle) -> None:
    started = time.monotonic()
    big = {"model": MODEL, "prompt": "a" * (3 << 20), "max_tokens": 1}
    error = assert_openai_error(post(server, "/v1/completions", big), 413)
    assert error["code"] == "request_too_large" and "MiB" in error["message"]
    assert time.monotonic() - started < 5


def test_a_chunked_body_over_the_limit_is_a_413(server: ServerHandle) -> None:
    def chunks() -> Any:
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'

    response = httpx.post(f"{server.url}/v1/completions", content=chunks(),
                          headers={"content-type": "application/json"}, timeout=30)
    assert_openai_error(response, 413)


def test_an_overlong_prompt_is_refused_fast_while_others_are_served(server: ServerHandle) -> None:
    """Just under the body limit, far over the context window: refused in well under a second, and the event
    loop keeps answering a concurrent request meanwhile."""
    async def run() -> tuple[httpx.Response, float, httpx.Response, float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async def timed(coro: Any) -> tuple[httpx.Response, float]:
                start = time.monotonic()
                response = await coro
                return response, time.monotonic() - start

            words = " ".join(["word"] * 180_000)  # ~0.9 MB of text, ~180k tokens
            (long, long_s), (small, small_s) = await asyncio.gather(
                timed(client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2,
                                                                "messages": [{"role": "user", "content": words}]})),
                timed(client.get("/health")))
            return long, long_s, small, small_s

    long, long_s, small, small_s = asyncio.run(run())
    error = assert_openai_error(long, 400, "messages")
    assert error["code"] == "context_length_exceeded"
    assert long_s < 1.0 and small.status_code == 200 and small_s < 1.0, (long_s, small_s)


def test_a_text_certainly_over_the_window_is_refused_without_tokenizing(server: ServerHandle) -> None:
    started = time.monotonic()
    text = "x" * (MAX_MODEL_LEN * 200)  # no token stands for more than 128 characters
    error = assert_openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": text}), 400, "prompt")
    assert error["code"] == "context_length_exceeded" and time.monotonic() - started < 1.0


# ---- overload -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_streams_beyond_max_pending_requests_get_503_with_retry_after(server: ServerHandle) -> None:
    num_streams = 3 * MAX_PENDING

    async def open_streams() -> list[tuple[int, str | None]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=num_streams)) as client:
            async def one() -> tuple[int, str | None]:
                body = {**long_completion(40), "stream": True}
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    async for _ in response.aiter_lines():
                        pass
                    return response.status_code, response.headers.get("retry-after")

            return await asyncio.gather(*(one() for _ in range(num_streams)))

    results = asyncio.run(open_streams())
    admitted = [status for status, _ in results if status == 200]
    refused = [retry for status, retry in results if status == 503]
    assert len(admitted) + len(refused) == num_streams
    assert 1 <= len(admitted) <= MAX_PENDING and refused and all(retry == "1" for retry in refused)
    wait_all_blocks_free(server)


@pytest.mark.slow
def test_a_disconnect_storm_frees_every_block_and_counts_the_aborts(server: ServerHandle) -> None:
    aborted_before = metric(server, 'r1serve_requests_finished_total{finish_reason="abort"}') \
        if 'finish_reason="abort"' in metrics_text(server) else 0.0

    async def storm() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async def leave_early() -> None:
                body = {**long_completion(200), "stream": True}
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data:"):
                            return  # close mid-stream

            await asyncio.gather(*(leave_early() for _ in range(MAX_PENDING)))

    asyncio.run(storm())
    wait_all_blocks_free(server)
    aborted = metric(server, 'r1serve_requests_finished_total{finish_reason="abort"}')
    assert aborted - aborted_before >= MAX_PENDING // 2  # (a refused stream never started)
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


# ---- connections --------------------------------------------------------------------------------------------


def _closed_within(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the server closes the connection within `timeout_s` (whatever it still sends before)."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def test_a_connection_that_sends_nothing_is_closed(server: ServerHandle) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        assert _closed_within(sock, 5.0)


def test_a_connection_that_sends_its_headers_slowly_is_closed(server: ServerHandle) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.5)
        sock.sendall(b"X-Slow: 1\r\n")
        assert _closed_within(sock, 5.0)


def test_a_kept_alive_connection_is_closed_when_idle(server: ServerHandle) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        assert b"200 OK" in sock.recv(4096)
        started = time.monotonic()
        assert _closed_within(sock, 5.0)
        assert time.monotonic() - started > 0.5  # kept alive a while (--timeout-keep-alive 1), then closed


# ---- start-up checks ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_empty_api_key_is_refused_at_start_up(tiny_model_dir: Path) -> None:
    command = [sys.executable, "-m", "r1serve.server", "--model", str(tiny_model_dir), "--load-format", "dummy",
               "--port", str(free_port()), "--api-key", ""]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--api-key is empty" in result.stderr + result.stdout


def test_kv_cache_total_blocks_is_known_before_the_first_request(server: ServerHandle) -> None:
    assert metric(server, "r1serve_kv_cache_total_blocks") > 0


# ---- a dead engine ------------------------------------------------------------------------------------------


def engine_child_pid(server_pid: int) -> int:
    """The engine's process among the server's children (the multiprocessing child that is not its resource
    tracker)."""
    children: list[int] = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    for pid in children:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            return pid
    raise AssertionError(f"no engine child among {children}")


@pytest.mark.slow
def test_a_dead_engine_turns_health_to_503_fails_requests_and_exits_non_zero(tiny_model_dir: Path) -> None:
    with running_server(tiny_model_dir, *SERVER_ARGS) as server:
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                          json={**long_completion(2000), "max_tokens": 200, "stream": True}) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            killed_at = time.monotonic()
            os.kill(engine_child_pid(server.process.pid), signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]" and "engine" in rest[-2]  # the open stream ends with the error
        health = httpx.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "engine dead"
        refused = post(server, "/v1/completions", long_completion(4))
        assert assert_openai_error(refused, 503)["code"] == "engine_dead"
        assert refused.headers["retry-after"]
        assert time.monotonic() - killed_at < 5
        assert server.process.wait(timeout=30) == 1
        log = server.read_log()
        assert "the engine died: the engine process exited unexpectedly (exit code -9)" in log


def test_sigterm_under_load_ends_every_stream_and_exits_zero(tiny_model_dir: Path) -> None:
    with running_server(tiny_model_dir, *SERVER_ARGS, "--shutdown-grace-period", "0.5") as server:
        async def streams_then_sigterm() -> list[list[str]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                started = asyncio.Event()

                async def one() -> list[str]:
                    body = {**long_completion(2000), "max_tokens": 200, "stream": True}
                    async with client.stream("POST", "/v1/completions", json=body) as response:
                        lines = []
                        async for line in response.aiter_lines():
                            if line.startswith("data:"):
                                lines.append(line)
                                started.set()
                        return lines

                tasks = [asyncio.ensure_future(one()) for _ in range(MAX_NUM_SEQS * 2)]
                await asyncio.wait_for(started.wait(), 30)
                server.process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        results = asyncio.run(streams_then_sigterm())
        assert server.process.wait(timeout=30) == 0, server.read_log()
        assert all(lines and lines[-1] == "data: [DONE]" for lines in results)  # none was cut off
