"""`r1serve bench` against small fake OpenAI servers in this process: the bad cases and the outputs.

Each fake server streams words as tokens and can misbehave on purpose: fail some requests with HTTP 500 or
with an error event mid-stream, stream no usage, reject `ignore_eos`, send keep-alive comments, put the
reasoning in the text with a literal `</think>`. The bench must count the failures and finish, fall back to
the tokenizer, retry without `ignore_eos` and say so, write JSON and plots, compare two URLs side by side,
stop on one clear line for an unreachable endpoint, and write partial results on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from conftest import TOKENIZER_DIR
from r1serve.bench.cli import main
from r1serve.bench.tokens import COMMON_WORDS
from server_utils import free_port


@dataclass
class Behavior:
    fail_every: int | None = None  # every k-th request: HTTP 500
    stream_error_every: int | None = None  # every k-th request: an error event after two chunks
    usage: bool = True
    reject_ignore_eos: bool = False
    keepalive: bool = False
    inline_think: bool = False  # reasoning in the text, closed by a literal </think>
    words_per_chunk: int = 1
    delay_s: float = 0.0
    bodies: list[dict] = field(default_factory=list)


def fake_app(behavior: Behavior) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "max_model_len": 100000}]}

    async def handle(request: Request, chat: bool) -> object:
        body = await request.json()
        behavior.bodies.append(body)
        n = len(behavior.bodies)
        if behavior.reject_ignore_eos and "ignore_eos" in body:
            return JSONResponse({"error": {"message": "Unrecognized request argument: ignore_eos",
                                           "type": "invalid_request_error"}}, status_code=400)
        if behavior.fail_every and n % behavior.fail_every == 0:
            return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}}, status_code=500)
        fail_stream = bool(behavior.stream_error_every and n % behavior.stream_error_every == 0)
        return StreamingResponse(_stream(behavior, body, chat, fail_stream), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> object:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> object:
        return await handle(request, chat=True)

    return app


def _pieces(behavior: Behavior, num_tokens: int) -> list[str]:
    words = [" " + COMMON_WORDS[i % len(COMMON_WORDS)] for i in range(num_tokens)]
    if behavior.inline_think:  # "</think>" is one token of the R1 vocabulary
        half = num_tokens // 2
        words = words[:half - 1] + ["</think>"] + words[half:]
    k = behavior.words_per_chunk
    return ["".join(words[i:i + k]) for i in range(0, len(words), k)]


async def _stream(behavior: Behavior, body: dict, chat: bool, fail: bool) -> AsyncIterator[bytes]:
    num_tokens = body.get("max_tokens") or 8
    for i, piece in enumerate(_pieces(behavior, num_tokens)):
        if fail and i == 2:
            yield b'data: {"error": {"message": "engine died", "type": "server_error"}}\n\n'
            return
        choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
        yield f"data: {json.dumps({'choices': [choice]})}\n\n".encode()
        if behavior.keepalive:
            yield b": ping\r\n\r\n"
        await asyncio.sleep(behavior.delay_s)
    end = {"index": 0, "delta": {}, "finish_reason": "length"} if chat else {"index": 0, "text": "",
                                                                           "finish_reason": "length"}
    yield f"data: {json.dumps({'choices': [end]})}\n\n".encode()
    if behavior.usage and (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": 11, "completion_tokens": num_tokens, "total_tokens": 11 + num_tokens}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
    yield b"data: [DONE]\n\n"


@dataclass
class FakeServer:
    url: str
    behavior: Behavior


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeServer]]:
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**kwargs: object) -> FakeServer:
        behavior = Behavior(**kwargs)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(fake_app(behavior), host="127.0.0.1", port=port,
                                               log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started, "fake server did not start"
        servers.append((server, thread))
        return FakeServer(f"http://127.0.0.1:{port}", behavior)

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=5)


def run_bench(tmp_path: Path, *args: str, plots: bool = False) -> tuple[int, dict | None]:
    out = tmp_path / "result.json"
    rc = main([*args, "--no-progress", "--output", str(out), *([] if plots else ["--no-plots"])])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def test_errors_are_counted_and_the_run_finishes(fake_server, tmp_path: Path, capsys) -> None:
    server = fake_server(fail_every=4, stream_error_every=5, keepalive=True)
    rc, result = run_bench(tmp_path, "--url", server.url, "--input-len", "16", "--output-len", "6",
                           "--num-prompts", "20", "--concurrency", "4", "--num-warmups", "0")
    assert rc == 0
    summary = result["runs"][0]["summary"]
    # the probe is request 1; measured requests are 2..21: 500 at 4, 8, 12, 16, 20; stream error at 5, 10, 15
    assert summary["num_requests"] == 20
    assert summary["errors"] == {"http_500": 5, "stream_error": 3}
    assert summary["num_completed"] == 12 and summary["total_output_tokens"] == 12 * 6
    assert summary["token_sources"] == {"usage": 12}
    assert summary["error_examples"]["http_500"] == "HTTP 500: overloaded"
    failed = [r for r in result["runs"][0]["requests"] if not r["ok"]]
    assert {r["error_type"] for r in failed} == {"http_500", "stream_error"}
    assert all(b.get("ignore_eos") is True and b["max_tokens"] in (1, 6) for b in server.behavior.bodies)
    printed = capsys.readouterr().out
    assert "http_500: 5" in printed and "stream_error: 3" in printed
    last = json.loads(printed.strip().splitlines()[-1])  # the one JSON line ends the output
    assert last["runs"][0]["summary"]["num_failed"] == 8 and "requests" not in last["runs"][0]


def test_no_usage_falls_back_to_the_tokenizer(fake_server, tmp_path: Path) -> None:
    if not (TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip("no real tokenizer")
    server = fake_server(usage=False, words_per_chunk=3, inline_think=True)
    rc, result = run_bench(tmp_path, "--url", server.url, "--tokenizer", str(TOKENIZER_DIR), "--endpoint", "chat",
                           "--input-len", "32", "--output-len", "12", "--num-prompts", "6", "--num-warmups", "0")
    assert rc == 0
    summary = result["runs"][0]["summary"]
    assert summary["token_sources"] == {"tokenizer": 6}
    assert summary["total_output_tokens"] == 6 * 12  # 4 chunks of 3 words each: counted as 12 tokens
    assert summary["total_input_tokens"] == 6 * 32  # the bench's own prompt lengths
    assert summary["num_answered"] == 6  # answer text after the inline </think>
    assert summary["ttfa_ms"]["p50"] >= summary["ttft_ms"]["p50"]
    for r in result["runs"][0]["requests"]:
        assert r["tpot_s"] == pytest.approx((r["e2e_s"] - r["ttft_s"]) / 11)


def test_without_usage_or_tokenizer_counts_chunks(fake_server, tmp_path: Path) -> None:
    server = fake_server(usage=False, words_per_chunk=2)
    rc, result = run_bench(tmp_path, "--url", server.url, "--input-len", "8", "--output-len", "10",
                           "--num-prompts", "3", "--num-warmups", "0")
    assert rc == 0
    summary = result["runs"][0]["summary"]
    assert summary["token_sources"] == {"chunks": 3} and summary["total_output_tokens"] == 3 * 5


def test_endpoint_rejecting_ignore_eos_is_retried_without(fake_server, tmp_path: Path, capsys) -> None:
    server = fake_server(reject_ignore_eos=True)
    rc, result = run_bench(tmp_path, "--url", server.url, "--input-len", "8", "--output-len", "4",
                           "--num-prompts", "5", "--num-warmups", "1")
    assert rc == 0
    assert result["runs"][0]["summary"]["num_completed"] == 5
    assert result["endpoints"] == [{"url": server.url, "model": "fake-model", "max_model_len": 100000,
                                    "ignore_eos": False, "num_probe_requests": 2}]
    assert any("rejects ignore_eos" in n for n in result["notes"])
    assert "rejects ignore_eos" in capsys.readouterr().err
    assert len(server.behavior.bodies) == 2 + 1 + 5  # probes, warm-up, measured
    assert all("ignore_eos" not in b for b in server.behavior.bodies[1:])


def test_two_urls_side_by_side_with_plots(fake_server, tmp_path: Path, capsys) -> None:
    fast, slow = fake_server(delay_s=0.002), fake_server(delay_s=0.02)
    rc, result = run_bench(tmp_path, "--url", fast.url, "--url", slow.url + "/v1/", "--input-len", "8",
                           "--output-len", "8", "--num-prompts", "4", "--concurrency", "1,2",
                           "--num-warmups", "0", plots=True)
    assert rc == 0
    assert [(r["url"], r["load"]["concurrency"]) for r in result["runs"]] == [
        (fast.url, 1), (fast.url, 2), (slow.url, 1), (slow.url, 2)]
    assert result["settings"]["sweep"] == "concurrency" and result["partial"] is False
    assert all(0 < r["client_cpu"] < 4 for r in result["runs"])
    assert result["command"].startswith("r1serve bench --url")
    fast_tpot = result["runs"][0]["summary"]["tpot_ms"]["p50"]
    slow_tpot = result["runs"][2]["summary"]["tpot_ms"]["p50"]
    assert slow_tpot > 3 * fast_tpot
    printed = capsys.readouterr().out
    assert "[2] / first" in printed and "concurrency 2" in printed
    for name in ("result.latency_cdf.png", "result.sweep.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_workers_share_the_load(fake_server, tmp_path: Path) -> None:
    """Three processes: every request sent once, concurrency held to the total, one time origin."""
    server = fake_server(delay_s=0.01)
    rc, result = run_bench(tmp_path, "--url", server.url, "--input-len", "8", "--output-len", "5",
                           "--num-prompts", "24", "--concurrency", "6", "--num-workers", "3", "--num-warmups", "0")
    assert rc == 0
    run = result["runs"][0]
    summary = run["summary"]
    assert summary["num_completed"] == 24 and summary["total_output_tokens"] == 24 * 5
    assert sorted(r["index"] for r in run["requests"]) == list(range(24))
    assert summary["peak_concurrency"] == 6
    assert len(server.behavior.bodies) == 1 + 24  # the probe, then each request once
    prompts = [b["prompt"] for b in server.behavior.bodies[1:]]
    assert len(set(prompts)) == 24
    starts = sorted(r["start_s"] for r in run["requests"])
    assert 0 <= starts[0] < 0.5 and summary["duration_s"] < 5  # one time origin for all workers


def test_unreachable_endpoint_is_one_clear_line(capsys) -> None:
    rc = main(["--url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "cannot reach" in lines[0] and "is the server running" in lines[0]
    assert captured.out == ""


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [1, 2])
def test_ctrl_c_writes_partial_results(fake_server, tmp_path: Path, num_workers: int) -> None:
    """SIGINT to the bench process alone (as `kill -INT` sends it); with workers it forwards it to them."""
    server = fake_server(delay_s=0.05)
    out = tmp_path / "partial.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "r1serve.bench", "--url", server.url, "--input-len", "8", "--output-len", "20",
           "--num-prompts", "200", "--concurrency", "2", "--num-warmups", "0", "--no-plots", "--output", str(out),
           "--num-workers", str(num_workers)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 30
    while len(server.behavior.bodies) < 8 and time.monotonic() < deadline:  # probe + a few measured
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr.decode()
    result = json.loads(out.read_text())
    assert result["partial"] is True and result["runs"][0]["partial"] is True
    summary = result["runs"][0]["summary"]
    assert summary["num_completed"] >= 1 and summary["num_cancelled"] >= 1
    assert summary["num_completed"] + summary["num_cancelled"] < 200
    assert "PARTIAL" in stdout.decode() and "interrupted" in stderr.decode()


def test_health_of_fake_server(fake_server) -> None:
    """The fake server itself streams what the tests above rely on."""
    server = fake_server(keepalive=True)
    with httpx.stream("POST", f"{server.url}/v1/completions", json={"max_tokens": 2, "stream": True}) as r:
        body = r.read().decode()
    assert body.count(": ping") == 2 and body.endswith("data: [DONE]\n\n")
