"""Splitting R1 output into reasoning and answer on the client side, for servers that do not split it.

r1serve (and the DeepSeek API, and vLLM with a reasoning parser) send the reasoning in its own field. Other
OpenAI-compatible servers send the raw text: reasoning, `</think>`, answer. With the forced-thinking chat
template only the closing tag appears; older templates let the model write the opening `<think>` too. In a
stream the tag can arrive cut across chunks, so `ReasoningSplitter` holds back any tail that could be the
start of `</think>` until the next chunk settles it, and never emits a piece that mixes reasoning and
answer. The one-shot `split_reasoning` runs the same splitter, so streamed and full results always agree.
"""

from __future__ import annotations

from typing import Literal

from r1serve.client.types import StreamDelta

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_State = Literal["start", "reasoning", "answer"]


def _partial_tag_start(text: str, tag: str) -> int:
    """Where the longest suffix of `text` that is a proper prefix of `tag` begins (len(text) if none)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return len(text) - size
    return len(text)


class ReasoningSplitter:
    """Feed raw generated text chunk by chunk; get `StreamDelta`s of kind "reasoning" then "answer".

    Rules: a leading `<think>` (and the newline after it) is dropped; everything up to the first
    `</think>` is reasoning; the text after it is the answer, without its leading whitespace. If the tag
    never comes, everything is reasoning. Call `finish()` at the end of the stream to flush held text.
    """

    def __init__(self) -> None:
        self._state: _State = "start"
        self._pending = ""
        self._answer_started = False

    @property
    def in_answer(self) -> bool:
        return self._state == "answer"

    def feed(self, text: str) -> list[StreamDelta]:
        if not text:
            return []
        self._pending += text
        out: list[StreamDelta] = []
        if self._state == "start" and not self._leave_start():
            return out
        if self._state == "reasoning":
            out += self._drain_reasoning()
        if self._state == "answer":
            out += self._drain_answer()
        return out

    def finish(self) -> list[StreamDelta]:
        """Flush what was held back: a stream that ends inside the reasoning keeps it all as reasoning."""
        if self._state == "answer":
            return self._drain_answer()
        text, self._pending = self._pending, ""
        return [StreamDelta("reasoning", text)] if text else []

    def _leave_start(self) -> bool:
        """Drop a leading `<think>\\n`; False while the text so far could still be the start of one."""
        head = self._pending.lstrip()
        if len(head) < len(THINK_OPEN) + 1 and (THINK_OPEN + "\n").startswith(head):
            return False
        if head.startswith(THINK_OPEN):
            head = head[len(THINK_OPEN) :]
            self._pending = head[1:] if head.startswith("\n") else head
        self._state = "reasoning"
        return True

    def _drain_reasoning(self) -> list[StreamDelta]:
        text = self._pending
        cut = text.find(THINK_CLOSE)
        if cut >= 0:
            self._state = "answer"
            self._pending = text[cut + len(THINK_CLOSE) :]
            return [StreamDelta("reasoning", text[:cut])] if cut else []
        keep = _partial_tag_start(text, THINK_CLOSE)
        self._pending = text[keep:]
        return [StreamDelta("reasoning", text[:keep])] if keep else []

    def _drain_answer(self) -> list[StreamDelta]:
        text, self._pending = self._pending, ""
        if not self._answer_started:  # the blank lines after `</think>` are not part of the answer
            text = text.lstrip()
            self._answer_started = bool(text)
        return [StreamDelta("answer", text)] if text else []


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a whole R1 output, by the same rules as the streaming splitter."""
    splitter = ReasoningSplitter()
    parts = splitter.feed(text) + splitter.finish()
    reasoning = "".join(p.text for p in parts if p.kind == "reasoning")
    answer = "".join(p.text for p in parts if p.kind == "answer")
    return reasoning, answer
