"""What one OpenAI streaming response says, chunk by chunk, with the time each chunk arrived.

`vllm bench serve` and its peers time the first chunk that carries text; a reasoning model needs one more
time, the first chunk of the *answer*. Servers report that two ways: r1serve (and the DeepSeek API, and vLLM
with a reasoning parser) put the reasoning in `delta.reasoning_content` (vLLM's newer name: `reasoning`) and
the answer in `delta.content`; other servers stream everything as text with a literal `</think>` between the
two. `StreamState` follows both, keeps the arrival time of every chunk that carries text (TTFT and the
inter-token latencies come from these), the usage block of the last chunk, the finish reason, and the text
itself so that tokens can be counted with a tokenizer when the server sends no usage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from r1serve.r1_rules import THINK_END

REASONING_FIELDS = ("reasoning_content", "reasoning")


class StreamError(Exception):
    """The stream itself reported an error, or sent something that is not an OpenAI chunk."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


@dataclass
class StreamState:
    """Accumulates one request's stream. Times are seconds since the request was sent."""

    chunk_times: list[float] = field(default_factory=list)
    first_answer_time: float | None = None
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    reasoning_text: str = ""
    content_text: str = ""
    server_splits_reasoning: bool = False
    _answer_started_at: int | None = None  # index in content_text where the answer begins, once known

    def on_data(self, data: str, t: float) -> None:
        """One SSE `data` payload (not `[DONE]`) that arrived `t` seconds after the request was sent."""
        try:
            obj = json.loads(data)
        except json.JSONDecodeError as e:
            raise StreamError("bad_chunk", f"stream chunk is not JSON ({e.msg}): {data[:120]!r}") from e
        if not isinstance(obj, dict):
            raise StreamError("bad_chunk", f"stream chunk is not a JSON object: {data[:120]!r}")
        if obj.get("error") is not None:
            raise StreamError("stream_error", _error_message(obj["error"]))
        if obj.get("usage"):
            self.usage = obj["usage"]
        for choice in obj.get("choices") or []:
            if choice.get("index", 0) == 0:
                self._on_choice(choice, t)

    def _on_choice(self, choice: dict[str, Any], t: float) -> None:
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        if isinstance(delta, dict):  # chat completions
            reasoning = next((delta[k] for k in REASONING_FIELDS if delta.get(k)), "")
            content = delta.get("content") or ""
        else:  # completions
            reasoning, content = "", choice.get("text") or ""
        if not (reasoning or content):
            return  # role-only or finish-only chunk: no token in it
        self.chunk_times.append(t)
        if reasoning:
            self.server_splits_reasoning = True
            self.reasoning_text += reasoning
        if content:
            self._on_content(content, t)

    def _on_content(self, content: str, t: float) -> None:
        self.content_text += content
        if self._answer_started_at is None:
            if self.server_splits_reasoning:
                self._answer_started_at = len(self.content_text) - len(content)
            else:  # look only where a `</think>` could newly end: the chunk plus the tail before it
                start = max(0, len(self.content_text) - len(content) - len(THINK_END) + 1)
                end = self.content_text.find(THINK_END, start)
                if end >= 0:
                    self._answer_started_at = end + len(THINK_END)
        if self.first_answer_time is None and self._answer_started_at is not None:
            if self.content_text[self._answer_started_at:].strip():
                self.first_answer_time = t

    @property
    def first_token_time(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def output_text(self) -> str:
        """Everything the model generated, reasoning and answer, in order."""
        return self.reasoning_text + self.content_text

    def usage_tokens(self) -> tuple[int | None, int | None]:
        """(prompt_tokens, completion_tokens) from the server's usage block, None where it gave none."""
        if not self.usage:
            return None, None
        prompt, completion = self.usage.get("prompt_tokens"), self.usage.get("completion_tokens")
        return (prompt if isinstance(prompt, int) else None,
                completion if isinstance(completion, int) else None)


    def reasoning_tokens(self) -> int | None:
        """`usage.completion_tokens_details.reasoning_tokens` when the server reports it (r1serve does)."""
        details = (self.usage or {}).get("completion_tokens_details") or {}
        value = details.get("reasoning_tokens") if isinstance(details, dict) else None
        return value if isinstance(value, int) else None


def _error_message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)
