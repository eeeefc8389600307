"""Turns streamed token ids into text deltas: UTF-8 safe, with stop strings, at O(window) cost per token.

The engine produces ids one step at a time for up to hundreds of streams, and the server must send text as
soon as it is certain. Two things make that subtle. A character may be split over several byte-level
tokens, so a trailing U+FFFD (a character whose last bytes may still come) is held back. A stop string may
span tokens, so the tail that could still become a stop string is held back too (never more than the longest
stop string minus one character), and nothing at or after a stop string is ever emitted (unless
`include_stop_str_in_output`, which emits the stop string itself). Each step decodes only a small window of
recent tokens (from a prefix offset, whose text is already known, to the end), so a token costs the same at
position 10 and 30 000. A byte-level vocabulary (the model's own, and the dummy-mode stand-in: anything whose
`Tokenizer.token_bytes` is a table) skips the windows: each token's bytes go through Python's incremental UTF-8
decoder, which holds back an incomplete character by itself, at a table lookup per token instead of a window's
decode (docs/performance.md has the figures). Either way the concatenation of every delta and `finish()` equals decoding
the whole output at once.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from r1serve.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
NUM_CONTEXT_TOKENS = 5  # prompt tokens decoded before the output, for tokenizers whose text depends on them
MAX_PENDING_TOKENS = 8  # a real character spans at most 4 byte tokens; more pending means invalid bytes
_TRIM_AT = 64  # drop ids before the window once this many have piled up


class IncrementalDetokenizer:
    """Text of one output stream, emitted incrementally. Call `add_tokens` with each step's new ids and
    `finish()` once at the end of the stream; `text` is everything emitted, `stop_reason` the stop string
    that ended it (None until one is found)."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], *,
                 skip_special_tokens: bool = True, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False) -> None:
        if isinstance(stop, str):
            stop = [stop]
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stop_reason: str | None = None
        self._stop_prefixes = {s[:k] for s in self.stop for k in range(1, len(s))}
        self._max_hold = max((len(s) for s in self.stop), default=1) - 1
        self._token_bytes = tokenizer.token_bytes(skip_special_tokens)  # None: decode windows of ids
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        windows = self._token_bytes is None
        self._ids, self._prefix_text = self._prompt_context(prompt_token_ids) if windows else ([], "")
        self._prefix_offset = 0  # self._ids[prefix:read] decodes to self._prefix_text, which is final
        self._read_offset = len(self._ids)  # self._ids[read:] are tokens whose text is not yet settled
        self._num_unread_emitted = 0  # characters of the unread tokens' text already emitted
        self._held = ""  # settled text not emitted yet: it could be the start of a stop string
        self._chunks: list[str] = []
        self._finished = False

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> tuple[list[int], str]:
        """The last few prompt ids and their text; none if that text ends inside a character."""
        context = list(prompt_token_ids[-NUM_CONTEXT_TOKENS:])
        text = self._decode(context) if context else ""
        if text.endswith(REPLACEMENT_CHAR):
            return [], ""
        return context, text

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    @property
    def text(self) -> str:
        """All text emitted so far (joined on demand: O(length) per call)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def finished(self) -> bool:
        """True once a stop string was found or `finish()` was called."""
        return self._finished

    def add_tokens(self, new_token_ids: Sequence[int]) -> str:
        """Take the newly generated ids; return the text that became certain (possibly "")."""
        if self._finished:
            if self.stop_reason is not None:
                return ""  # tokens after a stop string are dropped
            raise RuntimeError("add_tokens() after finish(): the stream is over")
        if len(new_token_ids) == 0:
            return ""
        if self._token_bytes is not None:
            settled = self._utf8.decode(self._bytes_of(new_token_ids))
        else:
            self._ids.extend(new_token_ids)
            settled = self._settle(final=False)
        if not self.stop:  # nothing to hold back or search: the settled text is the delta
            return self._push(settled)
        return self._emit(settled, final=False)

    def finish(self) -> str:
        """End of the stream: return the text still held back (incomplete bytes included, as U+FFFD)."""
        if self._finished:
            return ""
        settled = self._utf8.decode(b"", final=True) if self._token_bytes is not None else self._settle(final=True)
        delta = self._emit(settled, final=True)
        self._finished = True
        return delta

    def _bytes_of(self, token_ids: Sequence[int]) -> bytes:
        """The ids' bytes joined; an id outside the table is decoded by the tokenizer itself (which refuses a
        negative id, and decodes an embedding padding row to nothing)."""
        table = self._token_bytes
        if len(token_ids) == 1 and 0 <= (token_id := token_ids[0]) < len(table):  # a decode step's one token
            return table[token_id]
        return b"".join(table[i] if 0 <= i < len(table) else self._decode([i]).encode("utf-8") for i in token_ids)

    def _settle(self, final: bool) -> str:
        """Text of the unread tokens that can no longer change. A lossy UTF-8 decode can only change its
        last character, and only when that is the U+FFFD of a character still incomplete: so all but such a
        character is certain, and the read offset moves to the end whenever the text ends cleanly."""
        window_text = self._decode(self._ids[self._prefix_offset:])
        unread = window_text[len(self._prefix_text):]  # text of self._ids[read:]
        if final or not unread.endswith(REPLACEMENT_CHAR):
            delta = unread[self._num_unread_emitted:]
            self._advance(len(self._ids), unread, num_emitted=0)
            return delta
        delta = unread[self._num_unread_emitted:-1]
        self._num_unread_emitted = max(self._num_unread_emitted, len(unread) - 1)
        if len(self._ids) - self._read_offset >= MAX_PENDING_TOKENS:
            self._reanchor(window_text)
        return delta

    def _reanchor(self, window_text: str) -> None:
        """Bytes that never complete a character keep the text ending in U+FFFD: move the read offset to the
        last token boundary that later tokens cannot change, so the window stays small. A boundary is final
        when decoding the two sides apart gives the same text as together and the right side has text (its
        first byte either completes nothing before the boundary or ends it as invalid)."""
        for end in range(len(self._ids) - 1, self._read_offset, -1):
            head = self._decode(self._ids[self._prefix_offset:end])
            tail = self._decode(self._ids[end:])
            if tail and head + tail == window_text:
                settled = head[len(self._prefix_text):]
                self._advance(end, settled, num_emitted=self._num_unread_emitted - len(settled))
                return

    def _advance(self, end: int, settled: str, num_emitted: int) -> None:
        """Ids up to `end` are settled with text `settled`; the window now starts at the old read offset."""
        self._prefix_offset, self._read_offset = self._read_offset, end
        self._prefix_text, self._num_unread_emitted = settled, num_emitted
        if self._prefix_offset >= _TRIM_AT:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    def _emit(self, settled: str, final: bool) -> str:
        """Apply stop strings to the held text plus `settled`; return what may be sent now."""
        buffer = self._held + settled
        if not buffer:
            return ""
        hit = self._find_stop(buffer)
        if hit is not None:
            start, stop = hit
            end = start + len(stop) if self.include_stop_str_in_output else start
            self.stop_reason, self._held, self._finished = stop, "", True
            return self._push(buffer[:end])
        keep = 0 if final else self._partial_stop_length(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return self._push(buffer[: len(buffer) - keep])

    def _find_stop(self, buffer: str) -> tuple[int, str] | None:
        """The stop string that completes first in `buffer` (as if the text came one character at a time)."""
        best: tuple[int, str] | None = None
        for stop in self.stop:
            start = buffer.find(stop)
            if start >= 0 and (best is None or start + len(stop) < best[0] + len(best[1])):
                best = (start, stop)
        return best

    def _partial_stop_length(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of some stop string."""
        for k in range(min(self._max_hold, len(buffer)), 0, -1):
            if buffer[-k:] in self._stop_prefixes:
                return k
        return 0

    def _push(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
        return delta
