"""IncrementalDetokenizer: UTF-8 safe streaming, stop strings across tokens, bounded work per token; each test on
the real tokenizer and the fallback, through their token bytes and through windows of decoded ids."""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence

import pytest

from conftest import TOKENIZER_DIR
from r1serve.engine.detokenizer import IncrementalDetokenizer
from r1serve.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

CHINESE = "深度求索发布了推理模型，它在数学竞赛题上表现出色。今天天气很好！罕见字：𓀀𠀀龘 😀"
ANSWER = "The answer is 42.\n\nFinal Answer: yes"


@pytest.fixture(scope="module")
def real() -> Tokenizer:
    if not (TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip(f"no real tokenizer at {TOKENIZER_DIR}")
    return load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def fallback() -> ByteTokenizer:
    return ByteTokenizer()


def windowed(tok: Tokenizer) -> Tokenizer:
    """The same tokenizer without its token bytes: the detokenizer decodes windows of ids instead."""
    windows = copy.copy(tok)
    windows.token_bytes = lambda skip_special_tokens=True: None
    return windows


@pytest.fixture(params=["real", "fallback", "real-windows", "fallback-windows"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    name, _, windows = request.param.partition("-")
    tokenizer = request.getfixturevalue(name)
    return windowed(tokenizer) if windows else tokenizer


def stream(detok: IncrementalDetokenizer, ids: Sequence[int], chunk_sizes: Sequence[int] = (1,)) -> list[str]:
    """Feed `ids` in chunks (sizes cycling through `chunk_sizes`); every delta, then finish()."""
    deltas, i, k = [], 0, 0
    while i < len(ids):
        size = chunk_sizes[k % len(chunk_sizes)]
        deltas.append(detok.add_tokens(ids[i:i + size]))
        i, k = i + size, k + 1
    deltas.append(detok.finish())
    return deltas


def prompt_of(tok: Tokenizer) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": "你好"}])


# --- UTF-8 ----------------------------------------------------------------------------------------------


def test_chinese_streams_byte_exact(tok: Tokenizer) -> None:
    ids = tok.encode(CHINESE)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some characters really are split over tokens
    detok = IncrementalDetokenizer(tok, prompt_of(tok))
    deltas = stream(detok, ids)
    assert "".join(deltas) == detok.text == CHINESE
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""  # nothing was left to flush: every character was emitted once complete


def test_incomplete_character_is_held_then_flushed_at_finish(tok: Tokenizer) -> None:
    ids = tok.encode("ab𓀀")  # 𓀀 is 4 bytes over several tokens
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add_tokens(ids[:-1]) == "ab"  # the first bytes of 𓀀 are held back
    assert detok.finish() == "\ufffd"  # the stream ended inside the character
    assert detok.text == tok.decode(ids[:-1]) == "ab\ufffd"


def test_text_before_an_incomplete_character_is_not_held(tok: Tokenizer) -> None:
    ids = tok.encode("中") + tok.encode("x") + tok.encode("中")
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.add_tokens([i]) for i in ids]
    assert "".join(deltas) == "中x中" and all("\ufffd" not in d for d in deltas)
    assert deltas[len(tok.encode("中"))] == "x"  # emitted with its own token, not with the next character


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_streams_equal_decoding_at_once(tok: Tokenizer, skip_special_tokens: bool) -> None:
    rng = random.Random(1234 + skip_special_tokens)
    vocab = 151665 if not tok.is_fallback else 151936
    for _ in range(12):
        n = rng.randint(1, 600)
        ids = [rng.choice((rng.randrange(vocab), rng.randrange(256), rng.randrange(151643, 151665)))
               for _ in range(n)]
        detok = IncrementalDetokenizer(tok, prompt_of(tok), skip_special_tokens=skip_special_tokens)
        deltas = stream(detok, ids, chunk_sizes=[rng.randint(1, 4) for _ in range(5)])
        assert "".join(deltas) == detok.text == tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_text_streams_equal_decoding_at_once(tok: Tokenizer) -> None:
    reasoning = "<think>\nLet me think: $x^2 + y^2 = z^2$.</think>\n\n"
    text = (CHINESE + reasoning + ANSWER + "<｜end▁of▁sentence｜>") * 3
    ids = tok.encode(text)
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, prompt_of(tok), skip_special_tokens=skip)
        assert "".join(stream(detok, ids, chunk_sizes=(1, 2, 5))) == tok.decode(ids, skip_special_tokens=skip)


def test_skip_special_tokens(real: Tokenizer) -> None:
    ids = real.encode("<think>\nhmm</think>ok<｜end▁of▁sentence｜>")
    kept = IncrementalDetokenizer(real, [], skip_special_tokens=False)
    skipped = IncrementalDetokenizer(real, [])
    assert "".join(stream(kept, ids)) == "<think>\nhmm</think>ok<｜end▁of▁sentence｜>"
    assert "".join(stream(skipped, ids)) == "<think>\nhmm</think>ok"  # <think> is not a special token


def test_prompt_context_does_not_leak(tok: Tokenizer) -> None:
    prompt = prompt_of(tok)
    ids = tok.encode("Hello 世界")
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=False)
    assert "".join(stream(detok, ids)) == "Hello 世界"
    # a prompt that ends inside a character does not glue its bytes to the output
    split = tok.encode("𓀀")
    prompt, output = split[:1], split[1:] + tok.encode(" ok")
    assert tok.decode(prompt) == "\ufffd" and tok.decode(prompt + output) == "𓀀 ok"
    cut = IncrementalDetokenizer(tok, prompt)
    assert "".join(stream(cut, output)) == tok.decode(output) == "\ufffd" * (len(split) - 1) + " ok"


