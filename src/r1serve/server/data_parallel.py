"""`r1serve serve --data-parallel-size N`: N ordinary servers behind vllm-router, started and supervised.

One GPU holds one engine; more traffic needs more engines and something in front that spreads requests and
keeps requests sharing a prefix on the replica that has that prefix cached. That front is vllm-router (a
Rust router made for LLM traffic), not one written here: its `cache_aware` policy keeps a radix tree of the
request texts each worker has seen, it health-checks the workers (its `/health` is 503 naming the unhealthy
ones), retries on another worker and breaks circuits. This module only wires it up: it starts N plain
`r1serve serve` children on 127.0.0.1 (ports `--data-parallel-base-port`.., default `--port`+1..), each with
`CUDA_VISIBLE_DEVICES` set to its GPU on CUDA or its share of the cores (`--num-cpu-threads`) on a CPU, waits
for their `/health`, then starts the router on `--host`:`--port`. A replica that dies is restarted (the router
routes around it meanwhile) up to `--data-parallel-max-restarts` times; after that, or if the router dies,
everything is stopped and the exit code is 1, for the supervisor above to see. SIGTERM goes to the router and
every replica at once, each replica finishing its in-flight requests within `--shutdown-grace-period`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx

from r1serve.logs import setup_logging
from r1serve.server.settings import ServerSettings

logger = logging.getLogger("r1serve.server")

ROUTER = "vllm-router"
# The flags this module sets itself on each replica; the rest of the command line passes through unchanged.
OWN_FLAGS = ("--data-parallel-size", "--data-parallel-base-port", "--router-policy", "--data-parallel-max-restarts",
             "--host", "--port", "--num-cpu-threads", "--log-file")
# A dead replica must be noticed (health check every second, one failure) before a request's retries run out
# (6 retries backing off from 0.2 s, doubling: about 6 s), so that a request sent to it before it was noticed
# goes to another replica; three failed sends open its circuit at once, for 10 s.
ROUTER_FAILOVER_FLAGS = ("--health-check-interval-secs", "1", "--health-failure-threshold", "1",
                         "--health-success-threshold", "1", "--health-check-timeout-secs", "2",
                         "--retry-max-retries", "6", "--retry-initial-backoff-ms", "200",
                         "--retry-backoff-multiplier", "2", "--retry-max-backoff-ms", "3000",
                         "--cb-failure-threshold", "3", "--cb-timeout-duration-secs", "10",
                         "--worker-startup-timeout-secs", "30")
POLL_S = 0.5
STOP_BACKSTOP_S = 15.0  # after the grace period, what a child has left to exit before it is killed


class DataParallelError(Exception):
    """A start-up failure of the data-parallel server, with its fix."""


@dataclass(frozen=True)
class ReplicaSpec:
    """How to start replica `index`: its port, its command line and its environment additions."""

    index: int
    port: int
    argv: list[str]
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def replica_ports(settings: ServerSettings) -> list[int]:
    first = settings.data_parallel_base_port or settings.port + 1
    return [first + i for i in range(settings.data_parallel_size)]


def router_metrics_port(settings: ServerSettings) -> int:
    """The router's Prometheus port: the one after the last replica's."""
    return replica_ports(settings)[-1] + 1


def strip_flags(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    """`argv` without `flags` (as `--flag VALUE` or `--flag=VALUE`; each of these flags takes one value)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif not any(arg.startswith(flag + "=") for flag in flags):
            kept.append(arg)
    return kept


def uses_cuda(settings: ServerSettings) -> bool:
    if settings.device != "auto":
        return settings.device == "cuda"
    import torch

    return torch.cuda.is_available()


def visible_devices(num_replicas: int, environ: Mapping[str, str]) -> list[str]:
    """The GPU each replica gets: the i-th of the parent's `CUDA_VISIBLE_DEVICES`, else GPU i."""
    given = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    devices = given or [str(i) for i in range(num_replicas)]
    if len(devices) < num_replicas:
        raise DataParallelError(f"--data-parallel-size {num_replicas} needs {num_replicas} GPUs, but "
                                f"CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES')!r} names {len(devices)}")
    return devices[:num_replicas]


