"""The R1 rules that the client, the server, the engine and the eval all apply: one home, one wording.

DeepSeek-R1 writes its chain of thought, then `</think>`, then the answer. Several layers have to agree on
what that means: the server splits `reasoning_content` from `content`, a client splits raw text from servers
that do not, both fold the system prompt into the first user turn and drop earlier reasoning from the
history, the engine forces the closing tag when the thinking budget runs out, and the eval grades the text
after the last `</think>`. Written once here, the layers cannot drift apart. This module is pure (strings
and dicts in, strings and dicts out, stdlib only), so the client side imports it without torch.

The rules, as the model's chat template and DeepSeek's usage notes define them:

- **Forced thinking**: the generation prompt ends `<think>\\n`, so the output starts inside the reasoning and
  only the closing tag appears. A model that writes its own `<think>` anyway has it (and the newline after
  it) dropped, so the reasoning reads the same either way.
- **Split**: the first `</think>` ends the reasoning; the rest is the answer, without its leading whitespace
  (the model writes `</think>\\n\\n`); a later `</think>` is answer text. No `</think>` at all: reasoning only.
  A stream can cut the tag anywhere, so `ReasoningSplitter` holds back any tail that could still become a
  tag; `split_reasoning` runs the same splitter on a whole text, so streamed and whole results agree.
- **History**: an earlier assistant turn keeps only its text after its *last* `</think>` (leading whitespace
  dropped), as the template's `content.split('</think>')[-1]` does.
- **System prompt**: system text, a blank line, then the first user turn's text become that turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

THINK_START = "<think>"
THINK_END = "</think>"
THINKING_PREFIX = THINK_START + "\n"  # what forced thinking appends to the generation prompt
BUDGET_CLOSE = "\n" + THINK_END + "\n\n"  # what the engine appends when the thinking budget is spent

Message = dict[str, Any]


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (0 if none)."""
    if tag[0] not in text[1 - len(tag):]:  # every such suffix starts with the tag's first character
        return 0
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


@dataclass
class SplitDelta:
    """The reasoning and the answer text a piece of output contributed (either or both may be empty)."""

    reasoning: str = ""
    content: str = ""


class ReasoningSplit(NamedTuple):
    """A whole output split: `reasoning` is None when the output has none; `closed` when `</think>` ended it."""

    reasoning: str | None
    content: str
    closed: bool


_State = Literal["start", "reasoning", "answer"]


class ReasoningSplitter:
    """Feeds on output text, piece by piece, and tells which part is reasoning and which is answer.

    `in_reasoning=True` (forced thinking, and what a client assumes of R1): the output starts inside the
    reasoning. `in_reasoning=False`: the output is reasoning only if it opens with `<think>` (after
    optional whitespace); otherwise it is all answer. Either way a leading `<think>\\n` is dropped. It
    holds back at most a tag's length of text; `flush()` at the end releases it.
    """

    def __init__(self, in_reasoning: bool = True) -> None:
        self.state: _State = "start"
        self.has_reasoning = in_reasoning  # the output has a reasoning part (possibly empty)
        self.closed = False  # `</think>` ended the reasoning
        self._pending = ""  # held back: it may still become a tag, or is the answer's leading whitespace
        self._answer_started = False

    @property
    def in_reasoning(self) -> bool:
        return self.state == "reasoning" or (self.state == "start" and self.has_reasoning)

    @property
    def in_answer(self) -> bool:
        return self.state == "answer"

    def feed(self, text: str) -> SplitDelta:
        """The split of `text`, the next piece of output."""
        return self._drain(self._pending + text, final=False)

    def flush(self) -> SplitDelta:
        """The end of the output: whatever was held back, as the part it belongs to."""
        return self._drain(self._pending, final=True)

    def _drain(self, buffer: str, final: bool) -> SplitDelta:
        out = SplitDelta()
        self._pending = ""
        if self.state == "start":
            buffer = self._leave_start(buffer, final)
        if self.state == "reasoning":
            buffer = self._feed_reasoning(buffer, out, final)
        if self.state == "answer":
            self._feed_answer(buffer, out)
        return out

    def _leave_start(self, buffer: str, final: bool) -> str:
        """Drop a leading `<think>\\n`; hold the text while it could still be the start of one."""
        head = buffer.lstrip()
        if not final and len(head) < len(THINKING_PREFIX) and THINKING_PREFIX.startswith(head):
            self._pending = buffer
            return ""
        if head.startswith(THINK_START):
            self.state, self.has_reasoning = "reasoning", True
            rest = head[len(THINK_START) :]
            return rest[1:] if rest.startswith("\n") else rest
        self.state = "reasoning" if self.has_reasoning else "answer"
        return buffer

    def _feed_reasoning(self, buffer: str, out: SplitDelta, final: bool) -> str:
        end = buffer.find(THINK_END)
        if end >= 0:
            out.reasoning += buffer[:end]
            self.state, self.closed = "answer", True
            return buffer[end + len(THINK_END) :]
        held = 0 if final else _partial_tag_length(buffer, THINK_END)
        out.reasoning += buffer[: len(buffer) - held]
        self._pending = buffer[len(buffer) - held :]
        return ""

    def _feed_answer(self, buffer: str, out: SplitDelta) -> None:
        if not self._answer_started:
            buffer = buffer.lstrip()
            self._answer_started = bool(buffer)
        out.content += buffer


def split_reasoning(text: str, in_reasoning: bool = True) -> ReasoningSplit:
    """A whole output split by the same rules as the streaming splitter."""
    splitter = ReasoningSplitter(in_reasoning)
    first, last = splitter.feed(text), splitter.flush()
    reasoning = first.reasoning + last.reasoning
    return ReasoningSplit(reasoning if splitter.has_reasoning else None, first.content + last.content,
                          splitter.closed)


def partition_last_think_end(text: str) -> tuple[str, str | None]:
    """(text before the last `</think>`, text after it); None after it when there is no `</think>`."""
    cut = text.rfind(THINK_END)
    if cut < 0:
        return text, None
    return text[:cut], text[cut + len(THINK_END) :]


def history_answer(content: str) -> str:
    """What an earlier assistant turn keeps: its text after the last `</think>`, leading whitespace dropped
    (the template's `split('</think>')[-1]`); a turn without `</think>` is kept whole."""
    after = partition_last_think_end(content)[1]
    return content if after is None else after.lstrip()


def strip_history_reasoning(messages: list[Message]) -> list[Message]:
    """Every assistant turn with a `</think>` in its text reduced to `history_answer` (new dicts; the
    given ones are not changed)."""
    out: list[Message] = []
    for message in messages:
        content = message.get("content")
        if message.get("role") == "assistant" and isinstance(content, str) and THINK_END in content:
            message = {**message, "content": history_answer(content)}
        out.append(message)
    return out


def fold_system_prompt(messages: list[Message]) -> list[Message]:
    """System turns leave the conversation; their text (joined by blank lines), a blank line, then the first
    user turn's text become that turn. With no user turn of text, the system text becomes the first turn."""
    system_texts = [m["content"] for m in messages if m.get("role") == "system"]
    if not system_texts:
        return messages
    system_text = "\n\n".join(_text_of(content) for content in system_texts)
    rest = [m for m in messages if m.get("role") != "system"]
    for i, message in enumerate(rest):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            rest[i] = {**message, "content": f"{system_text}\n\n{message['content']}"}
            return rest
    return [{"role": "user", "content": system_text}, *rest]


def _text_of(content: Any) -> str:
    """A message's text: the string itself, or the text parts of an OpenAI content list joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""
