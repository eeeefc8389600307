"""The reasoning/answer split (usage rule 5): whole outputs, every way of cutting a stream, token counts."""

from __future__ import annotations

import itertools
import random

import pytest

from r1serve.r1_rules import ReasoningSplitter, split_reasoning
from r1serve.server.reasoning import count_reasoning_tokens

OUTPUT = "Let me think. 2+2=4, so the answer is 4.\n</think>\n\nThe answer is **4**."


def stream_split(pieces: list[str], in_reasoning: bool = True) -> tuple[str, str, list[tuple[str, str]]]:
    splitter = ReasoningSplitter(in_reasoning)
    deltas = [splitter.feed(p) for p in pieces] + [splitter.flush()]
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    return reasoning, content, [(d.reasoning, d.content) for d in deltas]


def test_whole_output_splits_at_think_end() -> None:
    reasoning, content, closed = split_reasoning(OUTPUT)
    assert reasoning == "Let me think. 2+2=4, so the answer is 4.\n"
    assert content == "The answer is **4**."  # the blank line after </think> is not part of the answer
    assert closed


def test_no_think_end_means_all_reasoning() -> None:
    reasoning, content, closed = split_reasoning("still thinking about </thi")
    assert reasoning == "still thinking about </thi"  # a partial tag at the very end is released as reasoning
    assert content == ""
    assert not closed


def test_second_think_end_is_answer_text() -> None:
    reasoning, content, _ = split_reasoning("a</think>b </think> c")
    assert (reasoning, content) == ("a", "b </think> c")


@pytest.mark.parametrize("cut", range(1, len(OUTPUT)))
def test_every_two_piece_cut_gives_the_same_split(cut: int) -> None:
    reasoning, content, _ = stream_split([OUTPUT[:cut], OUTPUT[cut:]])
    whole_reasoning, whole_content, _ = split_reasoning(OUTPUT)
    assert (reasoning, content) == (whole_reasoning, whole_content)


def test_tag_split_into_single_characters_and_random_pieces() -> None:
    rng = random.Random(0)
    expected = split_reasoning(OUTPUT)[:2]
    assert stream_split(list(OUTPUT))[:2] == expected
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(OUTPUT)), rng.randint(1, 12)))
        pieces = [OUTPUT[a:b] for a, b in itertools.pairwise([0, *cuts, len(OUTPUT)])]
        assert stream_split(pieces)[:2] == expected


def test_no_delta_mixes_a_held_back_tag_into_the_answer() -> None:
    _, _, deltas = stream_split(["abc</", "thi", "nk>", "\n\nAns", "wer"])
    assert deltas[0] == ("abc", "")  # "</" is held back: it may be the start of </think>
    assert deltas[1] == ("", "")
    assert deltas[2] == ("", "")  # tag complete; the answer's leading blank line is still held back
    assert deltas[3] == ("", "Ans")
    assert deltas[4] == ("", "wer")


def test_false_tag_prefix_is_released_as_reasoning() -> None:
    reasoning, content, deltas = stream_split(["x </th", "at is not it"])
    assert reasoning == "x </that is not it" and content == ""
    assert deltas[0] == ("x ", "")


def test_without_forced_thinking_a_leading_think_tag_opens_reasoning() -> None:
    reasoning, content, _ = stream_split(["  <thi", "nk>\nhmm", "</think>\n\nok"], in_reasoning=False)
    assert (reasoning, content) == ("hmm", "ok")  # the newline after the tag goes with it
    assert split_reasoning("<think>r</think>a", in_reasoning=False)[:2] == ("r", "a")


def test_without_forced_thinking_plain_output_is_all_answer() -> None:
    assert split_reasoning("Hello there", in_reasoning=False) == (None, "Hello there", False)
    assert split_reasoning("<thinking>", in_reasoning=False)[:2] == (None, "<thinking>")
    reasoning, content, _ = stream_split(["<th", "e end"], in_reasoning=False)
    assert (reasoning, content) == ("", "<the end")


def test_reasoning_tokens_by_think_end_id() -> None:
    encode = lambda text: list(range(len(text)))  # noqa: E731 - one "token" per character
    assert count_reasoning_tokens([5, 6, 7, 99, 8, 9], True, True, "abc", 99, encode) == 3
    assert count_reasoning_tokens([5, 6, 7], True, False, "abc", 99, encode) == 3  # never closed: all tokens
    assert count_reasoning_tokens([5, 6, 7], False, False, "", 99, encode) == 0  # no reasoning at all
    # no </think> id (e.g. a tokenizer without it): the reasoning text re-encoded
    assert count_reasoning_tokens([1, 2, 3, 4, 5, 6, 7], True, True, "abcd", None, encode) == 4
