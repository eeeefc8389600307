"""`TextBuffer` and `CompletionOutput.text`: pieces in, the same text out, and each output keeps the text it was
made with while the sample's buffer grows on."""

from __future__ import annotations

import pickle

from r1serve.outputs import CompletionOutput, RequestOutput, TextBuffer, merge_outputs


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


def _output(deltas: dict[int, tuple[str, list[int]]], buffers: dict[int, TextBuffer], finished: bool = False,
            ) -> RequestOutput:
    samples = []
    for index, (text, ids) in deltas.items():
        buffers[index].append(text)
        samples.append(CompletionOutput(index, buffers[index], [], "stop" if finished else None, None, text, ids))
    return RequestOutput("r", None, [1, 2], samples, finished)


def test_merge_outputs_keeps_the_last_state_and_every_delta_in_order() -> None:
    buffers = {0: TextBuffer(), 1: TextBuffer()}
    outputs = [_output({0: ("a", [1]), 1: ("x", [9])}, buffers), _output({0: ("b", [2])}, buffers),
               _output({0: ("c", [3]), 1: ("y", [8])}, buffers, finished=True)]
    merged = merge_outputs(outputs)
    assert merged.finished and merged.request_id == "r" and merged.prompt_token_ids == [1, 2]
    assert [(s.index, s.delta_text, s.delta_token_ids, s.text) for s in merged.outputs] == [
        (0, "abc", [1, 2, 3], "abc"), (1, "xy", [9, 8], "xy")]
    assert all(s.finish_reason == "stop" for s in merged.outputs)
    single = _output({0: ("d", [4])}, buffers)
    assert merge_outputs([single]) is single


def test_a_sample_only_in_an_earlier_output_is_kept() -> None:
    buffers = {0: TextBuffer(), 1: TextBuffer()}
    merged = merge_outputs([_output({1: ("x", [9])}, buffers), _output({0: ("a", [1])}, buffers)])
    assert [(s.index, s.delta_text, s.delta_token_ids) for s in merged.outputs] == [(0, "a", [1]), (1, "x", [9])]
