"""Text ⇄ token ids and the chat prompt, for the real tokenizer and for a byte-level stand-in.

The engine needs ids, the server needs chat prompts that follow the R1 usage rules, and the detokenizer needs
a `decode` it can call on small windows, or, for a byte-level vocabulary (the model's, and the stand-in), each
token's bytes (`token_bytes`), whose concatenation decodes to the same text. `HFTokenizer` wraps the
`tokenizers` library and renders the model's own jinja2 chat template (sandboxed, with the options Hugging Face
uses), then enforces forced thinking: with
`force_thinking` the generation prompt ends `<｜Assistant｜><think>\\n` whichever template version is on disk,
without it the `<think>\\n` a template added is removed. `ByteTokenizer` is what runs when no tokenizer files
exist (dummy mode): UTF-8 bytes as ids 0-255, the 22 R1 added tokens at their real ids, the same chat text as
the real template, and a printable character for every other id a random-weight model may emit.
`load_tokenizer` picks one of the two and says so in the log.
"""

from __future__ import annotations

import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from r1serve.r1_rules import THINK_END, THINK_START, THINKING_PREFIX

logger = logging.getLogger("r1serve")

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"

# The added tokens of DeepSeek-R1-Distill-Qwen (id, content, special), from tokenizer.json.
R1_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, EOS_TOKEN, True),
    (151644, USER_TOKEN, False),
    (151645, ASSISTANT_TOKEN, False),
    (151646, BOS_TOKEN, True),
    (151647, "<|EOT|>", False),
    (151648, THINK_START, False),
    (151649, THINK_END, False),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
)
R1_VOCAB_SIZE = 151936  # rows of the embedding / lm_head of every R1-Distill-Qwen model

_ROLES = ("system", "user", "assistant", "tool")
_KNOWN_EOS_TOKENS = (EOS_TOKEN, "<|im_end|>", "<|endoftext|>")  # R1, Qwen2.5-Instruct, Qwen2 base


def _validate_messages(messages: Any) -> None:
    """Raise a ValueError naming the first malformed message (the server turns it into a 400)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}")
        tool_call_turn = content is None and role == "assistant" and bool(message.get("tool_calls"))
        if not (isinstance(content, str) or tool_call_turn):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")


class Tokenizer(ABC):
    """What the engine, server, client and eval use: ids, text, and the chat prompt of the model."""

    eos_token_id: int
    bos_token_id: int | None
    think_start_id: int | None  # <think>
    think_end_id: int | None  # </think>
    vocab_size: int
    all_special_ids: set[int]
    name: str
    is_fallback: bool

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with `add_special_tokens` the BOS the tokenizer's post-processor adds."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `token_ids`; bytes that do not form whole UTF-8 characters become U+FFFD."""

    def token_bytes(self, skip_special_tokens: bool = True) -> Sequence[bytes] | None:
        """The bytes of every id below the table's length, such that `decode(ids)` is always the UTF-8 decoding
        (U+FFFD for bad bytes) of their concatenation; or None where decoding is not that (then the text of a
        token may depend on its neighbours). Special tokens are b"" with `skip_special_tokens`."""
        return None

    @abstractmethod
    def _render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
        """The chat template's own rendering, before forced thinking is applied."""

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            force_thinking: bool = True) -> str:
        """The prompt text of a conversation.

        With `add_generation_prompt`, `force_thinking` makes it end with the template's generation prompt
        followed by `<think>\\n` (appended when the template does not write it), and `force_thinking=False`
        removes a `<think>\\n` that the template's generation prompt wrote. Tokenizers without a `<think>`
        token (e.g. Qwen2.5) are left as their template renders them.
        """
        _validate_messages(messages)
        text = self._render_chat(messages, add_generation_prompt)
        if not add_generation_prompt or self.think_start_id is None:
            return text
        without_prompt = self._render_chat(messages, False)
        if text == without_prompt:  # the template wrote no generation prompt (e.g. after a tool turn)
            return text
        has_think = text.endswith(THINKING_PREFIX) and not without_prompt.endswith(THINKING_PREFIX)
        if force_thinking and not has_think:
            return text + THINKING_PREFIX
        if not force_thinking and has_think:
            return text[: -len(THINKING_PREFIX)]
        return text

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    force_thinking: bool = True) -> list[int]:
        """Token ids of the chat prompt. The template writes the BOS itself, so none is added here."""
        text = self.apply_chat_template(messages, add_generation_prompt, force_thinking)
        return self.encode(text, add_special_tokens=False)

    def set_chat_template(self, source: str) -> None:
        """Replace the chat template (`--chat-template`) with this jinja source."""
        raise ValueError(f"{type(self).__name__} cannot take a chat template: pass a tokenizer folder (--tokenizer)")

    def max_chars_per_token(self) -> int:
        """The most characters one token can stand for, so that a text of more than `limit` times this many
        characters is known to have more than `limit` tokens without being encoded."""
        if getattr(self, "_max_chars_per_token", None) is None:
            self._max_chars_per_token = max(len(content) for content in self._token_strings())
        return self._max_chars_per_token

    @abstractmethod
    def _token_strings(self) -> list[str]:
        """Every token as a string no shorter than the text it encodes."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """`chat_template` from tokenizer_config.json (a string or a list of named templates), else the
    chat_template.jinja file that newer Hugging Face checkpoints write beside it."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja_file = folder / "chat_template.jinja"
    return jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None


