"""Running `r1serve serve`: open the port, load the engine in the background, serve, shut down gracefully.

The port opens first and `/health` answers 503 "loading" while the model loads on a background thread, so a
deployment can watch start-up; when the engine is ready the log gets uvicorn's `Application startup complete.`
line (what the seeds' check waits for). A loading failure is one log line with its fix and exit code 1.
SIGTERM (or Ctrl+C) stops accepting connections, lets in-flight requests run for `--shutdown-grace-period`
seconds, aborts the rest (their streams end with finish_reason "abort"), shuts the engine down and exits 0.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from r1serve.logs import LogConfig
from r1serve.server.app import create_app, server_state
from r1serve.server.limits import guarded_h11_protocol
from r1serve.server.settings import ServerSettings
from r1serve.server.state import ServerState

logger = logging.getLogger("r1serve.server")
uvicorn_logger = logging.getLogger("uvicorn.error")

SHUTDOWN_BACKSTOP_S = 10.0  # after the grace period and the aborts, uvicorn cancels what is left
ENGINE_DEATH_EXIT_DELAY_S = 2.0  # after the engine died: time for open responses to carry their 503


class ServerStartError(Exception):
    """A start-up failure with a one-line explanation and its fix."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (IPv4 or IPv6), or a ServerStartError saying what to do."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ServerStartError(f"cannot resolve --host {host!r} ({exc}); use an address such as 127.0.0.1 or "
                               "0.0.0.0") from exc
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServerStartError(f"port {port} on {host} is already in use (another server?); choose a free "
                                   "one with --port") from exc
        raise ServerStartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def explain_load_failure(exc: BaseException, settings: ServerSettings) -> str:
    """One line: what went wrong while loading the model, and the fix."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError":
        return (f"CUDA out of memory while loading {settings.model} ({text}); lower --gpu-memory-utilization "
                f"(now {settings.gpu_memory_utilization}), --max-model-len (now {settings.max_model_len}) or "
                f"--max-num-seqs (now {settings.max_num_seqs})")
    not_found = isinstance(exc, FileNotFoundError) or "NotFound" in type(exc).__name__ or \
        "not found" in str(exc).lower() or "does not exist" in str(exc).lower()
    if not_found:
        return (f"model {settings.model!r} not found ({text}); pass a local folder holding config.json and "
                "*.safetensors to --model, or use --load-format dummy for random weights")
    return f"failed to load model {settings.model!r}: {text}"


class R1Server(uvicorn.Server):
    """uvicorn's server, plus the grace period: after SIGTERM, in-flight requests get `grace_s` seconds,
    then are aborted so that their responses end properly. It listens before the model is loaded (`/health`
    answers "loading"); `on_listening` starts the loading, and the loader logs `Application startup complete.`"""

    def __init__(self, config: uvicorn.Config, state: ServerState, on_listening: Callable[[], None]) -> None:
        super().__init__(config)
        self.state = state
        self.on_listening = on_listening
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        uvicorn_logger.info("Waiting for application startup.")
        await super().startup(sockets=sockets)
        host, port = self.config.host, self.config.port
        uvicorn_logger.info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
                            f"[{host}]" if ":" in host else host, port)
        self.on_listening()

    def engine_died(self) -> None:
        """From the engine's thread: /health and new requests answer 503 from now on; after a short while
        (for in-flight responses to end with their error) the server exits with code 1, for its supervisor
        to restart it."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.call_later, ENGINE_DEATH_EXIT_DELAY_S, self._exit_after_death)

    def _exit_after_death(self) -> None:
        logger.error("exiting with code 1 so that the supervisor restarts the server")
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first and self._loop is not None:
            self.state.shutting_down = True
            logger.info("received %s: finishing in-flight requests (grace period %.0f s)",
                        signal.Signals(sig).name, self.state.settings.shutdown_grace_period)
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._abort_after_grace()))

    async def _abort_after_grace(self) -> None:
        await asyncio.sleep(self.state.settings.shutdown_grace_period)
        num_aborted = await self.state.abort_all()
        if num_aborted:
            logger.info("grace period over: aborted %d in-flight requests", num_aborted)