# --- stop strings ---------------------------------------------------------------------------------------


def test_stop_string_split_across_tokens(tok: Tokenizer) -> None:
    ids = tok.encode(ANSWER)
    assert not any("\n\nFinal" in tok.decode([i]) for i in ids)  # no single token holds the stop string
    detok = IncrementalDetokenizer(tok, prompt_of(tok), stop=["\n\nFinal"])
    deltas = stream(detok, ids)
    assert "".join(deltas) == detok.text == "The answer is 42."
    assert detok.stop_reason == "\n\nFinal" and detok.finished
    assert detok.add_tokens(tok.encode(" more")) == ""  # nothing after a stop is ever emitted
    assert detok.text == "The answer is 42."


def test_include_stop_str_in_output(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["Answer:", "42."], include_stop_str_in_output=True)
    assert "".join(stream(detok, tok.encode(ANSWER))) == "The answer is 42."
    assert detok.stop_reason == "42."


def test_stop_that_completes_first_wins(fallback: ByteTokenizer) -> None:
    detok = IncrementalDetokenizer(fallback, [], stop=["xyz", "y"])
    assert "".join(stream(detok, fallback.encode("axyz"), chunk_sizes=(4,))) == "ax"
    assert detok.stop_reason == "y"


def test_chinese_stop_string_in_byte_tokens(fallback: ByteTokenizer) -> None:
    detok = IncrementalDetokenizer(fallback, [], stop=["答案"])
    deltas = stream(detok, fallback.encode("推理完毕，答案是 4"))
    assert "".join(deltas) == "推理完毕，" and detok.stop_reason == "答案"
    assert not any("\ufffd" in d for d in deltas)


def test_hold_back_is_only_what_a_stop_could_complete(fallback: ByteTokenizer) -> None:
    stops = ["STOP!", "<end>", "ab"]
    text = "Stop STOP this <en d> STO a <e b STOP <end"
    detok = IncrementalDetokenizer(fallback, [], stop=stops)
    prefixes = {s[:k] for s in stops for k in range(1, len(s))}
    for i, token_id in enumerate(fallback.encode(text)):  # ASCII: one token per character
        detok.add_tokens([token_id])
        seen = text[: i + 1]
        held = len(seen) - len(detok.text)
        assert seen.startswith(detok.text)
        assert held <= max(map(len, stops)) - 1
        longest = max((k for k in range(1, len(seen) + 1) if seen[-k:] in prefixes), default=0)
        assert held == longest
    assert detok.finish() == "<end" and detok.stop_reason is None and detok.text == text


