"""What the eval must know about the server before sending thousands of requests: is it there, which model,
how long a context. And how to keep each request's `max_tokens` inside that context.

An unreachable server, a wrong URL or an unknown model is reported once, clearly, before any work starts.
`/v1/models` entries that carry `max_model_len` (r1serve and vLLM do) cap `--max-tokens`: the paper's 32,768
output tokens do not fit a server started with a 4,096-token window, and a request that does not fit is
refused. The prompt's length is not known before it is tokenized by the server, so the cap uses a generous
estimate, and a refusal that states the real limit (r1serve's and vLLM's messages do) is retried once at it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from r1serve.client import AsyncLLMClient, ClientError

PROMPT_OVERHEAD_TOKENS = 32  # chat template tokens around the messages
_AT_MOST = re.compile(r"so at most (\d+)")  # r1serve
_VLLM = re.compile(r"maximum context length is (\d+) tokens.*?\((\d+) in the messages", re.DOTALL)


class EvalSetupError(RuntimeError):
    """The evaluation cannot start (server unreachable, model unknown, settings mismatch); one-line message."""


@dataclass(frozen=True)
class ServerModel:
    """The model the run asks for and its context window (None when the server does not say)."""

    model: str
    max_model_len: int | None
    available: tuple[str, ...]


def choose_model(entries: list[dict[str, Any]], requested: str | None) -> ServerModel:
    """The requested model (or the first listed) and its `max_model_len` from the `/v1/models` entries;
    a model the server does not list is an `EvalSetupError` (every request would fail with 404)."""
    ids = tuple(str(e["id"]) for e in entries)
    model = requested or ids[0]
    entry = next((e for e in entries if e["id"] == model), None)
    if entry is None:
        raise EvalSetupError(f"the server does not serve the model {model!r} (it serves: {', '.join(ids)}); "
                             "pass one of those with --model")
    length = entry.get("max_model_len")
    return ServerModel(model, int(length) if isinstance(length, int) and length > 0 else None, ids)


async def probe_server(client: AsyncLLMClient, requested: str | None) -> ServerModel:
    """List the server's models; an unreachable or non-OpenAI server raises an `EvalSetupError`."""
    try:
        entries = await client.list_model_details()
    except ClientError as e:
        raise EvalSetupError(f"cannot start the evaluation: {e.message}") from e
    return choose_model(entries, requested)


def estimate_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """A deliberately high estimate of a prompt's tokens: 1 per 2 UTF-8 bytes (BPE averages 3-4) + template."""
    num_bytes = sum(len(m["content"].encode("utf-8")) for m in messages)
    return num_bytes // 2 + PROMPT_OVERHEAD_TOKENS


def capped_max_tokens(requested: int, max_model_len: int | None, messages: list[dict[str, str]]) -> int:
    """`requested`, lowered so that the estimated prompt plus the output fit the context (at least 1)."""
    if max_model_len is None:
        return requested
    return max(1, min(requested, max_model_len - estimate_prompt_tokens(messages)))


def max_tokens_from_refusal(message: str) -> int | None:
    """The largest `max_tokens` a context-length refusal says would fit, if it says (r1serve, vLLM)."""
    match = _AT_MOST.search(message)
    if match:
        return int(match.group(1))
    match = _VLLM.search(message)
    if match:
        return int(match.group(1)) - int(match.group(2))
    return None
