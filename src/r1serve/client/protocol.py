"""The OpenAI wire format as the client needs it: requests built, responses and stream chunks read.

Both `LLMClient` and `AsyncLLMClient` send the same requests and read the same answers; only their I/O
differs. So everything about the shapes lives here, free of I/O: checking and preparing the messages
(the R1 message rules of `r1serve.r1_rules`: folding the system prompt for servers that do not, dropping
earlier reasoning from history), putting each
keyword where the SDK wants it (its own parameters, or `extra_body` for r1serve's extensions), reading a
completion into a `ChatResult`, and `StreamAssembler`, which turns chunks into ordered reasoning/answer
deltas and a final `StreamEnd`, splitting on the client side when the server did not.
"""

from __future__ import annotations

import time
from typing import Any

from r1serve.client.errors import BadRequestError, ModelNotFoundError, NotOpenAICompatibleError
from r1serve.client.reasoning import ReasoningSplitter, split_reasoning
from r1serve.client.types import ChatResult, ServerInfo, StreamDelta, StreamEnd, StreamItem, Usage
from r1serve.r1_rules import THINK_END, fold_system_prompt, strip_history_reasoning

POLICY_HEADER = "x-r1serve-policy"
ROLES = ("system", "user", "assistant", "tool", "developer")
REASONING_FIELDS = ("reasoning_content", "reasoning")  # DeepSeek/r1serve/vLLM, newer vLLM/OpenRouter
# Keywords the SDK's `chat.completions.create` takes itself; every other extra keyword goes to `extra_body`.
SDK_PARAMS = frozenset(
    {
        "top_p",
        "seed",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "user",
        "stream_options",
        "max_completion_tokens",
        "n",
        "response_format",
        "tools",
        "tool_choice",
        "timeout",
        "extra_headers",
        "extra_query",
        "metadata",
        "store",
        "parallel_tool_calls",
    }
)


def _check_message(i: int, message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise BadRequestError(
            f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}"
        )
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise BadRequestError(f"messages[{i}]: role must be one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(content, str | list):
        raise BadRequestError(f"messages[{i}]: content must be a string, got {type(content).__name__}")
    return dict(message)


def prepare_messages(messages: Any, fold: bool) -> list[dict[str, Any]]:
    """Checked copies of `messages`, earlier reasoning dropped (usage rule 4, whichever server gets them),
    the system prompt folded if `fold` (rule 1), by the rules of `r1serve.r1_rules`."""
    if isinstance(messages, str) or not isinstance(messages, list | tuple) or not messages:
        raise BadRequestError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    checked = strip_history_reasoning([_check_message(i, m) for i, m in enumerate(messages)])
    return fold_system_prompt(checked) if fold else checked


def build_request(
    model: str,
    messages: list[dict[str, Any]],
    *,
    stream: bool,
    temperature: float | None,
    max_tokens: int | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Keyword arguments for `chat.completions.create`: SDK parameters as such, the rest in `extra_body`."""
    kwargs: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    if temperature is not None:
        kwargs["temperature"] = temperature
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    extra = dict(extra)
    extra_body = dict(extra.pop("extra_body", None) or {})
    for key, value in extra.items():
        if value is not None:
            (kwargs if key in SDK_PARAMS else extra_body)[key] = value
    if kwargs.get("n", 1) != 1:
        raise BadRequestError(
            f"n must be 1 (one ChatResult per call), got {kwargs['n']}; call once per sample"
        )
    if stream and "stream_options" not in extra:
        kwargs["stream_options"] = {"include_usage": True}
    if extra_body:
        kwargs["extra_body"] = extra_body
    return kwargs


def policy_splits(policy: str | None) -> bool:
    """Whether r1serve's policy header says it split reasoning from answer itself (usage rule 5)."""
    if policy is None:
        return False
    items = {item.strip().split("=")[0] for item in policy.split(",")}
    return not items.isdisjoint({"reasoning", "reasoning-split", "reasoning_split", "split-reasoning"})


def reasoning_of(obj: Any) -> str | None:
    """The server's reasoning field of a message or delta (an SDK model with extra fields), if it sent one."""
    for name in REASONING_FIELDS:
        value = getattr(obj, name, None)
        if value is None:
            value = (getattr(obj, "model_extra", None) or {}).get(name)
        if isinstance(value, str):
            return value
    return None


def usage_of(usage: Any) -> Usage | None:
    if usage is None:
        return None
    details = getattr(usage, "completion_tokens_details", None)
    reasoning_tokens = getattr(details, "reasoning_tokens", None) if details is not None else None
    return Usage(int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0), reasoning_tokens)


def parse_completion(
    response: Any, *, url: str, policy: str | None, latency_s: float, split: bool
) -> ChatResult:
    """A non-streamed chat completion read into a `ChatResult`, split by whichever side can."""
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices or getattr(choices[0], "message", None) is None:
        raise NotOpenAICompatibleError(f"{url} answered a chat completion without choices", url=url)
    choice = choices[0]
    content = choice.message.content or ""
    reasoning = reasoning_of(choice.message)
    if (reasoning is not None or policy_splits(policy)) and THINK_END not in content:
        source, reasoning, answer = "server", reasoning or "", content.lstrip()
    elif split:
        source, (reasoning, answer) = "client", split_reasoning(content)
    else:
        source, reasoning, answer = "none", "", content
    return ChatResult(
        content=answer,
        reasoning=reasoning,
        finish_reason=choice.finish_reason,
        usage=usage_of(getattr(response, "usage", None)),
        model=str(getattr(response, "model", "")),
        latency_s=latency_s,
        reasoning_source=source,
        policy=policy,
    )


def parse_models(data: Any, url: str) -> list[dict[str, Any]]:
    """The entries of a `GET /v1/models` answer; a clear error when it is not that."""
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("id"), str) for e in entries
    ):
        raise NotOpenAICompatibleError(
            f"{url}/models did not answer an OpenAI model list: not an OpenAI-compatible API "
            "(the URL should end in /v1)",
            url=url,
        )
    if not entries:
        raise ModelNotFoundError(f"{url} serves no model", url=url)
    return entries


