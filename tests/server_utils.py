"""Start the real `r1serve` server as a subprocess for tests, and stop it cleanly afterwards.

Integration tests (the server's, the client's, `r1serve check`, the benchmark's) all need the same thing: a
real server process on a free loopback port, running a tiny dummy model, ready when the test starts and
gone when it ends, with its log at hand when something fails. This module is that one helper, so that no
test module writes its own start/poll/kill loop.

Usage, with one server shared by a whole test module (start-up costs seconds, so share it)::

    import pytest
    from server_utils import running_server

    @pytest.fixture(scope="module")
    def server(tiny_model_dir):
        with running_server(tiny_model_dir, "--max-num-seqs", "8") as handle:
            yield handle

    def test_models(server):
        import httpx
        assert httpx.get(f"{server.url}/v1/models").status_code == 200

`tiny_model_dir` is the session fixture of `tests/conftest.py` (a folder named `DeepSeek-R1-Distill-Qwen-1.5B`
with a tiny config and the real tokenizer), so clients may ask for the model `DeepSeek-R1-Distill-Qwen-1.5B`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0


@dataclass
class ServerHandle:
    """A running server: `url` is `http://127.0.0.1:PORT` (no `/v1`); `base_url` adds `/v1` for the SDK."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def read_log(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(model_dir: str | Path, port: int, *args: str) -> list[str]:
    """The command `running_server` runs: dummy weights, a small KV cache, then `args` (later flags win)."""
    return [
        sys.executable, "-m", "r1serve.server", "--model", str(model_dir), "--load-format", "dummy",
        "--host", "127.0.0.1", "--port", str(port), "--kv-cache-space", "0.05", *args,
    ]


def wait_healthy(handle: ServerHandle, timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll `/health` until it answers 200; raise with the server's log if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise RuntimeError(
                f"server exited with code {handle.process.returncode} before it was ready; its log:\n"
                f"{handle.read_log()}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{handle.url}/health", timeout=2.0).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout_s:.0f} s; its log:\n{handle.read_log()}")


def stop_server(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM, wait up to `timeout_s`, then SIGKILL; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)
    return int(process.returncode)


@contextlib.contextmanager
def running_server(
    model_dir: str | Path, *args: str, env: Mapping[str, str] | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> Iterator[ServerHandle]:
    """Start `python -m r1serve.server --model MODEL_DIR --load-format dummy --port FREE --kv-cache-space 0.05
    *ARGS`, wait until `/health` is 200, yield its `ServerHandle`, then stop it (SIGTERM, then kill).

    `env` entries are added to (and override) the current environment. The server's stdout and stderr go to
    `handle.log_path` (a temporary file, removed afterwards unless the block raised), which the error message
    quotes if the server fails to start.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log_dir = Path(tempfile.mkdtemp(prefix="r1serve-server-"))
    log_path = log_dir / "server.log"
    port = free_port()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            server_command(model_dir, port, *args), stdout=log_file, stderr=subprocess.STDOUT, env=full_env,
        )
    handle = ServerHandle(url=f"http://127.0.0.1:{port}", port=port, process=process, log_path=log_path)
    clean = False
    try:
        wait_healthy(handle, timeout_s)
        yield handle
        clean = True
    finally:
        stop_server(process)
        if clean:  # keep the log of a failed run for whoever debugs it
            with contextlib.suppress(OSError):
                log_path.unlink()
                log_dir.rmdir()
