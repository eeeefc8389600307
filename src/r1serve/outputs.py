"""What the engine hands back: one `RequestOutput` per request, holding one `CompletionOutput` per sample.

Streams carry both the cumulative text and the delta since the last output, so the server can send deltas
and the offline API can keep the final text without either recomputing the other. The cumulative text lives in
a `TextBuffer` that grows by appended pieces and is joined only when someone reads it: `text += delta` on an
attribute copies the whole text at every token, which deep into a long reasoning trace costs milliseconds a step
at large batches (in the engine and again in the server; docs/performance.md, "Design choices"), and the
server's streams never read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort", "repetition"]
Logprobs = list[Any]  # of engine.logprobs.TokenLogprob (None for a prompt's first token): this module imports none


class TextBuffer:
    """Text grown by appending pieces (O(piece) each); reading joins the pieces once and keeps the join."""

    __slots__ = ("_pieces", "length")

    def __init__(self, text: str = "") -> None:
        self._pieces = [text] if text else []
        self.length = len(text)

    def append(self, piece: str) -> None:
        if piece:
            self._pieces.append(piece)
            self.length += len(piece)

    def prefix(self, length: int) -> str:
        """The first `length` characters (when that is all of them, the joined text itself, not a copy)."""
        if len(self._pieces) > 1:
            self._pieces[:] = ["".join(self._pieces)]
        whole = self._pieces[0] if self._pieces else ""
        return whole if length >= len(whole) else whole[:length]

    def __str__(self) -> str:
        return self.prefix(self.length)


class CompletionOutput:
    """One sample's output: the text and token ids so far, and what is new since the previous output.

    `text` is the text as it was when this output was made (read lazily from the sample's `TextBuffer`);
    `token_ids` is the sample's live list while it runs (no per-step copy): copy it to keep a snapshot.
    `logprobs` / `delta_logprobs` (one `TokenLogprob` per token of `token_ids` / `delta_token_ids`) are None unless
    the request asked for them.
    """

    __slots__ = ("index", "_text", "_text_length", "token_ids", "finish_reason", "stop_reason", "delta_text",
                 "delta_token_ids", "logprobs", "delta_logprobs")

    def __init__(self, index: int, text: str | TextBuffer = "", token_ids: list[int] | None = None,
                 finish_reason: FinishReason | None = None, stop_reason: str | int | None = None,
                 delta_text: str = "", delta_token_ids: list[int] | None = None, logprobs: Logprobs | None = None,
                 delta_logprobs: Logprobs | None = None) -> None:
        self.index = index
        self._text = text
        self._text_length = text.length if isinstance(text, TextBuffer) else len(text)
        self.token_ids = [] if token_ids is None else token_ids
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason  # the stop string or token id that ended it, if any
        self.delta_text = delta_text
        self.delta_token_ids = [] if delta_token_ids is None else delta_token_ids
        self.logprobs = logprobs
        self.delta_logprobs = delta_logprobs

    @property
    def text(self) -> str:
        text = self._text
        return text if isinstance(text, str) else text.prefix(self._text_length)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={self.token_ids!r}, "
                f"finish_reason={self.finish_reason!r}, stop_reason={self.stop_reason!r}, "
                f"delta_text={self.delta_text!r}, delta_token_ids={self.delta_token_ids!r})")


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (the first sample's)
    prompt_logprobs: Logprobs | None = None  # when asked: in the first output after the prompt is computed


# What is new for one sample, and for one request, since its previous output: what a step hands back to a frontend
# in another process (`LLMEngine.step_deltas`). Plain tuples rather than NamedTuples: they cross the pipe once per
# request per step, and a step's list of NamedTuples took several times as long as tuples to build, pickle and
# unpickle: each one pays Python's reduce and `__new__`. Code reads them by unpacking into named variables or
# through engine/frontend.py's accessors.
SampleDelta = tuple[int, str, list[int], FinishReason | None, str | int | None, Logprobs | None]
"""(index, delta_text, delta_token_ids, finish_reason, stop_reason, delta_logprobs: None unless asked)"""
RequestDelta = tuple[str, bool, int, list[SampleDelta], Logprobs | None]
"""(request_id, finished, num_cached_tokens, samples, prompt_logprobs: None unless asked, and sent once)"""


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one: the last one's state with each sample's deltas of all of them in
    order (a stream whose consumer fell behind catches up in one output). Reuses the newest `CompletionOutput` of
    each sample, so the outputs must be the caller's alone (a stream's are)."""
    if len(outputs) == 1:
        return outputs[0]
    parts: dict[int, list[CompletionOutput]] = {}
    for output in outputs:
        for sample in output.outputs:
            parts.setdefault(sample.index, []).append(sample)
    samples = []
    for index in sorted(parts):
        *earlier, newest = parts[index]
        if earlier:
            newest.delta_text = "".join([c.delta_text for c in earlier] + [newest.delta_text])
            newest.delta_token_ids = [t for c in (*earlier, newest) for t in c.delta_token_ids]
            if newest.delta_logprobs is not None:
                newest.delta_logprobs = [e for c in (*earlier, newest) for e in c.delta_logprobs or ()]
        samples.append(newest)
    last = outputs[-1]
    prompt_logprobs = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    return RequestOutput(last.request_id, last.prompt, last.prompt_token_ids, samples, last.finished,
                         last.num_cached_tokens, prompt_logprobs)
