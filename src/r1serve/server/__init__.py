"""r1serve's OpenAI-compatible HTTP server: `r1serve serve`, with the R1 usage rules built in.

`create_app(engine, settings)` builds the FastAPI app (for embedding and tests); `ServerSettings` holds every
option (the command-line flags are generated from it); `r1serve.server.cli.main` is the command. Heavy
modules (the engine, torch) are imported only when the server actually starts.
"""

from __future__ import annotations

from r1serve.server.app import create_app, server_state
from r1serve.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "server_state"]
