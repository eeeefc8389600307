"""`r1serve.client`: talk to r1serve, or any OpenAI-compatible server, with R1's reasoning kept apart.

`LLMClient` (blocking) and `AsyncLLMClient` (asyncio) wrap the official `openai` SDK and return typed
results (`ChatResult`, `StreamDelta`/`StreamEnd`, `MathResult`) and typed errors (`ClientError` and its
subclasses). This package never imports torch or the engine: it runs on machines that only call a server.
"""

from __future__ import annotations

from r1serve.client.async_client import AsyncChatStream, AsyncLLMClient
from r1serve.client.boxed import last_boxed
from r1serve.client.errors import (
    AuthenticationError,
    BadRequestError,
    ClientConnectionError,
    ClientError,
    ClientTimeoutError,
    ModelNotFoundError,
    NotOpenAICompatibleError,
    ServerError,
)
from r1serve.client.reasoning import ReasoningSplitter, split_reasoning
from r1serve.client.sync_client import ChatStream, LLMClient
from r1serve.client.types import ChatResult, MathResult, ServerInfo, StreamDelta, StreamEnd, Usage

__all__ = [
    "AsyncChatStream",
    "AsyncLLMClient",
    "AuthenticationError",
    "BadRequestError",
    "ChatResult",
    "ChatStream",
    "ClientConnectionError",
    "ClientError",
    "ClientTimeoutError",
    "LLMClient",
    "MathResult",
    "ModelNotFoundError",
    "NotOpenAICompatibleError",
    "ReasoningSplitter",
    "ServerError",
    "ServerInfo",
    "StreamDelta",
    "StreamEnd",
    "Usage",
    "last_boxed",
    "split_reasoning",
]
