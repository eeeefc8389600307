"""Tokenizer, chat template, byte-level fallback and math prompts (issue 3)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import TOKENIZER_DIR
from r1serve.prompts import MATH_PROMPT_EN, MATH_PROMPT_ZH, math_prompt
from r1serve.tokenizer import (
    R1_ADDED_TOKENS,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    fallback_char,
    load_tokenizer,
)

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
ONE_PLUS_ONE_IDS = [151646, 151644, 3838, 374, 220, 16, 10, 16, 30, 151645, 151648, 198]

HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "Let me add.\n</think>\n\nThe answer is 4."},
    {"role": "user", "content": "And 3+3?"},
]
HISTORY_TEXT = (BOS + "You are terse." + USER + "What is 2+2?" + ASSISTANT + "\n\nThe answer is 4." + EOS
                + USER + "And 3+3?" + ASSISTANT + "<think>\n")

needs_real = pytest.mark.skipif(not (TOKENIZER_DIR / "tokenizer.json").exists(),
                                reason=f"no real tokenizer at {TOKENIZER_DIR}")


@pytest.fixture(scope="module")
def real() -> Tokenizer:
    if not (TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip(f"no real tokenizer at {TOKENIZER_DIR}")
    return load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def special_tokens() -> dict:
    path = TOKENIZER_DIR / "special_tokens.json"
    if not path.exists():
        pytest.skip(f"no {path}")
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def fallback() -> ByteTokenizer:
    return ByteTokenizer()


def _tokenizer_folder(tmp_path: Path, config_name: str | None, drop_template: bool = False) -> Path:
    """A folder with the real tokenizer.json and, if given, one of the shared tokenizer configs."""
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").symlink_to(TOKENIZER_DIR / "tokenizer.json")
    if config_name:
        config = json.loads((TOKENIZER_DIR / config_name).read_text(encoding="utf-8"))
        if drop_template:
            del config["chat_template"]
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


# --- the real tokenizer ---------------------------------------------------------------------------------


def test_real_ids_and_properties(real: Tokenizer, special_tokens: dict) -> None:
    assert isinstance(real, HFTokenizer) and not real.is_fallback
    assert real.eos_token_id == special_tokens["eos_token"]["id"] == 151643
    assert real.bos_token_id == special_tokens["bos_token"]["id"] == 151646
    assert (real.think_start_id, real.think_end_id) == (151648, 151649)
    assert real.vocab_size == special_tokens["tokenizer_size"]
    assert real.all_special_ids == {i for i, _, special in special_tokens["added_tokens"] if special}
    assert real.name == TOKENIZER_DIR.resolve().name


def test_reference_encodings(real: Tokenizer, special_tokens: dict) -> None:
    for text, ids in special_tokens["reference_encodings"].items():
        assert real.encode(text) == ids
        assert real.decode(ids, skip_special_tokens=False) == text
    assert real.encode("Hello", add_special_tokens=True)[0] == 151646


def test_encoding_lets_other_threads_run(real: Tokenizer) -> None:
    """A server tokenizes prompts on worker threads: while one encodes, the event loop's thread must keep
    running. With the GIL held for the whole encode, this thread would stall for an encode's length."""
    import threading
    import time

    text = "The quick brown fox jumps over the lazy dog, 12345 times. " * 3000  # ~40k tokens
    start = time.perf_counter()
    real.encode(text)
    one_encode = time.perf_counter() - start
    stop = threading.Event()

    def encode_until_stopped() -> None:
        while not stop.is_set():
            real.encode(text)

    worker = threading.Thread(target=encode_until_stopped, daemon=True)
    worker.start()
    longest, last, end = 0.0, time.perf_counter(), time.perf_counter() + 6 * one_encode
    while (now := time.perf_counter()) < end:
        longest, last = max(longest, now - last), now
        sum(range(100))
    stop.set()
    worker.join()
    assert longest < one_encode / 2, (f"this thread stalled {longest * 1e3:.1f} ms; "
                                      f"one encode takes {one_encode * 1e3:.1f}")