def cpu_threads_per_replica(settings: ServerSettings, num_cores: int) -> int:
    """`--num-cpu-threads` if given, else an equal share of the cores (at least one)."""
    return settings.num_cpu_threads or max(1, num_cores // settings.data_parallel_size)


def replica_log_file(log_file: Path | None, index: int) -> Path | None:
    """`server.log` -> `server.replica0.log`: one log per replica beside the front's."""
    return None if log_file is None else log_file.with_name(f"{log_file.stem}.replica{index}{log_file.suffix}")


def plan_replicas(settings: ServerSettings, argv: Sequence[str], cuda: bool,
                  environ: Mapping[str, str], num_cores: int) -> list[ReplicaSpec]:
    """One `ReplicaSpec` per replica: the given flags less this module's, then host, port, threads and log."""
    base = strip_flags(argv, OWN_FLAGS)
    devices = visible_devices(settings.data_parallel_size, environ) if cuda else []
    specs = []
    for index, port in enumerate(replica_ports(settings)):
        args = [*base, "--host", "127.0.0.1", "--port", str(port)]
        env: dict[str, str] = {"R1SERVE_DATA_PARALLEL_RANK": str(index)}
        if cuda:
            env["CUDA_VISIBLE_DEVICES"] = devices[index]
        else:
            args += ["--num-cpu-threads", str(cpu_threads_per_replica(settings, num_cores))]
        log_file = replica_log_file(settings.log_file, index)
        if log_file is not None:
            args += ["--log-file", str(log_file)]
        specs.append(ReplicaSpec(index, port, args, env))
    return specs


def find_router() -> str:
    """The vllm-router executable: beside this Python's (a virtual environment), else on PATH."""
    beside = Path(sys.executable).parent / ROUTER
    found = str(beside) if beside.is_file() else shutil.which(ROUTER)
    if found is None:
        raise DataParallelError(f"{ROUTER} is not installed: `pip install 'r1serve[deploy]'` (or "
                                f"`pip install vllm-router`), then start again")
    return found


def router_command(router: str, settings: ServerSettings, urls: Sequence[str]) -> list[str]:
    """vllm-router on the front address, the replicas as its workers, the chosen policy, fast health checks."""
    command = [router, "--host", settings.host, "--port", str(settings.port), "--worker-urls", *urls,
               "--policy", settings.router_policy, "--prometheus-host", "127.0.0.1",
               "--prometheus-port", str(router_metrics_port(settings)), *ROUTER_FAILOVER_FLAGS,
               "--log-level", settings.log_level]
    return command


def replica_healthy(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    return False


class DataParallelServer:
    """The replicas and the router as child processes, and what to do when one of them ends."""

    def __init__(self, settings: ServerSettings, specs: list[ReplicaSpec], router: str) -> None:
        self.settings, self.specs, self.router = settings, specs, router
        self.replicas: list[subprocess.Popen[bytes] | None] = [None] * len(specs)
        self.restarts = [0] * len(specs)
        self.router_process: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()

    def start_replica(self, spec: ReplicaSpec) -> None:
        command = [sys.executable, "-m", "r1serve.server", *spec.argv]
        self.replicas[spec.index] = subprocess.Popen(command, env={**os.environ, **spec.env})
        logger.info("replica %d starting on %s (%s)", spec.index, spec.url,
                    ", ".join(f"{k}={v}" for k, v in spec.env.items()))

    def wait_replicas_ready(self) -> None:
        """Until every replica's /health is 200; a replica that exits while loading fails the start."""
        pending = list(self.specs)
        while pending and not self.stopping.is_set():
            for spec in list(pending):
                process = self.replicas[spec.index]
                if process is not None and process.poll() is not None:
                    raise DataParallelError(f"replica {spec.index} exited with code {process.returncode} while "
                                            "loading (its log says why)")
                if replica_healthy(spec.url):
                    pending.remove(spec)
            time.sleep(POLL_S)

    def start_router(self) -> None:
        command = router_command(self.router, self.settings, [spec.url for spec in self.specs])
        self.router_process = subprocess.Popen(command)
        logger.info("%s (policy %s) on http://%s:%d in front of %s", ROUTER, self.settings.router_policy,
                    self.settings.host, self.settings.port, ", ".join(spec.url for spec in self.specs))

    def supervise(self) -> int:
        """Until SIGTERM (0) or a child that cannot go on (1): restart replicas that die."""
        while not self.stopping.wait(POLL_S):
            if self.router_process is not None and self.router_process.poll() is not None:
                logger.error("%s exited with code %s; stopping the replicas", ROUTER, self.router_process.returncode)
                return 1
            for spec in self.specs:
                process = self.replicas[spec.index]
                if process is None or process.poll() is None:
                    continue
                if self.restarts[spec.index] >= self.settings.data_parallel_max_restarts:
                    logger.error("replica %d exited with code %s after %d restarts (--data-parallel-max-restarts); "
                                 "stopping", spec.index, process.returncode, self.restarts[spec.index])
                    return 1
                self.restarts[spec.index] += 1
                logger.warning("replica %d exited with code %s; restart %d of %d (the router routes around it "
                               "meanwhile)", spec.index, process.returncode, self.restarts[spec.index],
                               self.settings.data_parallel_max_restarts)
                self.start_replica(spec)
        return 0

    def handle_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping.is_set():
            logger.info("received %s: stopping the router and %d replicas (grace period %.0f s)",
                        signal.Signals(signum).name, len(self.specs), self.settings.shutdown_grace_period)
        self.stopping.set()

    def stop(self) -> None:
        """SIGTERM to every child at once; after the grace period and a backstop, SIGKILL to what is left."""
        children = [p for p in [self.router_process, *self.replicas] if p is not None and p.poll() is None]
        for process in children:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_period + STOP_BACKSTOP_S
        for process in children:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle_signal)
        try:
            for spec in self.specs:
                self.start_replica(spec)
            self.wait_replicas_ready()
            if self.stopping.is_set():
                return 0
            self.start_router()
            return self.supervise()
        except DataParallelError as exc:
            logger.error(str(exc))
            return 1
        finally:
            self.stop()


def run_data_parallel(settings: ServerSettings, argv: Sequence[str]) -> int:
    """Serve with `settings.data_parallel_size` replicas behind vllm-router until SIGTERM; exit code as above."""
    setup_logging(settings.log_level, settings.log_file, settings.uvicorn_log_level)
    try:
        router = find_router()
        specs = plan_replicas(settings, argv, uses_cuda(settings), os.environ, len(os.sched_getaffinity(0)))
    except DataParallelError as exc:
        logger.error(str(exc))
        return 1
    return DataParallelServer(settings, specs, router).run()
