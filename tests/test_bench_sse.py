"""The bench's SSE parser and stream reader: byte chunks split anywhere, CRLF, keep-alives, [DONE], reasoning."""

from __future__ import annotations

import json

import pytest

from r1serve.bench.sse import SSEParser
from r1serve.bench.stream import StreamError, StreamState


def _feed_all(parts: list[bytes]) -> tuple[list[str], SSEParser]:
    parser = SSEParser()
    events = []
    for part in parts:
        events += parser.feed(part)
    events += parser.close()
    return [e.data for e in events], parser


BODY = (
    ": ping\r\n\r\n"
    'data: {"text": "héllo 世界"}\r\n\r\n'
    ": keep-alive\n"
    'data: {"text": "two"}\n\n'
    "event: message\rdata: line1\rdata: line2\r\r"
    "data:no-space\n\n"
    "data: [DONE]\n\n"
).encode()
EXPECTED = ['{"text": "héllo 世界"}', '{"text": "two"}', "line1\nline2", "no-space", "[DONE]"]


def test_whole_body_in_one_chunk() -> None:
    data, parser = _feed_all([BODY])
    assert data == EXPECTED
    assert parser.num_comments == 2


@pytest.mark.parametrize("cut", range(1, len(BODY)))
def test_split_at_every_byte(cut: int) -> None:
    """Every cut point, including inside \\r\\n and inside multi-byte UTF-8 characters."""
    data, parser = _feed_all([BODY[:cut], BODY[cut:]])
    assert data == EXPECTED
    assert parser.num_comments == 2


def test_one_byte_at_a_time() -> None:
    data, _ = _feed_all([BODY[i:i + 1] for i in range(len(BODY))])
    assert data == EXPECTED


def test_events_are_returned_as_soon_as_complete() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert [e.data for e in parser.feed(b"\ndata: b")] == ["a"]
    assert parser.feed(b"\n") == []
    assert [e.data for e in parser.feed(b"\n")] == ["b"]


def test_cr_then_lf_in_next_chunk_is_one_line_end() -> None:
    parser = SSEParser()
    events = parser.feed(b"data: x\r") + parser.feed(b"\n\r") + parser.feed(b"\ndata: y\r\n\r\n")
    assert [e.data for e in events] == ["x", "y"]


def test_done_marker_and_unterminated_last_event() -> None:
    parser = SSEParser()
    events = parser.feed(b"data: [DONE]\n\ndata: tail")
    assert events[0].is_done
    assert [e.data for e in parser.close()] == ["tail"]


def _chat(delta: dict, **extra: object) -> str:
    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": None}], **extra})


def test_stream_state_split_reasoning_server() -> None:
    """r1serve style: reasoning_content first, then content; TTFA is the first non-blank content chunk."""
    state = StreamState()
    state.on_data(_chat({"role": "assistant", "content": ""}), 0.05)  # role-only: not a token
    state.on_data(_chat({"reasoning_content": "Let me"}), 0.10)
    state.on_data(_chat({"reasoning_content": " think."}), 0.12)
    state.on_data(_chat({"content": "\n\n"}), 0.15)
    state.on_data(_chat({"content": "42"}), 0.17)
    state.on_data(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}), 0.18)
    usage = {"prompt_tokens": 7, "completion_tokens": 5, "completion_tokens_details": {"reasoning_tokens": 2}}
    state.on_data(json.dumps({"choices": [], "usage": usage}), 0.19)
    assert state.chunk_times == [0.10, 0.12, 0.15, 0.17]
    assert state.first_token_time == 0.10
    assert state.first_answer_time == 0.17
    assert state.finish_reason == "stop"
    assert state.usage_tokens() == (7, 5) and state.reasoning_tokens() == 2
    assert state.output_text == "Let me think.\n\n42"


def test_stream_state_role_with_first_text_and_both_reasoning_names() -> None:
    """r1serve and vLLM now send the role with the first text, and the reasoning under both names: the first
    chunk is timed and the reasoning counted once."""
    state = StreamState()
    state.on_data(_chat({"role": "assistant", "reasoning_content": "Hm", "reasoning": "Hm"}), 0.30)
    state.on_data(_chat({"reasoning_content": ".", "reasoning": "."}), 0.32)
    state.on_data(_chat({"content": "ok"}), 0.35)
    assert state.first_token_time == 0.30 and state.reasoning_text == "Hm." and state.first_answer_time == 0.35


def test_stream_state_completions_times_the_first_chunk_with_text() -> None:
    state = StreamState()
    for text, t in (("", 0.01), ("a", 0.20), ("", 0.21), ("b", 0.25)):
        state.on_data(json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": None}]}), t)
    assert state.chunk_times == [0.20, 0.25] and state.first_token_time == 0.20


def test_stream_state_think_tag_in_text_split_across_chunks() -> None:
    """Other servers: everything in text with a literal </think>, here split over two chunks."""
    state = StreamState()
    for t, text in [(0.1, "hmm"), (0.2, " ok</"), (0.3, "think>"), (0.4, "\n\n"), (0.5, "The answer")]:
        state.on_data(json.dumps({"choices": [{"index": 0, "text": text}]}), t)
    assert state.first_token_time == 0.1
    assert state.first_answer_time == 0.5
    assert state.usage_tokens() == (None, None) and state.reasoning_tokens() is None


def test_stream_state_answer_in_the_chunk_that_closes_thinking() -> None:
    state = StreamState()
    state.on_data(_chat({"content": "x</think>Yes"}), 0.3)
    assert state.first_answer_time == 0.3


def test_stream_state_no_think_end_means_no_answer() -> None:
    state = StreamState()
    state.on_data(json.dumps({"choices": [{"index": 0, "text": "still thinking"}]}), 0.1)
    assert state.first_answer_time is None


@pytest.mark.parametrize("payload, kind", [
    ('{"error": {"message": "boom", "type": "server_error"}}', "stream_error"),
    ("not json", "bad_chunk"),
    ("[1, 2]", "bad_chunk"),
])
def test_stream_state_errors(payload: str, kind: str) -> None:
    with pytest.raises(StreamError) as info:
        StreamState().on_data(payload, 0.1)
    assert info.value.error_type == kind