def parse_server_info(data: Any) -> ServerInfo:
    """`GET /version` read; anything but an r1serve answer gives a `ServerInfo` with `is_r1serve` False."""
    if not isinstance(data, dict):
        return ServerInfo(is_r1serve=False)
    name = str(data.get("name") or data.get("server") or "")
    is_r1serve = "r1serve" in name.lower() or "load_format" in data
    load_format = data.get("load_format")
    version = data.get("version")
    return ServerInfo(
        is_r1serve=is_r1serve,
        version=str(version) if version is not None else None,
        load_format=str(load_format) if load_format is not None else None,
        raw=dict(data),
    )


class StreamAssembler:
    """Chunks of a streamed chat completion in, `StreamDelta`s out (reasoning before answer, never mixed),
    then a `StreamEnd`; keeps the whole reasoning and answer for `result()`."""

    def __init__(self, *, url: str, started: float, policy: str | None, split: bool) -> None:
        self.url, self.started, self.policy, self.split = url, started, policy, split
        self.server_splits = policy_splits(policy)
        self.splitter = ReasoningSplitter()
        self.num_chunks = 0
        self.model = ""
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.ttft_s: float | None = None
        self.reasoning: list[str] = []
        self.answer: list[str] = []
        self.end_item: StreamEnd | None = None

    def on_chunk(self, chunk: Any) -> list[StreamDelta]:
        self.num_chunks += 1
        self.model = str(getattr(chunk, "model", "") or self.model)
        self.usage = usage_of(getattr(chunk, "usage", None)) or self.usage
        choices = getattr(chunk, "choices", None) or []
        if not choices:
            return []
        choice = choices[0]
        self.finish_reason = getattr(choice, "finish_reason", None) or self.finish_reason
        delta = getattr(choice, "delta", None)
        if delta is None:
            return []
        reasoning, content = reasoning_of(delta), getattr(delta, "content", None) or ""
        if (reasoning or content) and self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.started
        out: list[StreamDelta] = []
        if reasoning:
            self.server_splits = True
            out.append(StreamDelta("reasoning", reasoning))
        if content:
            out += self._content(content)
        return self._record(out)

    def _content(self, content: str) -> list[StreamDelta]:
        if self.server_splits:
            if not self.answer:
                content = content.lstrip()
            return [StreamDelta("answer", content)] if content else []
        if self.split:
            return self.splitter.feed(content)
        return [StreamDelta("answer", content)]

    def _record(self, deltas: list[StreamDelta]) -> list[StreamDelta]:
        for delta in deltas:
            (self.reasoning if delta.kind == "reasoning" else self.answer).append(delta.text)
        return deltas

    @property
    def source(self) -> str:
        return "server" if self.server_splits else ("client" if self.split else "none")

    def end(self) -> list[StreamItem]:
        """The held-back text and the `StreamEnd`, once the stream is over."""
        if self.num_chunks == 0:
            raise NotOpenAICompatibleError(
                f"{self.url} sent no stream events: not an OpenAI-compatible stream", url=self.url
            )
        tail: list[StreamItem] = list(self._record(self.splitter.finish()))
        self.end_item = StreamEnd(
            self.finish_reason,
            self.usage,
            self.ttft_s,
            time.perf_counter() - self.started,
            model=self.model,
            reasoning_source=self.source,  # type: ignore[arg-type]
            policy=self.policy,
        )
        return [*tail, self.end_item]

    def result(self) -> ChatResult:
        end = self.end_item
        latency = end.latency_s if end else time.perf_counter() - self.started
        return ChatResult(
            content="".join(self.answer),
            reasoning="".join(self.reasoning),
            finish_reason=self.finish_reason,
            usage=self.usage,
            model=self.model,
            latency_s=latency,
            ttft_s=self.ttft_s,
            reasoning_source=self.source,
            policy=self.policy,
        )  # type: ignore[arg-type]
