"""The OpenAI shapes of logprobs, and which counts a request asks the engine for.

Chat: `logprobs: true` with `top_logprobs: 0..--max-logprobs` gives `choices[].logprobs.content[]` of
`{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`. Completions: `logprobs: 0..--max-logprobs`
gives `{tokens, token_logprobs, top_logprobs, text_offset}`, whose `top_logprobs` dicts hold the top entries and
the sampled token (so up to logprobs + 1, as OpenAI's legacy API and vLLM have them); `echo` puts the prompt's
tokens first, the first one with `null`s. Token strings are each token decoded alone (special tokens kept), and
`bytes` their UTF-8 bytes, as vLLM writes them. vLLM's `prompt_logprobs: k` (chat and completions, not streamed)
gives `prompt_logprobs`, per prompt token a dict from token id to `{logprob, rank, decoded_token}` (the choice's
field in completions, the response's in chat, as vLLM places them). A token the engine forced (the thinking
budget's `</think>`) was never sampled: its `logprob` is `null` and its top list empty. The engine's records are
`engine.logprobs.TokenLogprob` tuples; nothing here imports the engine.
"""

from __future__ import annotations

import functools
from typing import Any

from r1serve.server.errors import bad_request
from r1serve.server.protocol import ChatCompletionRequest, CompletionRequest

Entry = Any  # an engine TokenLogprob: (logprob | None, top ids, top logprobs, rank | None)


def requested_counts(request: ChatCompletionRequest | CompletionRequest,
                     max_logprobs: int) -> tuple[int | None, int | None]:
    """(logprobs, prompt_logprobs) for `SamplingParams`: None where not asked; a 400 naming the field for a
    count outside 0..max_logprobs (--max-logprobs), top_logprobs without logprobs, or prompt_logprobs in a
    stream (as vLLM refuses it)."""
    prompt = request.prompt_logprobs
    if prompt is not None:
        prompt = _bounded(prompt, "prompt_logprobs", max_logprobs)
        if request.stream:
            raise bad_request("prompt_logprobs is not available with stream: true", param="prompt_logprobs")
    if isinstance(request, ChatCompletionRequest):
        top = request.top_logprobs
        if top is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        return (_bounded(top or 0, "top_logprobs", max_logprobs) if request.logprobs else None), prompt
    if request.logprobs is None:
        return None, prompt
    count = _bounded(request.logprobs, "logprobs", max_logprobs)
    if request.echo:  # the echoed prompt's logprobs come from the same records
        prompt = count if prompt is None else max(prompt, count)
    return count, prompt


def _bounded(count: int, param: str, max_logprobs: int) -> int:
    if not 0 <= count <= max_logprobs:
        raise bad_request(f"{param} must be in [0, {max_logprobs}] (this server's --max-logprobs), got {count}",
                          param=param)
    return count


@functools.lru_cache(maxsize=1 << 16)
def token_text(tokenizer: Any, token_id: int) -> str:
    """One token's text, decoded alone with special tokens kept (a piece of a UTF-8 character becomes U+FFFD)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _chat_top(tokenizer: Any, ids: tuple[int, ...], values: tuple[float, ...]) -> list[dict[str, Any]]:
    out = []
    for token_id, value in zip(ids, values, strict=True):
        text = token_text(tokenizer, token_id)
        out.append({"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))})
    return out


def chat_logprobs(token_ids: list[int], entries: list[Entry], tokenizer: Any) -> dict[str, Any]:
    """A chat choice's `logprobs`: one `content` item per token."""
    content = []
    for token_id, (logprob, top_ids, top_values, _) in zip(token_ids, entries, strict=True):
        text = token_text(tokenizer, token_id)
        content.append({"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
                        "top_logprobs": _chat_top(tokenizer, top_ids, top_values)})
    return {"content": content}


class CompletionLogprobs:
    """A completion choice's `logprobs`, grown token by token; `text_offset` counts characters of the token
    strings from the start of the choice's text (the echoed prompt's, with `echo`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.offset = 0

    def build(self, token_ids: list[int], entries: list[Entry | None]) -> dict[str, Any]:
        """The four lists for these tokens (an entry None: a prompt's first token), continuing the offsets."""
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for token_id, entry in zip(token_ids, entries, strict=True):
            text = token_text(self.tokenizer, token_id)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            if entry is None:
                token_logprobs.append(None)
                tops.append(None)
                continue
            logprob, top_ids, top_values, _ = entry
            token_logprobs.append(logprob)
            top = {token_text(self.tokenizer, i): v for i, v in zip(top_ids, top_values, strict=True)}
            if logprob is not None:
                top.setdefault(text, logprob)  # the sampled token is always there
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def vllm_prompt_logprobs(prompt_ids: list[int], entries: list[Entry | None], k: int,
                         tokenizer: Any) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then per token a dict from token id to
    `{logprob, rank, decoded_token}` holding the prompt token and the `k` most likely ones."""
    out: list[dict[str, Any] | None] = []
    for token_id, entry in zip(prompt_ids, entries, strict=True):
        if entry is None:
            out.append(None)
            continue
        logprob, top_ids, top_values, rank = entry
        ranked = {str(i): {"logprob": v, "rank": r, "decoded_token": token_text(tokenizer, i)}
                  for r, (i, v) in enumerate(zip(top_ids[:k], top_values[:k], strict=True), start=1)}
        ranked.setdefault(str(token_id), {"logprob": logprob, "rank": rank,
                                          "decoded_token": token_text(tokenizer, token_id)})
        out.append(ranked)
    return out


def join_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several `build` results end to end (the echoed prompt's, then the output's)."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {key: [value for part in parts for value in part[key]] for key in keys}
