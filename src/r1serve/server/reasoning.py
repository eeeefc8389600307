"""Usage rule 5: split the model's output into reasoning (before `</think>`) and answer (after it).

R1 models write their chain of thought, then `</think>`, then the answer. Clients want the two apart, under
the DeepSeek API's names `reasoning_content` and `content`, both in full responses and in stream deltas. The
delta boundaries are arbitrary (`</think>` may arrive as `</`, `think`, `>` across three deltas, or never),
so `ReasoningSplitter` is a small state machine fed delta by delta: it holds back only the characters that
could still be the start of a tag and releases them once they cannot. Full responses use the same splitter
on the whole text, so a stream's concatenated deltas equal the full response exactly. Reasoning tokens are
counted by the `</think>` token id when the tokenizer has one, else by re-encoding the reasoning text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (0 if none)."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


@dataclass
class SplitDelta:
    """The reasoning and the answer text a piece of output contributed (either or both may be empty)."""

    reasoning: str = ""
    content: str = ""


class ReasoningSplitter:
    """Feeds on output text, delta by delta, and tells which part is reasoning and which is answer.

    `in_reasoning=True` (forced thinking: the prompt already ends with `<think>\\n`) starts inside the
    reasoning. With `in_reasoning=False` the output is reasoning only if it opens with `<think>` (after
    optional whitespace); otherwise it is all answer. The answer's leading whitespace is dropped (the model
    writes `</think>\\n\\n`); a second `</think>` inside the answer is answer text.
    """

    def __init__(self, in_reasoning: bool = True) -> None:
        self.state = "reasoning" if in_reasoning else "start"  # start -> reasoning -> content
        self.has_reasoning = in_reasoning  # the output has a reasoning part (possibly empty)
        self.closed = False  # `</think>` ended the reasoning
        self._pending = ""  # text held back: it may still become a tag (or is leading whitespace)
        self._content_started = False

    @property
    def in_reasoning(self) -> bool:
        return self.state == "reasoning"

    def feed(self, text: str) -> SplitDelta:
        """The split of `text`, the next piece of output; may hold back up to a tag's length of it."""
        out = SplitDelta()
        buffer = self._pending + text
        self._pending = ""
        if self.state == "start":
            buffer = self._feed_start(buffer)
        if self.state == "reasoning":
            buffer = self._feed_reasoning(buffer, out)
        if self.state == "content":
            self._feed_content(buffer, out)
        return out

    def flush(self) -> SplitDelta:
        """The end of the output: release whatever was held back, as the part it belongs to."""
        out = SplitDelta()
        pending, self._pending = self._pending, ""
        if self.state == "reasoning":
            out.reasoning = pending
        elif self.state == "start":
            self.state = "content"
            self._feed_content(pending, out)
        return out

    def _feed_start(self, buffer: str) -> str:
        stripped = buffer.lstrip()
        if stripped.startswith(THINK_START):
            self.state = "reasoning"
            self.has_reasoning = True
            return stripped[len(THINK_START):]
        if THINK_START.startswith(stripped):  # only whitespace, or a prefix of <think>, so far
            self._pending = buffer
            return ""
        self.state = "content"
        return buffer

    def _feed_reasoning(self, buffer: str, out: SplitDelta) -> str:
        end = buffer.find(THINK_END)
        if end >= 0:
            out.reasoning += buffer[:end]
            self.state = "content"
            self.closed = True
            return buffer[end + len(THINK_END):]
        held = _partial_tag_suffix(buffer, THINK_END)
        out.reasoning += buffer[: len(buffer) - held]
        self._pending = buffer[len(buffer) - held:]
        return ""

    def _feed_content(self, buffer: str, out: SplitDelta) -> None:
        if not self._content_started:
            buffer = buffer.lstrip()
            self._content_started = bool(buffer)
        out.content += buffer


def split_reasoning(text: str, in_reasoning: bool = True) -> tuple[str | None, str, bool]:
    """The (reasoning, answer, closed) of a whole output: reasoning is None when the output has none,
    `closed` says whether `</think>` ended it."""
    splitter = ReasoningSplitter(in_reasoning)
    first, last = splitter.feed(text), splitter.flush()
    reasoning = first.reasoning + last.reasoning
    return (reasoning if splitter.has_reasoning else None), first.content + last.content, splitter.closed


def count_reasoning_tokens(token_ids: Sequence[int], has_reasoning: bool, closed: bool, reasoning_text: str,
                           think_end_id: int | None, encode: Callable[[str], list[int]]) -> int:
    """Output tokens spent before `</think>`: the position of the `</think>` token when the output has it,
    every token when the reasoning never closed, else (no such id) the reasoning text re-encoded."""
    if not has_reasoning:
        return 0
    if think_end_id is not None and think_end_id in token_ids:
        return list(token_ids).index(think_end_id)
    if not closed:
        return len(token_ids)
    return len(encode(reasoning_text)) if reasoning_text else 0
