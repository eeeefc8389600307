"""The plain data the client hands back: a finished chat, the pieces of a stream, a solved math problem.

These are what callers of `r1serve.client` (the eval harness, `r1serve chat`, `r1serve check`, user code)
program against, so they are small dataclasses with no behaviour and no dependency on the `openai` SDK's
own types: the SDK may change, these stay. Reasoning and answer are always apart (`reasoning` / `content`),
whichever side split them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

DeltaKind = Literal["reasoning", "answer"]


@dataclass
class Usage:
    """Token counts as the server reported them; `reasoning_tokens` only where the server counts them."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class ChatResult:
    """One finished chat completion.

    `content` is the answer (text after `</think>`, empty if the reasoning never closed), `reasoning` the
    text before it. `latency_s` is the wall time of the call (retries included); `ttft_s` is set for
    streamed requests only. `reasoning_source` says who split the two: the server (`reasoning_content`
    field) or this client (cut at `</think>`). `policy` is r1serve's `x-r1serve-policy` header, if any.
    """

    content: str
    reasoning: str
    finish_reason: str | None
    usage: Usage | None
    model: str
    latency_s: float
    ttft_s: float | None = None
    reasoning_source: Literal["server", "client", "none"] = "client"
    policy: str | None = None


@dataclass
class StreamDelta:
    """A piece of streamed text: either reasoning or answer, never both."""

    kind: DeltaKind
    text: str


@dataclass
class StreamEnd:
    """The last item of every stream: why it ended, the usage (if the server sent it) and the timings."""

    finish_reason: str | None
    usage: Usage | None
    ttft_s: float | None
    latency_s: float
    model: str = ""
    reasoning_source: Literal["server", "client", "none"] = "client"
    policy: str | None = None


StreamItem = StreamDelta | StreamEnd


@dataclass
class MathResult:
    """A math problem asked with the R1 math prompt: `answer` is the content of the last `\\boxed{}` (None if
    there is none), `reasoning` the thinking, `text` the full output (reasoning, `</think>`, answer)."""

    answer: str | None
    reasoning: str
    text: str
    result: ChatResult


@dataclass
class ServerInfo:
    """What `GET /version` said. `is_r1serve` is True for an r1serve server; `load_format` is "dummy" when it
    serves random weights (which cannot solve anything, so answer-quality checks do not apply)."""

    is_r1serve: bool
    version: str | None = None
    load_format: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def dummy_weights(self) -> bool:
        return self.load_format == "dummy"

    def runtime(self) -> str | None:
        """How the server runs the model, in one phrase ("cpu, float32, kernels torch, attention torch, KV cache
        float32"), from /version's device, dtype, kernels, attention and kv_cache_dtype; None if it does not say."""
        raw = self.raw
        if raw.get("device") is None:
            return None
        parts = [str(raw["device"]), str(raw.get("dtype")), f"kernels {raw.get('kernels')}",
                 f"attention {raw.get('attention')}", f"KV cache {raw.get('kv_cache_dtype')}"]
        return ", ".join(parts)

    @property
    def quantization(self) -> str | None:
        """The quantization method the server reports ('none' when dense; None if it does not say)."""
        value = self.raw.get("quantization")
        return None if value is None else str(value)