def _compile_chat_template(source: str) -> Any:
    """A sandboxed jinja2 template with the options and helpers Hugging Face's apply_chat_template uses."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _byte_level_chars() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): the character that stands for each byte in a token's string.
    Printable Latin-1 bytes stand for themselves; the other 68 bytes, in order, for U+0100 onwards."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {chr(b): b for b in kept}
    shifted = (b for b in range(256) if b not in set(kept))
    chars.update((chr(0x100 + n), b) for n, b in enumerate(shifted))
    return chars


def _symbol_bytes(symbols: str, chars: Mapping[str, int]) -> bytes:
    """A byte-level token string's bytes; a string with characters outside the alphabet (an added token such as
    `<｜User｜>`) stands for its own UTF-8 bytes, as the `tokenizers` ByteLevel decoder reads it."""
    try:
        return bytes(chars[c] for c in symbols)
    except KeyError:
        return symbols.encode("utf-8")


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer folder: tokenizer.json through `tokenizers`, the chat template via jinja2."""

    is_fallback = False

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.folder = Path(folder)
        self._tok = RustTokenizer.from_file(str(self.folder / "tokenizer.json"))
        config = self._read_json("tokenizer_config.json")
        self.name = self.folder.resolve().name
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder()  # {id: AddedToken}
        self.all_special_ids = {int(i) for i, token in added.items() if token.special}
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._find_eos_id()
        self.think_start_id = self._tok.token_to_id(THINK_START)
        self.think_end_id = self._tok.token_to_id(THINK_END)
        source = _read_chat_template(self.folder, config)
        self._template = _compile_chat_template(source) if source else None
        from tokenizers.decoders import ByteLevel

        self._byte_level = isinstance(self._tok.decoder, ByteLevel)  # decoding: the UTF-8 of the bytes joined
        self._token_bytes: dict[bool, list[bytes]] = {}

    def set_chat_template(self, source: str) -> None:
        self._template = _compile_chat_template(source)

    @property
    def backend(self) -> Any:
        """The `tokenizers.Tokenizer` itself (structured output reads its vocabulary)."""
        return self._tok

    def _token_strings(self) -> list[str]:
        return list(self._tok.get_vocab(with_added_tokens=True))  # byte-level: one symbol per UTF-8 byte

    def token_bytes(self, skip_special_tokens: bool = True) -> Sequence[bytes] | None:
        """Each token's bytes where tokenizer.json's decoder is `ByteLevel` (both tables built at the first call,
        a fraction of a second for the R1 vocabulary); None for any other decoder."""
        if not self._byte_level:
            return None
        if not self._token_bytes:
            chars = _byte_level_chars()
            table = [b""] * self.vocab_size
            for symbols, token_id in self._tok.get_vocab(with_added_tokens=True).items():
                table[token_id] = _symbol_bytes(symbols, chars)
            skipping = list(table)
            for token_id in self.all_special_ids:
                skipping[token_id] = b""
            self._token_bytes = {False: table, True: skipping}
        return self._token_bytes[skip_special_tokens]

    def _read_json(self, filename: str) -> dict[str, Any]:
        path = self.folder / filename
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc

    def _find_eos_id(self) -> int:
        """EOS from tokenizer_config.json, else generation_config.json / config.json, else a known name."""
        if self.eos_token and self._tok.token_to_id(self.eos_token) is not None:
            return int(self._tok.token_to_id(self.eos_token))
        for filename in ("generation_config.json", "config.json"):
            eos = self._read_json(filename).get("eos_token_id")
            if isinstance(eos, list) and eos:
                eos = eos[0]
            if isinstance(eos, int):
                self.eos_token = self._tok.id_to_token(eos)
                return eos
        for known in _KNOWN_EOS_TOKENS:
            if self._tok.token_to_id(known) is not None:
                self.eos_token = known
                return int(self._tok.token_to_id(known))
        raise ValueError(f"no EOS token in {self.folder}: tokenizer_config.json needs an 'eos_token' "
                         "(or generation_config.json an 'eos_token_id')")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode() needs a string, got {type(text).__name__}")
        # `encode_batch` of one text, not `encode`: the same ids, but it lets go of the GIL while it works, so a
        # server's event loop keeps streaming while worker threads tokenize prompts (a 1,024-token prompt takes
        # milliseconds), and several prompts tokenize at once.
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of the ids; ids past the tokenizer's entries (embedding padding rows) decode to nothing."""
        try:
            ids = token_ids if isinstance(token_ids, list) else list(token_ids)
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        except (OverflowError, TypeError) as exc:
            raise ValueError(f"token ids must be non-negative integers: {exc}") from exc

    def _render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
        if self._template is None:
            raise ValueError(f"the tokenizer at {self.folder} has no chat template (no 'chat_template' in "
                             "tokenizer_config.json and no chat_template.jinja): send a plain completion "
                             "prompt instead")
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as exc:
            raise ValueError(f"the chat template rejected the messages: {exc}") from exc


