"""The shared R1 rules, one table of (input, expected) rows per rule: the split of a whole output, the split of
a stream cut anywhere, what an earlier assistant turn keeps, the system-prompt fold; and the promise that
client and server agree because they run the same rules without torch."""

from __future__ import annotations

import itertools
import subprocess
import sys
from typing import Any

import pytest

from r1serve import r1_rules
from r1serve.client import split_reasoning as client_split_reasoning
from r1serve.client.protocol import prepare_messages
from r1serve.r1_rules import (
    ReasoningSplit,
    ReasoningSplitter,
    fold_system_prompt,
    history_answer,
    split_reasoning,
    strip_history_reasoning,
)
from r1serve.server.policy import PolicyConfig, PolicyRecord, apply_message_rules

# (output, in_reasoning, expected split)
SPLIT_ROWS: list[tuple[str, bool, ReasoningSplit]] = [
    ("r\n</think>\n\nanswer", True, ReasoningSplit("r\n", "answer", True)),  # forced thinking: no <think>
    ("<think>\nr</think>a", True, ReasoningSplit("r", "a", True)),  # a model that writes its own tag
    ("  <think>r</think>a", True, ReasoningSplit("r", "a", True)),
    ("still thinking", True, ReasoningSplit("still thinking", "", False)),  # no </think> at all
    ("cut off at </thi", True, ReasoningSplit("cut off at </thi", "", False)),
    ("a</think>b</think>c", True, ReasoningSplit("a", "b</think>c", True)),  # the first </think> ends it
    ("r</think> \n\t\n a b ", True, ReasoningSplit("r", "a b ", True)),  # whitespace after </think> dropped
    ("r</think>\n\n", True, ReasoningSplit("r", "", True)),
    ("</think>\n\nonly the answer", True, ReasoningSplit("", "only the answer", True)),
    ("\n  leading space kept", True, ReasoningSplit("\n  leading space kept", "", False)),
    ("<think>", True, ReasoningSplit("", "", False)),
    ("", True, ReasoningSplit("", "", False)),
    ("Hello", False, ReasoningSplit(None, "Hello", False)),  # not forced, no tag: all answer
    ("  Hello", False, ReasoningSplit(None, "Hello", False)),
    ("<thinking>", False, ReasoningSplit(None, "<thinking>", False)),
    ("<think>\nr</think>\n\na", False, ReasoningSplit("r", "a", True)),
    ("<think>r", False, ReasoningSplit("r", "", False)),
]


@pytest.mark.parametrize("text,in_reasoning,expected", SPLIT_ROWS)
def test_whole_output_split(text: str, in_reasoning: bool, expected: ReasoningSplit) -> None:
    assert split_reasoning(text, in_reasoning) == expected


def _stream(pieces: list[str], in_reasoning: bool) -> tuple[str | None, str, bool, list[r1_rules.SplitDelta]]:
    splitter = ReasoningSplitter(in_reasoning)
    deltas = [splitter.feed(piece) for piece in pieces] + [splitter.flush()]
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    return (reasoning if splitter.has_reasoning else None), content, splitter.closed, deltas


@pytest.mark.parametrize("text,in_reasoning,expected", SPLIT_ROWS)
def test_every_three_piece_cut_of_a_stream_gives_the_whole_split(text: str, in_reasoning: bool,
                                                                  expected: ReasoningSplit) -> None:
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        assert _stream([text[:i], text[i:j], text[j:]], in_reasoning)[:3] == tuple(expected), (i, j)


# (stream pieces, in_reasoning, expected (reasoning, content) of each feed and the final flush)
STREAM_ROWS: list[tuple[list[str], bool, list[tuple[str, str]]]] = [
    (["abc</", "thi", "nk>", "\n\nAns", "wer"], True,  # the tag cut across chunks is held back, never mixed
     [("abc", ""), ("", ""), ("", ""), ("", "Ans"), ("", "wer"), ("", "")]),
    (["x </th", "at is not it"], True, [("x ", ""), ("</that is not it", ""), ("", "")]),  # a false prefix
    (["<thi", "nk>\nr", "</think>a"], True, [("", ""), ("r", ""), ("", "a"), ("", "")]),
    (["\n", "\n", "r"], True, [("", ""), ("", ""), ("\n\nr", ""), ("", "")]),  # could still become <think>
    (["r</think>", "\n\n", " a"], True, [("r", ""), ("", ""), ("", "a"), ("", "")]),
    (["thinking </thi"], True, [("thinking ", ""), ("</thi", "")]),  # the held tail flushed as reasoning
    (["  <thi", "nk>\nhmm", "</think>\n\nok"], False, [("", ""), ("hmm", ""), ("", "ok"), ("", "")]),
    (["<th", "e end"], False, [("", ""), ("", "<the end"), ("", "")]),
]


