"""`r1serve serve --data-parallel-size N`: the replica plan (ports, GPUs, CPU threads, flags passed through),
the router's command line, the supervisor's restart rule, and, end to end on loopback, two tiny replicas
behind vllm-router: requests spread, cache-aware routing hits the prefix cache more than round robin, a killed
replica loses no request sent after it died, the front's /health reflects the replicas, SIGTERM stops all."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from r1serve.server.cli import parse_settings
from r1serve.server.data_parallel import (
    DataParallelError,
    DataParallelServer,
    ReplicaSpec,
    find_router,
    plan_replicas,
    router_command,
    router_metrics_port,
    strip_flags,
)
from r1serve.server.settings import ServerSettings
from server_utils import ServerHandle, server_command, stop_server, wait_healthy

MODEL = "DeepSeek-R1-Distill-Qwen-1.5B"
ARGV = ["--model", "m", "--port", "9000", "--data-parallel-size", "2", "--max-num-seqs=8", "--num-cpu-threads", "3"]


def test_strip_flags_removes_both_spellings_and_keeps_the_rest() -> None:
    argv = ["--port", "1", "--model", "m", "--port=2", "--host", "h", "--max-num-seqs", "4"]
    assert strip_flags(argv, ("--port", "--host")) == ["--model", "m", "--max-num-seqs", "4"]


def test_cpu_replicas_get_their_port_a_share_of_the_cores_and_the_other_flags() -> None:
    settings = ServerSettings(model="m", port=9000, data_parallel_size=2)
    specs = plan_replicas(settings, ["--model", "m", "--port", "9000", "--data-parallel-size", "2"], cuda=False,
                          environ={}, num_cores=8)
    assert [s.port for s in specs] == [9001, 9002] and router_metrics_port(settings) == 9003
    assert specs[1].argv == ["--model", "m", "--host", "127.0.0.1", "--port", "9002", "--num-cpu-threads", "4"]
    assert specs[1].env == {"R1SERVE_DATA_PARALLEL_RANK": "1"}


def test_given_cpu_threads_base_port_and_log_file_are_per_replica(tmp_path: Path) -> None:
    settings = parse_settings([*ARGV, "--data-parallel-base-port", "7000", "--log-file", str(tmp_path / "s.log")])
    spec = plan_replicas(settings, ARGV, cuda=False, environ={}, num_cores=64)[0]
    assert spec.port == 7000 and "--max-num-seqs=8" in spec.argv
    assert spec.argv[-4:] == ["--num-cpu-threads", "3", "--log-file", str(tmp_path / "s.replica0.log")]


def test_cuda_replicas_each_get_one_of_the_visible_gpus() -> None:
    settings = ServerSettings(model="m", data_parallel_size=2)
    specs = plan_replicas(settings, [], cuda=True, environ={"CUDA_VISIBLE_DEVICES": "4,6"}, num_cores=8)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["4", "6"]
    assert "--num-cpu-threads" not in specs[0].argv
    with pytest.raises(DataParallelError, match="needs 2 GPUs"):
        plan_replicas(settings, [], cuda=True, environ={"CUDA_VISIBLE_DEVICES": "3"}, num_cores=8)


def test_router_command_names_the_front_address_the_replicas_and_the_policy() -> None:
    settings = ServerSettings(model="m", host="0.0.0.0", port=9000, data_parallel_size=2, router_policy="round_robin")
    command = router_command("vllm-router", settings, ["http://127.0.0.1:9001", "http://127.0.0.1:9002"])
    joined = " ".join(command)
    assert "--host 0.0.0.0 --port 9000 --worker-urls http://127.0.0.1:9001 http://127.0.0.1:9002" in joined
    assert "--policy round_robin" in joined and "--prometheus-port 9003" in joined


def test_replica_ports_must_fit_and_miss_the_front_port() -> None:
    with pytest.raises(ValueError, match="among the replica ports"):
        ServerSettings(model="m", port=9000, data_parallel_size=2, data_parallel_base_port=8999)
    with pytest.raises(ValueError, match="past 65535"):
        ServerSettings(model="m", port=65534, data_parallel_size=2)


def test_a_missing_router_is_one_line_with_the_install_command(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataParallelError, match=r"pip install 'r1serve\[deploy\]'"):
        find_router()


class _DyingReplicas(DataParallelServer):
    """Replicas that exit at once with code 3: what the supervisor does when a replica keeps dying."""

    def start_replica(self, spec: ReplicaSpec) -> None:
        self.replicas[spec.index] = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])


def test_a_replica_that_keeps_dying_is_restarted_then_the_server_exits_1() -> None:
    settings = ServerSettings(model="m", data_parallel_size=2, data_parallel_max_restarts=2)
    specs = plan_replicas(settings, [], cuda=False, environ={}, num_cores=2)
    server = _DyingReplicas(settings, specs, "vllm-router")
    for spec in specs:
        server.start_replica(spec)
    assert server.supervise() == 1
    assert max(server.restarts) == 2


# --- end to end: two tiny replicas behind vllm-router on loopback ---

def consecutive_free_ports(count: int) -> int:
    """The first of `count` consecutive loopback ports that nothing listens on now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        try:
            sockets = [socket.create_server(("127.0.0.1", first + i)) for i in range(count)]
        except OSError:
            continue
        for sock in sockets:
            sock.close()
        return first
    raise RuntimeError("no consecutive free ports")