_FALLBACK_FIRST_CHAR, _FALLBACK_NUM_CHARS = 0x21, 94  # '!' .. '~'


def fallback_char(token_id: int) -> str:
    """The character the byte-level fallback prints for an id that is neither a byte nor an added token:
    one visible ASCII character, `chr(0x21 + id % 94)`, so random-weight output prints deterministically.
    """
    return chr(_FALLBACK_FIRST_CHAR + token_id % _FALLBACK_NUM_CHARS)


def _render_r1_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    """The text the R1 chat template (2025-02 version) renders for system, user and assistant turns: the last
    system message right after BOS, assistant turns keeping only their text after the last `</think>`."""
    system = ""
    parts: list[str] = []
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            system = content
        elif role == "user":
            parts.append(USER_TOKEN + content)
        elif role == "assistant" and content is not None:
            parts.append(ASSISTANT_TOKEN + content.split(THINK_END)[-1] + EOS_TOKEN)
        else:
            raise ValueError(f"messages[{i}]: the byte-level fallback's chat template has no tool calls or "
                             "tool turns (load the real tokenizer for those)")
    if add_generation_prompt:
        parts.append(ASSISTANT_TOKEN + THINKING_PREFIX)
    return BOS_TOKEN + system + "".join(parts)


class ByteTokenizer(Tokenizer):
    """The dummy-mode tokenizer: ids 0-255 are UTF-8 bytes, 151643-151664 the R1 added tokens at their real
    ids (recognised in text when encoding), every other id below 151936 one printable ASCII character
    (`fallback_char`). Text round-trips exactly (no normalisation); chat text equals the real template's."""

    is_fallback = True

    def __init__(self) -> None:
        self.name = "byte-level-fallback"
        self.vocab_size = R1_VOCAB_SIZE
        self.bos_token_id, self.eos_token_id = 151646, 151643
        self.think_start_id, self.think_end_id = 151648, 151649
        self._added = {token_id: content for token_id, content, _ in R1_ADDED_TOKENS}
        self._ids_of = {content: token_id for token_id, content, _ in R1_ADDED_TOKENS}
        self.all_special_ids = {token_id for token_id, _, special in R1_ADDED_TOKENS if special}
        alternatives = sorted(self._ids_of, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(re.escape(a) for a in alternatives) + ")")
        self._token_bytes: dict[bool, list[bytes]] = {}

    def _token_strings(self) -> list[str]:
        return ["x", *self._ids_of]  # a byte, or an added token's text

    def token_bytes(self, skip_special_tokens: bool = True) -> Sequence[bytes] | None:
        return self._byte_table(skip_special_tokens)

    def _byte_table(self, skip_special_tokens: bool) -> list[bytes]:
        """Bytes 0-255, the fallback characters, and the added tokens' text (which begins and ends with whole
        ASCII characters, so an incomplete character before or after one decodes as U+FFFD alone): the
        table `decode` joins."""
        if skip_special_tokens not in self._token_bytes:
            table = [bytes([i]) for i in range(256)]
            table += [bytes([_FALLBACK_FIRST_CHAR + i % _FALLBACK_NUM_CHARS]) for i in range(256, self.vocab_size)]
            for token_id, content in self._added.items():
                skipped = skip_special_tokens and token_id in self.all_special_ids
                table[token_id] = b"" if skipped else content.encode("utf-8")
            self._token_bytes[skip_special_tokens] = table
        return self._token_bytes[skip_special_tokens]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode() needs a string, got {type(text).__name__}")
        ids = [self.bos_token_id] if add_special_tokens else []
        for k, piece in enumerate(self._splitter.split(text)):
            if k % 2:  # odd pieces are the captured added tokens
                ids.append(self._ids_of[piece])
            else:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        table = self._byte_table(skip_special_tokens)
        for token_id in token_ids:
            if not 0 <= token_id < len(table):
                raise ValueError(f"token id {token_id!r} is outside the vocabulary [0, {self.vocab_size})")
        return b"".join([table[token_id] for token_id in token_ids]).decode("utf-8", errors="replace")

    def _render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
        return _render_r1_chat(messages, add_generation_prompt)


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """The tokenizer in folder `path` (tokenizer.json + tokenizer_config.json), or the byte-level fallback
    when `path` is None or holds no tokenizer.json (announced with a warning: that is dummy mode)."""
    if path is not None:
        folder = Path(path)
        if folder.is_file() and folder.name == "tokenizer.json":
            folder = folder.parent
        if (folder / "tokenizer.json").is_file():
            return HFTokenizer(folder)
    logger.warning("no tokenizer found at %s; using the byte-level fallback tokenizer (dummy mode)", path)
    return ByteTokenizer()
