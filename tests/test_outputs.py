"""`TextBuffer` and `CompletionOutput.text`: pieces in, the same text out, and each output keeps the text it was
made with while the sample's buffer grows on."""

from __future__ import annotations

import pickle

from r1serve.outputs import CompletionOutput, TextBuffer


def test_text_buffer_joins_pieces_in_order() -> None:
    buffer = TextBuffer("ab")
    for piece in ["c", "", "déf", "中文"]:
        buffer.append(piece)
    assert str(buffer) == "abcdéf中文" and buffer.length == len("abcdéf中文")
    assert buffer.prefix(3) == "abc" and buffer.prefix(0) == "" and buffer.prefix(100) == "abcdéf中文"
    buffer.append("!")  # reading joined the pieces; appending still works after it
    assert str(buffer) == "abcdéf中文!"
    assert str(TextBuffer()) == "" and TextBuffer().length == 0


def test_output_text_is_a_snapshot_of_a_growing_buffer() -> None:
    buffer = TextBuffer()
    outputs = []
    for piece in ["Let ", "me ", "think."]:
        buffer.append(piece)
        outputs.append(CompletionOutput(0, buffer, delta_text=piece))
    buffer.append(" More.")
    assert [o.text for o in outputs] == ["Let ", "Let me ", "Let me think."]
    assert "".join(o.delta_text for o in outputs) == outputs[-1].text


def test_output_from_plain_text_and_defaults() -> None:
    out = CompletionOutput(2, "hi", [5, 6], "stop", "</s>")
    assert (out.index, out.text, out.token_ids, out.finished, out.stop_reason) == (2, "hi", [5, 6], True, "</s>")
    empty = CompletionOutput(0)
    assert (empty.text, empty.token_ids, empty.delta_token_ids, empty.finished) == ("", [], [], False)
    assert empty.token_ids is not CompletionOutput(0).token_ids  # no shared default list
    copy = pickle.loads(pickle.dumps(CompletionOutput(1, TextBuffer("abc"), [1], "length")))
    assert (copy.text, copy.token_ids, copy.finish_reason) == ("abc", [1], "length")
    assert "text='hi'" in repr(out)
