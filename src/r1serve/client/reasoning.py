"""The shared R1 reasoning split (`r1serve.r1_rules`) in the client's shapes, for servers that do not split.

r1serve (and the DeepSeek API, and vLLM with a reasoning parser) send the reasoning in its own field. Other
OpenAI-compatible servers send the raw text: reasoning, `</think>`, answer. The client cuts it by the same
rules as r1serve's server (the client cannot know whether the server forced thinking, so it assumes it, and
drops a leading `<think>` the model wrote itself); this module only turns the splitter's output into the
`StreamDelta`s the client streams, reasoning before answer, never mixed in one delta.
"""

from __future__ import annotations

from r1serve import r1_rules
from r1serve.client.types import StreamDelta


def _deltas(part: r1_rules.SplitDelta) -> list[StreamDelta]:
    pieces = [StreamDelta("reasoning", part.reasoning), StreamDelta("answer", part.content)]
    return [piece for piece in pieces if piece.text]


class ReasoningSplitter:
    """Feed raw generated text chunk by chunk; get `StreamDelta`s of kind "reasoning" then "answer".
    Everything up to the first `</think>` is reasoning (all of it, if the tag never comes); call `finish()`
    at the end of the stream for the text held back."""

    def __init__(self) -> None:
        self._splitter = r1_rules.ReasoningSplitter(in_reasoning=True)

    @property
    def in_answer(self) -> bool:
        return self._splitter.in_answer

    def feed(self, text: str) -> list[StreamDelta]:
        return _deltas(self._splitter.feed(text))

    def finish(self) -> list[StreamDelta]:
        return _deltas(self._splitter.flush())


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a whole R1 output, by the same rules as the streaming splitter."""
    reasoning, answer, _ = r1_rules.split_reasoning(text, in_reasoning=True)
    return reasoning or "", answer
