"""Start-up and shut-down of the real server process: the log lines deployment checks read (also in
`--log-file`), SIGTERM with a request in flight (it ends with "abort", the process exits 0), and the
one-line failures with their fix (model not found, port in use), exit code 1."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from r1serve.client import check
from server_utils import free_port, running_server, stop_server

MODEL = "DeepSeek-R1-Distill-Qwen-1.5B"


def read_stream(url: str, body: dict[str, Any], first_chunk: threading.Event, out: list[Any]) -> None:
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                data = line[len("data:"):].strip()
                out.append(data if data == "[DONE]" else json.loads(data))
                first_chunk.set()


@pytest.mark.slow
def test_sigterm_aborts_in_flight_request_and_exits_zero(tiny_model_dir: Path, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "server.log"
    with running_server(tiny_model_dir, "--log-file", str(log_file), "--shutdown-grace-period", "0.5") as server:
        payloads: list[Any] = []
        first_chunk = threading.Event()
        body = {"model": MODEL, "prompt": "Go", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        reader = threading.Thread(target=read_stream, args=(f"{server.url}/v1/completions", body, first_chunk,
                                                            payloads))
        reader.start()
        assert first_chunk.wait(30), server.read_log()
        started = time.monotonic()
        assert stop_server(server.process) == 0, server.read_log()
        assert time.monotonic() - started < 15
        reader.join(10)
        assert not reader.is_alive()
        assert payloads[-1] == "[DONE]"  # the stream ended properly, not cut off
        assert payloads[-2]["choices"][0]["finish_reason"] == "abort"
        log, stderr = log_file.read_text(), server.read_log()
    order = ["Started server process", "Waiting for application startup.", "Uvicorn running on http://127.0.0.1:",
             "Application startup complete.", "received SIGTERM", "Shutting down", "Finished server process"]
    assert [log.find(line) for line in order] == sorted(log.find(line) for line in order) and log.find(order[0]) >= 0
    assert "CPU engine:" in log  # a line of the engine's child process
    assert set(without_time(stderr)) <= set(without_time(log))  # every stderr line is in the file
    assert check.check_log(log_file)[-1][1].startswith("the server has shut down")


def without_time(log: str) -> list[str]:
    """The log's lines in r1serve's format, without their time stamps."""
    return [m.group(1) + m.group(2) for m in re.finditer(r"^([A-Z]+ )[\d-]+ [\d:]+ (\[.*)$", log, re.MULTILINE)]


def run_failing_server(*args: str) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "r1serve.server", *args], capture_output=True, text=True,
                            timeout=120)
    return result.returncode, result.stdout + result.stderr


def test_model_not_found_is_one_clear_line_and_exit_1(tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    code, output = run_failing_server("--model", str(tmp_path / "no-such-model"), "--port", str(free_port()),
                                      "--log-file", str(log_file))
    assert code == 1
    errors = [line for line in output.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "not found" in errors[0] and "--load-format dummy" in errors[0]
    assert "Traceback" not in output
    (status, detail), = check.check_log(log_file)[:1]
    assert status == "fail" and detail.startswith("the server failed to start (line ")
    assert detail.endswith(errors[0].split("] ", 1)[1])  # the error line, quoted


def test_port_in_use_is_one_clear_line_and_exit_1() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, output = run_failing_server("--load-format", "dummy", "--port", str(port))
    assert code == 1
    assert f"port {port}" in output and "--port" in output and "Traceback" not in output


def test_load_failures_are_explained_with_their_fix() -> None:
    from r1serve.server.launcher import explain_load_failure
    from r1serve.server.settings import ServerSettings

    settings = ServerSettings(model="some/model", max_model_len=8192, max_num_seqs=64)
    oom = explain_load_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), settings)
    assert "CUDA out of memory" in oom and "--gpu-memory-utilization" in oom and "--max-model-len (now 8192)" in oom
    assert "--max-num-seqs (now 64)" in oom and "\n" not in oom
    missing = explain_load_failure(FileNotFoundError("no config.json in /x"), settings)
    assert "not found" in missing and "--load-format dummy" in missing
    other = explain_load_failure(ValueError("config.json: hidden_act 'gelu' is not supported"), settings)
    assert other.startswith("failed to load model 'some/model'") and "gelu" in other


def test_bind_socket_names_the_fix() -> None:
    from r1serve.server.launcher import ServerStartError, bind_socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ServerStartError, match="--port"):
            bind_socket("127.0.0.1", busy.getsockname()[1])
    with pytest.raises(ServerStartError, match="--host"):
        bind_socket("no-such-host.invalid", 8000)
    sock = bind_socket("127.0.0.1", 0)
    sock.close()


def test_the_loader_prepares_the_text_length_check_off_the_event_loop(tiny_model_dir: Path) -> None:
    """The longest token's length (a scan of the whole vocabulary) is known before the first request, which
    would otherwise compute it on the event loop while every stream waits."""
    from types import SimpleNamespace

    from r1serve.server.launcher import load_engine
    from r1serve.server.settings import ServerSettings
    from r1serve.server.state import ServerState

    settings = ServerSettings(model=str(tiny_model_dir), load_format="dummy", device="cpu", dtype="float32",
                              kv_cache_space=0.05, engine_process=False)
    state = ServerState(settings)
    load_engine(settings, state, SimpleNamespace(should_exit=False, engine_died=lambda: None))  # type: ignore[arg-type]
    assert state.load_error is None and state.engine is not None
    try:
        assert state.engine.tokenizer._max_chars_per_token == max(
            len(s) for s in state.engine.tokenizer._token_strings())
    finally:
        state.engine.shutdown()