def load_engine(settings: ServerSettings, state: ServerState, server: R1Server) -> None:
    """The loader thread: build the engine, attach it, announce readiness; on failure stop the server."""
    try:
        from r1serve.engine.process_engine import make_engine

        if settings.engine_process:  # the engine's child computes; this process only tokenizes and serves HTTP
            import torch

            torch.set_num_threads(1)

        engine = make_engine(settings.engine_config(), in_process=not settings.engine_process,
                             log=log_config(settings))
    except BaseException as exc:  # noqa: BLE001 - every failure must become one clear line and exit 1
        state.load_error = explain_load_failure(exc, settings)
        logger.debug("loading failed", exc_info=True)
        logger.error(state.load_error)
        server.should_exit = True
        return
    if server.should_exit:  # stopped while loading
        engine.shutdown()
        return
    if settings.chat_template is not None:
        engine.tokenizer.set_chat_template(read_chat_template(settings.chat_template))
    engine.tokenizer.max_chars_per_token()  # a scan of the vocabulary: here, not on the event loop at a first request
    state.engine = engine
    engine.on_death(lambda reason: server.engine_died())
    logger.info("model %s ready: answers to %s; max_model_len %d; policy %s", settings.model,
                ", ".join(state.model_names), engine.max_model_len, _policy_summary(settings))
    uvicorn_logger.info("Application startup complete.")


def log_config(settings: ServerSettings) -> LogConfig:
    return LogConfig(settings.log_level, settings.log_file, settings.uvicorn_log_level)


def read_chat_template(value: str) -> str:
    """`--chat-template`: a file's contents, or the value itself when it is template text (as vLLM takes it)."""
    path = Path(value).expanduser()
    return path.read_text(encoding="utf-8") if path.is_file() else value


def log_accepted_flags(settings: ServerSettings) -> None:
    """One line for each vLLM flag given that r1serve accepts because it already does what the flag asks."""
    notes = {"trust_remote_code": "--trust-remote-code: the Qwen2 architecture is built in; no remote code runs",
             "reasoning_parser": "--reasoning-parser deepseek_r1: the reasoning split is built in (usage rule 5)",
             "enable_reasoning": "--enable-reasoning: reasoning is always returned apart from the answer",
             "enable_chunked_prefill": "--enable-chunked-prefill: chunked prefill is always on"}
    for name, note in notes.items():
        if name in settings.model_fields_set:
            logger.info(note)


def _policy_summary(settings: ServerSettings) -> str:
    policy = settings.policy_config()
    return ", ".join(f"{name}={value}" for name, value in vars(policy).items())


def run_server(settings: ServerSettings) -> int:
    """Serve until SIGTERM/Ctrl+C (exit 0) or a start-up failure (exit 1, one clear line)."""
    log_config(settings).apply()
    log_accepted_flags(settings)
    try:
        sock = bind_socket(settings.host, settings.port)
    except ServerStartError as exc:
        logger.error(str(exc))
        return 1
    app = create_app(None, settings)
    state = server_state(app)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, lifespan="off", log_config=None,
                            access_log=settings.access_log, http=guarded_h11_protocol(settings.timeout_request_header),
                            timeout_keep_alive=settings.timeout_keep_alive, root_path=settings.root_path or "",
                            ssl_keyfile=settings.ssl_keyfile, ssl_certfile=settings.ssl_certfile,
                            timeout_graceful_shutdown=int(settings.shutdown_grace_period + SHUTDOWN_BACKSTOP_S))
    loader = threading.Thread(target=lambda: load_engine(settings, state, server), name="r1serve-loader",
                              daemon=True)
    server = R1Server(config, state, on_listening=loader.start)
    for sig in (signal.SIGTERM, signal.SIGINT):  # what uvicorn re-raises after its graceful exit: a no-op
        signal.signal(sig, lambda signum, frame: None)
    server.run(sockets=[sock])
    return _finish(state, loader)


def _finish(state: ServerState, loader: threading.Thread) -> int:
    """After uvicorn stopped: shut the engine down; exit code 1 if loading failed."""
    state.shutting_down = True
    if state.engine is not None:
        state.engine.shutdown()
        logger.info("engine shut down")
    if state.load_error is not None or state.engine_dead is not None:
        return 1
    if loader.is_alive():  # stopped while the model was still loading: do not wait for it
        logger.info("stopped while the model was loading")
        logging.shutdown()
        os._exit(0)
    return 0