def test_no_stop_means_no_hold_back(real: Tokenizer) -> None:
    detok = IncrementalDetokenizer(real, [])
    ids = real.encode(ANSWER)
    assert [detok.add_tokens([i]) for i in ids] == [real.decode([i]) for i in ids]


def test_stop_found_in_text_flushed_at_finish(fallback: ByteTokenizer) -> None:
    ids = fallback.encode("a") + [0xE4]  # an incomplete character, then the stream ends
    detok = IncrementalDetokenizer(fallback, [], stop=["\ufffd"])
    assert "".join(stream(detok, ids)) == "a" and detok.stop_reason == "\ufffd"


# --- misuse and cost ------------------------------------------------------------------------------------


def test_bad_use_is_an_error(fallback: ByteTokenizer) -> None:
    with pytest.raises(ValueError, match="stop strings"):
        IncrementalDetokenizer(fallback, [], stop=[""])
    detok = IncrementalDetokenizer(fallback, [])
    detok.finish()
    assert detok.finish() == ""
    with pytest.raises(RuntimeError, match="after finish"):
        detok.add_tokens([65])


class _CountingTokenizer(ByteTokenizer):
    """Records how many ids each decode call is given; the windows path unless `token_bytes` is kept."""

    def __init__(self, keep_token_bytes: bool = False) -> None:
        super().__init__()
        self.window_sizes: list[int] = []
        if not keep_token_bytes:
            self.token_bytes = lambda skip_special_tokens=True: None

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.window_sizes.append(len(token_ids))
        return super().decode(token_ids, skip_special_tokens)


def test_work_per_token_does_not_grow_with_the_output() -> None:
    tok = _CountingTokenizer()
    rng = random.Random(7)
    ids = [rng.randrange(tok.vocab_size) for _ in range(20_000)]
    detok = IncrementalDetokenizer(tok, prompt_of(tok), stop=["</think>"])
    deltas = stream(detok, ids)
    assert "".join(deltas) == ByteTokenizer().decode(ids)
    assert max(tok.window_sizes) <= 20  # a window of a few tokens, at token 10 as at token 20 000
    assert len(tok.window_sizes) < 3 * len(ids)


def test_invalid_bytes_stream_exactly_in_a_small_window() -> None:
    tok = _CountingTokenizer()
    rng = random.Random(11)
    for _ in range(20):
        ids = [rng.randrange(128, 256) for _ in range(400)]  # continuation and lead bytes, mostly invalid
        detok = IncrementalDetokenizer(tok, [])
        deltas = stream(detok, ids, chunk_sizes=(1, 1, 3))
        assert "".join(deltas) == ByteTokenizer().decode(ids)
    assert max(tok.window_sizes) <= 20


def test_token_bytes_decode_no_windows_and_refuse_bad_ids() -> None:
    """The bytes path: no decode call per token, the same text as decoding at once (stop strings and padding
    rows past the vocabulary included), and an id outside the vocabulary refused as `decode` refuses it."""
    tok = _CountingTokenizer(keep_token_bytes=True)
    rng = random.Random(5)
    ids = [rng.randrange(tok.vocab_size) for _ in range(5_000)]
    detok = IncrementalDetokenizer(tok, prompt_of(tok), stop=["</think>"])
    assert "".join(stream(detok, ids, chunk_sizes=(1, 2))) == ByteTokenizer().decode(ids)[:len(detok.text)]
    assert tok.window_sizes == []
    with pytest.raises(ValueError, match="outside the vocabulary"):
        IncrementalDetokenizer(tok, []).add_tokens([tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        IncrementalDetokenizer(tok, []).add_tokens([-1])


def test_the_real_tokenizers_padding_rows_decode_to_nothing(real: Tokenizer) -> None:
    """Ids past tokenizer.json's entries (the embedding's padding rows, up to 151,936) add no text."""
    detok = IncrementalDetokenizer(real, [])
    assert detok.add_tokens([real.vocab_size + 5]) == "" and detok.add_tokens(real.encode("ok")) == "ok"
