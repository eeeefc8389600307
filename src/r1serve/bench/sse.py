"""An incremental parser for Server-Sent Events, fed raw byte chunks as they arrive from the socket.

The benchmark times every chunk of a stream, so it reads the HTTP body itself rather than through a client
library that hides when bytes arrived. Network chunks split anywhere: in the middle of a line, between the
`\\r` and `\\n` of a line ending, or inside a multi-byte UTF-8 character. This parser buffers exactly what it
must and returns each complete event as soon as its terminating blank line is seen, following the WHATWG
rules: lines end with `\\r\\n`, `\\n` or `\\r`; lines starting with `:` are comments (keep-alives such as
`: ping`), counted but not returned; `data` lines of one event are joined with `\\n`; one space after the
colon is dropped.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

DONE = "[DONE]"


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched event: its `data` (data lines joined by newlines), its `event` and `id` if set."""

    data: str
    event: str | None = None
    id: str | None = None

    @property
    def is_done(self) -> bool:
        """True for the OpenAI end-of-stream marker `data: [DONE]`."""
        return self.data.strip() == DONE


class SSEParser:
    """Feed byte chunks to `feed()`, which returns the events each completes; call `close()` at the end."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._data_lines: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self.num_comments = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse one chunk of the body; returns the events it completed (possibly none)."""
        self._buffer += self._decoder.decode(chunk)
        return self._drain(final=False)

    def close(self) -> list[SSEEvent]:
        """End of body: parse what is left; an event lacking only its closing blank line is still returned."""
        self._buffer += self._decoder.decode(b"", final=True)
        events = self._drain(final=True)
        if self._buffer:
            self._process_line(self._buffer, events)
            self._buffer = ""
        if self._data_lines:
            events.append(self._dispatch())
        return events

    def _drain(self, final: bool) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        buffer = self._buffer
        if "\r" not in buffer:  # the common case (`\n` endings): split at once
            *lines, self._buffer = buffer.split("\n")
            for line in lines:
                self._process_line(line, events)
            return events
        start = 0
        while True:
            cut = _next_line_end(buffer, start)
            if cut < 0:
                break
            end, after = cut, cut + 1
            if buffer[end] == "\r":
                if end + 1 == len(buffer) and not final:
                    break  # a lone \r at the end may be the first half of \r\n: wait for the next chunk
                if end + 1 < len(buffer) and buffer[end + 1] == "\n":
                    after = end + 2
            self._process_line(buffer[start:end], events)
            start = after
        self._buffer = buffer[start:]
        return events

    def _process_line(self, line: str, events: list[SSEEvent]) -> None:
        if line == "":
            if self._data_lines:
                events.append(self._dispatch())
            else:
                self._event = None
            return
        if line.startswith(":"):
            self.num_comments += 1
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data_lines.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        # `retry` and unknown fields are ignored, as the standard says

    def _dispatch(self) -> SSEEvent:
        event = SSEEvent(data="\n".join(self._data_lines), event=self._event, id=self._id)
        self._data_lines = []
        self._event = None
        return event


def _next_line_end(text: str, start: int) -> int:
    """Index of the first `\\r` or `\\n` at or after `start`, or -1."""
    cr = text.find("\r", start)
    lf = text.find("\n", start)
    if cr < 0:
        return lf
    if lf < 0:
        return cr
    return min(cr, lf)