@pytest.mark.parametrize("pieces,in_reasoning,expected", STREAM_ROWS)
def test_stream_deltas(pieces: list[str], in_reasoning: bool, expected: list[tuple[str, str]]) -> None:
    deltas = _stream(pieces, in_reasoning)[3]
    assert [(d.reasoning, d.content) for d in deltas] == expected


# (an earlier assistant turn's content, what it keeps): the chat template's `split('</think>')[-1]`
HISTORY_ROWS: list[tuple[str, str]] = [
    ("<think>\nold\n</think>\n\nA1", "A1"),
    ("a</think>b</think>c", "c"),  # the last </think>, as the template cuts
    ("a</think>b</think>\n\n c", "c"),
    ("no tag at all", "no tag at all"),
    ("  kept whole, spaces too ", "  kept whole, spaces too "),
    ("reasoning</think>", ""),
]


@pytest.mark.parametrize("content,expected", HISTORY_ROWS)
def test_history_answer(content: str, expected: str) -> None:
    assert history_answer(content) == expected


@pytest.mark.parametrize("content,expected", HISTORY_ROWS)
def test_client_and_server_strip_history_alike(content: str, expected: str) -> None:
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": content},
                {"role": "user", "content": "Q2"}]
    server = apply_message_rules(messages, PolicyConfig(), PolicyRecord())
    client = prepare_messages(messages, fold=True)
    assert server[1]["content"] == client[1]["content"] == expected
    assert messages[1]["content"] == content  # the caller's messages are not changed


def test_strip_history_reasoning_leaves_other_turns() -> None:
    messages = [{"role": "user", "content": "a</think>b"}, {"role": "assistant", "content": None},
                {"role": "assistant", "content": [{"type": "text", "text": "x</think>y"}]}]
    assert strip_history_reasoning(messages) == messages


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


# (messages, folded)
FOLD_ROWS: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = [
    ([{"role": "system", "content": "S"}, _user("U")], [_user("S\n\nU")]),
    ([{"role": "system", "content": "S1"}, {"role": "system", "content": "S2"}, _user("U")], [_user("S1\n\nS2\n\nU")]),
    ([_user("U1"), {"role": "system", "content": "S"}, _user("U2")], [_user("S\n\nU1"), _user("U2")]),
    ([{"role": "system", "content": "S"}], [_user("S")]),
    ([{"role": "system", "content": [{"type": "text", "text": "S"}]}, _user("U")], [_user("S\n\nU")]),
    ([_user("U")], [_user("U")]),
]


@pytest.mark.parametrize("messages,expected", FOLD_ROWS)
def test_fold_system_prompt(messages: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert fold_system_prompt(messages) == expected
    assert prepare_messages(messages, fold=True) == expected


def test_the_client_split_is_the_shared_split() -> None:
    for text, in_reasoning, expected in SPLIT_ROWS:
        if in_reasoning:
            assert client_split_reasoning(text) == (expected.reasoning, expected.content)


def test_tags_and_texts() -> None:
    assert (r1_rules.THINK_START, r1_rules.THINK_END) == ("<think>", "</think>")
    assert r1_rules.THINKING_PREFIX == "<think>\n"
    assert r1_rules.BUDGET_CLOSE == "\n</think>\n\n"


def test_the_rules_and_the_client_never_import_torch() -> None:
    code = ("import sys, r1serve.r1_rules, r1serve.client, r1serve.client.chat_cli, r1serve.client.check; "
            "bad = [m for m in ('torch', 'r1serve.engine', 'r1serve.model', 'r1serve.server') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