def test_chat_template_gives_reference_ids(real: Tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 1+1?"}]
    assert real.apply_chat_template(messages) == BOS + USER + "What is 1+1?" + ASSISTANT + "<think>\n"
    assert real.encode_chat(messages) == ONE_PLUS_ONE_IDS
    ids = real.encode_chat([{"role": "user", "content": "Hello, world!"}], force_thinking=False)
    assert ids == [151646, 151644, 9707, 11, 1879, 0, 151645]


def test_no_double_bos(real: Tokenizer, fallback: ByteTokenizer) -> None:
    for tok in (real, fallback):
        ids = tok.encode_chat(HISTORY)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_system_and_history_render_as_the_template(real: Tokenizer) -> None:
    assert real.apply_chat_template(HISTORY) == HISTORY_TEXT
    without_prompt = real.apply_chat_template(HISTORY, add_generation_prompt=False)
    assert without_prompt == HISTORY_TEXT[: -len(ASSISTANT + "<think>\n")]


def test_force_thinking_off_removes_the_think_prefix(real: Tokenizer) -> None:
    text = real.apply_chat_template(HISTORY, force_thinking=False)
    assert text == HISTORY_TEXT[: -len("<think>\n")] and text.endswith(ASSISTANT)


@needs_real
def test_old_template_gets_forced_thinking(tmp_path: Path) -> None:
    old = load_tokenizer(_tokenizer_folder(tmp_path, "tokenizer_config.2025-01-22.json"))
    messages = [{"role": "user", "content": "What is 1+1?"}]
    assert old.encode_chat(messages) == ONE_PLUS_ONE_IDS
    assert old.apply_chat_template(HISTORY) == HISTORY_TEXT
    assert old.apply_chat_template(messages, force_thinking=False).endswith("What is 1+1?" + ASSISTANT)


@needs_real
@pytest.mark.parametrize("config_name", [None, "tokenizer_config.json"])
def test_folder_without_chat_template_is_a_clear_error(tmp_path: Path, config_name: str | None) -> None:
    tok = load_tokenizer(_tokenizer_folder(tmp_path, config_name, drop_template=True))
    assert not tok.is_fallback and tok.eos_token_id == 151643
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@needs_real
def test_template_errors_are_value_errors(tmp_path: Path) -> None:
    folder = _tokenizer_folder(tmp_path, None)
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
                "{{ bos_token }}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": BOS,
                                                               "eos_token": EOS}), encoding="utf-8")
    tok = load_tokenizer(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == BOS  # no generation prompt: as is
    with pytest.raises(ValueError, match="user first"):
        tok.apply_chat_template([{"role": "system", "content": "hi"}])


def test_real_decode_keeps_non_special_added_tokens(real: Tokenizer) -> None:
    ids = [151648] + real.encode("x") + [151649, 151643]
    assert real.decode(ids) == "<think>x</think>"
    assert real.decode(ids, skip_special_tokens=False) == "<think>x</think>" + EOS
    assert real.decode([151700, 151935]) == ""  # embedding padding rows: no token, no crash
    with pytest.raises(ValueError, match="non-negative"):
        real.decode([-1])


def test_chinese_round_trip(real: Tokenizer) -> None:
    text = "深度求索发布了推理模型，它在数学竞赛题上表现出色。今天天气很好！"
    ids = real.encode(text)
    assert ids[:7] == [102217, 30918, 50984, 106747, 113272, 104949, 3837] and len(ids) == 20
    assert real.decode(ids) == text


# --- messages are checked ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], r"messages\[1\]\.content"),
        ([{"role": "user"}], r"messages\[0\]\.content"),
        ([{"role": "assistant", "content": None}], r"messages\[0\]\.content"),
        (["user: hi"], r"messages\[0\] must be a dict"),
    ],
)
def test_bad_messages_raise(fallback: ByteTokenizer, messages: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fallback.apply_chat_template(messages)  # type: ignore[arg-type]


# --- the byte-level fallback ------------------------------------------------------------------------------


def test_fallback_is_announced(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    with caplog.at_level(logging.WARNING, logger="r1serve"):
        assert load_tokenizer(None).is_fallback
        assert load_tokenizer(tmp_path).is_fallback  # a folder without tokenizer.json
    messages = [r.getMessage() for r in caplog.records if r.name == "r1serve"]
    assert len(messages) == 2 and all("byte-level fallback tokenizer (dummy mode)" in m for m in messages)
    assert str(tmp_path) in messages[1]


def test_fallback_ids(fallback: ByteTokenizer) -> None:
    assert fallback.vocab_size == 151936 and fallback.is_fallback
    assert (fallback.eos_token_id, fallback.bos_token_id) == (151643, 151646)
    assert (fallback.think_start_id, fallback.think_end_id) == (151648, 151649)
    assert fallback.all_special_ids == {i for i, _, special in R1_ADDED_TOKENS if special}
    assert len(R1_ADDED_TOKENS) == 22
    for token_id, content, _ in R1_ADDED_TOKENS:
        assert fallback.encode(content) == [token_id]
        assert fallback.decode([token_id], skip_special_tokens=False) == content


def test_fallback_matches_the_real_added_tokens(special_tokens: dict) -> None:
    assert [list(t) for t in R1_ADDED_TOKENS] == special_tokens["added_tokens"]


def test_fallback_round_trip(fallback: ByteTokenizer) -> None:
    text = BOS + USER + "你好，世界 😀 é\u0301" + ASSISTANT + "<think>\n推理</think>答案" + EOS
    ids = fallback.encode(text)
    assert ids[:2] == [151646, 151644] and ids[-1] == 151643
    assert all(i < 256 for i in fallback.encode("你好 😀"))
    assert fallback.decode(ids, skip_special_tokens=False) == text
    assert fallback.decode(ids) == text.replace(BOS, "").replace(EOS, "")
    assert fallback.encode("hi", add_special_tokens=True) == [151646, 104, 105]


def test_fallback_decodes_any_model_id(fallback: ByteTokenizer) -> None:
    ids = [256, 300, 151642, 151665, 151935]
    text = fallback.decode(ids)
    assert text == "".join(fallback_char(i) for i in ids) == fallback.decode(ids)
    assert len(text) == len(ids) and text.isprintable() and text.isascii() and " " not in text
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fallback.decode([151936])


def test_fallback_chat_text(fallback: ByteTokenizer) -> None:
    messages = [{"role": "user", "content": "What is 1+1?"}]
    assert fallback.apply_chat_template(messages) == BOS + USER + "What is 1+1?" + ASSISTANT + "<think>\n"
    assert fallback.apply_chat_template(messages, force_thinking=False).endswith(ASSISTANT)
    assert fallback.apply_chat_template(HISTORY) == HISTORY_TEXT
    assert fallback.encode_chat(messages)[-3:] == [151645, 151648, 10]
    with pytest.raises(ValueError, match="tool"):
        fallback.apply_chat_template([{"role": "tool", "content": "42"}])


def test_fallback_chat_equals_real_template(real: Tokenizer, fallback: ByteTokenizer) -> None:
    conversations = [
        HISTORY,
        [{"role": "user", "content": "你好"}],
        [{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
         {"role": "user", "content": "c"}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "<think>r</think>1</think>2"}],
    ]
    for messages in conversations:
        for add_generation_prompt in (True, False):
            for force_thinking in (True, False):
                args = (messages, add_generation_prompt, force_thinking)
                assert fallback.apply_chat_template(*args) == real.apply_chat_template(*args)


# --- math prompts ------------------------------------------------------------------------------------------


def test_math_prompt() -> None:
    assert math_prompt("What is 1+1?") == "What is 1+1?\n" + MATH_PROMPT_EN
    assert math_prompt("1+1=?", "zh") == "1+1=?\n请逐步推理，并将最终答案放在\\boxed{}内。"
    assert MATH_PROMPT_EN.endswith("within \\boxed{}.") and MATH_PROMPT_ZH.endswith("\\boxed{}内。")
    with pytest.raises(ValueError, match="language"):
        math_prompt("x", "fr")