@pytest.fixture(scope="module")
def front(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    port = consecutive_free_ports(4)  # front, two replicas, the router's metrics
    log_path = tmp_path_factory.mktemp("dp") / "front.log"
    command = server_command(tiny_model_dir, port, "--data-parallel-size", "2", "--max-num-seqs", "8",
                             "--shutdown-grace-period", "2")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    handle = ServerHandle(url=f"http://127.0.0.1:{port}", port=port, process=process, log_path=log_path)
    try:
        wait_healthy(handle, timeout_s=180)
        yield handle
    finally:
        stop_server(process)


def replica_urls(front: ServerHandle) -> list[str]:
    return [f"http://127.0.0.1:{front.port + i}" for i in (1, 2)]


def prefix_cache(url: str) -> tuple[float, float]:
    """(hits, queries) in tokens, from a replica's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = [re.search(rf"^r1serve_prefix_cache_{name}_total (\S+)$", text, re.M) for name in ("hits", "queries")]
    assert all(values), text
    return float(values[0].group(1)), float(values[1].group(1))  # type: ignore[union-attr]


def completions_served(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.search(r'^r1serve_http_requests_total\{route="/v1/completions",status="200"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


async def _shared_prefix_waves(url: str, seed: int, num_prefixes: int = 3, num_waves: int = 4) -> None:
    """`num_waves` waves, each one request per prefix; every prompt is a long prefix plus a question. The requests
    go one after another, so that round robin's choice of replica does not hang on their order of arrival: with
    an odd number of prefixes each prefix alternates between the two replicas, whatever the router's start."""
    prefixes = [" ".join(f"w{seed}x{k}y{j}" for j in range(150)) for k in range(num_prefixes)]
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(wave: int, k: int) -> None:
            body = {"model": MODEL, "prompt": f"{prefixes[k]} question {wave}", "max_tokens": 4}
            response = await client.post(f"{url}/v1/completions", json=body)
            assert response.status_code == 200, response.text
        for wave in range(num_waves):
            for k in range(num_prefixes):
                await one(wave, k)


def hit_rate_of(front: ServerHandle, router_url: str, seed: int) -> float:
    before = [prefix_cache(url) for url in replica_urls(front)]
    asyncio.run(_shared_prefix_waves(router_url, seed))
    after = [prefix_cache(url) for url in replica_urls(front)]
    hits = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    queries = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return hits / queries


@pytest.fixture(scope="module")
def round_robin_router(front: ServerHandle) -> Iterator[str]:
    """A second vllm-router, round robin, in front of the same two replicas."""
    port = consecutive_free_ports(2)
    settings = ServerSettings(model="m", port=port, data_parallel_size=2, data_parallel_base_port=port + 1,
                              router_policy="round_robin")
    command = router_command(find_router(), settings, replica_urls(front))
    command[command.index("--prometheus-port") + 1] = str(port + 1)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(ServerHandle(url=url, port=port, process=process, log_path=front.log_path), timeout_s=30)
    yield url
    stop_server(process)


@pytest.mark.slow
def test_the_front_serves_and_round_robin_spreads_requests(front: ServerHandle, round_robin_router: str) -> None:
    response = httpx.post(f"{front.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                          timeout=60)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] is not None
    before = [completions_served(url) for url in replica_urls(front)]
    for i in range(6):
        httpx.post(f"{round_robin_router}/v1/completions", json={"model": MODEL, "prompt": f"p{i}", "max_tokens": 2},
                   timeout=60).raise_for_status()
    served = [completions_served(url) - b for url, b in zip(replica_urls(front), before, strict=True)]
    assert served == [3.0, 3.0]


@pytest.mark.slow
def test_cache_aware_routing_hits_the_prefix_cache_more_than_round_robin(
        front: ServerHandle, round_robin_router: str) -> None:
    round_robin = hit_rate_of(front, round_robin_router, seed=1)
    cache_aware = hit_rate_of(front, front.url, seed=2)  # other prefixes: nothing cached from the first run
    print(f"prefix-cache hit rate: round robin {round_robin:.2f}, cache aware {cache_aware:.2f}")
    # Each prefix is computed once under cache-aware routing (3 waves of 4 hit), on both replicas under round
    # robin (about 2 of 4 hit).
    assert cache_aware > 0.6 and cache_aware >= round_robin + 0.12


def _replica_pid(front: ServerHandle, port: int) -> int:
    children = Path(f"/proc/{front.process.pid}/task/{front.process.pid}/children").read_text().split()
    for pid in children:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"--port" in command and command[command.index(b"--port") + 1] == str(port).encode():
            return int(pid)
    raise AssertionError(f"no replica on port {port} among {children}")


def _wait_health(url: str, status: int, timeout_s: float) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        response = httpx.get(f"{url}/health", timeout=5)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


@pytest.mark.slow
def test_a_killed_replica_loses_no_later_request_and_the_front_health_shows_it(front: ServerHandle) -> None:
    dead_url = replica_urls(front)[0]
    subprocess.run(["kill", "-9", str(_replica_pid(front, front.port + 1))], check=True)
    statuses = [httpx.post(f"{front.url}/v1/completions", json={"model": MODEL, "prompt": f"after {i}",
                                                                 "max_tokens": 2}, timeout=60).status_code
                for i in range(8)]
    assert statuses == [200] * 8
    unhealthy = _wait_health(front.url, 503, timeout_s=10)
    assert unhealthy.status_code == 503 and dead_url in unhealthy.text
    assert _wait_health(front.url, 200, timeout_s=150).status_code == 200  # restarted by the supervisor
    assert "replica 0 exited with code -9; restart 1 of 3" in front.read_log()


@pytest.mark.slow
def test_sigterm_stops_the_router_and_every_replica(front: ServerHandle) -> None:
    front.process.send_signal(signal.SIGTERM)
    assert front.process.wait(timeout=60) == 0
    for url in [front.url, *replica_urls(front)]:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
