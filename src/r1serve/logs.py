"""Logging of `r1serve serve`: one format for r1serve's and uvicorn's lines, to stderr and to `--log-file`.

Deployment checks read the server's log for uvicorn's own lines (`Started server process`, `Application
startup complete`, `Uvicorn running on ...`), and operators want one stream, not two formats. So uvicorn is
told not to configure logging, and the root logger gets one handler per destination with one format; the
`uvicorn`, `uvicorn.error`, `uvicorn.access` and `r1serve` loggers propagate to it. The engine's child process
is given the same `LogConfig`, so its lines (loading, shards, kernels) reach the same file, appended.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

LOG_FORMAT = "%(levelname)s %(asctime)s [%(name)s] %(message)s"
DATE_FORMAT = "%m-%d %H:%M:%S"
_OWN_HANDLER = "_r1serve_handler"
TRACE_LEVEL = 5  # uvicorn's "trace"


@dataclass(frozen=True)
class LogConfig:
    """Where a process's log goes: the level of r1serve's lines, the optional file (appended), uvicorn's level."""

    level: str = "info"
    file: Path | None = None
    uvicorn_level: str | None = None

    def apply(self) -> None:
        setup_logging(self.level, self.file, self.uvicorn_level)


def setup_logging(level: str = "info", log_file: Path | None = None, uvicorn_level: str | None = None) -> None:
    """Send every log line to stderr (and to `log_file`, appended) in r1serve's format; idempotent. uvicorn's
    loggers take `uvicorn_level` where given (`trace` is uvicorn's level below debug)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _OWN_HANDLER, False)]:
        root.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a", encoding="utf-8"))
    formatter = logging.Formatter(LOG_FORMAT, DATE_FORMAT)
    for handler in handlers:
        handler.setFormatter(formatter)
        setattr(handler, _OWN_HANDLER, True)
        root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "r1serve"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        own = uvicorn_level if uvicorn_level is not None and name.startswith("uvicorn") else level
        logger.setLevel(TRACE_LEVEL if own == "trace" else own.upper())
