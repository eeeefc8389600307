"""Structured-output constraints as xgrammar grammars: the cheap check at the door, the compile in the engine.

A constraint (`StructuredOutput`: kind + spec) becomes an xgrammar `Grammar` without any tokenizer
(`grammar_of`). That is what the server checks when a request arrives (`check_structured_output`), so that an
invalid schema, regex or grammar is a 400 naming its field before anything is queued. The engine then compiles
the grammar against the model's vocabulary (`GrammarCompiler`): the vocabulary's tables are built once, at the
first constrained request (seconds for the 151,936 tokens of the R1 tokenizer), and a compile takes from
milliseconds to seconds for a large schema, so compiles run on a small thread pool (xgrammar caches compiled
grammars by their text) and a request waits for its grammar without holding up the other requests' steps.

JSON is compiled with any whitespace between tokens, but at most `JSON_WHITESPACE_LIMIT` characters of it in a
row: a model that starts emitting newlines inside a JSON answer must come back to the value.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import xgrammar as xgr

from r1serve.errors import InvalidRequestError
from r1serve.sampling_params import StructuredOutput
from r1serve.tokenizer import R1_ADDED_TOKENS, ByteTokenizer, HFTokenizer, Tokenizer, fallback_char

JSON_WHITESPACE_LIMIT = 32  # whitespace characters in a row inside a JSON answer
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # response_format json_object: any JSON object
_XGR_LOCATION = re.compile(r"\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


def choice_grammar(choices: list[str]) -> str:
    """The EBNF of "exactly one of these strings" (JSON string escapes are xgrammar's EBNF escapes)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def parse_choices(spec: str) -> list[str]:
    """The strings of a `choice` spec (a JSON list of at least one string)."""
    try:
        choices = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a JSON list of strings: {exc}") from exc
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError("must be a non-empty list of strings")
    return choices


def is_ebnf(grammar: str) -> bool:
    """xgrammar's EBNF (GBNF) writes rules with `::=`; anything else is read as Lark, as vLLM reads it."""
    return "::=" in grammar


def grammar_of(constraint: StructuredOutput) -> xgr.Grammar:
    """The constraint as a tokenizer-independent grammar; a `ValueError` / `RuntimeError` if it is invalid."""
    kind, spec = constraint.kind, constraint.spec
    if kind == "json":
        return xgr.Grammar.from_json_schema(spec, any_whitespace=True, max_whitespace_cnt=JSON_WHITESPACE_LIMIT)
    if kind == "json_object":
        return xgr.Grammar.from_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=True,
                                            max_whitespace_cnt=JSON_WHITESPACE_LIMIT)
    if kind == "regex":
        return xgr.Grammar.from_regex(spec)
    if kind == "choice":
        return xgr.Grammar.from_ebnf(choice_grammar(parse_choices(spec)))
    return xgr.Grammar.from_ebnf(spec) if is_ebnf(spec) else xgr.Grammar.from_lark(spec)


def check_structured_output(constraint: StructuredOutput, param: str) -> None:
    """An `InvalidRequestError` naming `param` when the constraint cannot be built (run it off the event loop:
    a large schema takes a while)."""
    try:
        grammar_of(constraint)
    except (ValueError, RuntimeError) as exc:
        raise InvalidRequestError(f"{param}: invalid {constraint.kind}: {grammar_error(exc)}", param=param,
                                  code="invalid_structured_output") from exc


def grammar_error(exc: BaseException) -> str:
    """xgrammar's message without its C++ source location, on one line."""
    return " ".join(_XGR_LOCATION.sub("", str(exc)).split())


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int) -> xgr.TokenizerInfo:
    """The vocabulary as xgrammar sees it, padded to the logits' width `vocab_size` (rows past the
    tokenizer's entries are never allowed); the EOS is the token that ends a finished grammar."""
    if isinstance(tokenizer, HFTokenizer):
        backend = tokenizer.backend
        encoded: list[str | bytes] = [""] * vocab_size
        for token, token_id in backend.get_vocab(with_added_tokens=True).items():
            if token_id < vocab_size:
                encoded[token_id] = token
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
        return xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=vocab_size,
                                 stop_token_ids=[tokenizer.eos_token_id], add_prefix_space=meta["add_prefix_space"])
    if isinstance(tokenizer, ByteTokenizer):
        return xgr.TokenizerInfo(byte_tokenizer_vocab(tokenizer, vocab_size), xgr.VocabType.RAW,
                                 vocab_size=vocab_size, stop_token_ids=[tokenizer.eos_token_id])
    raise ValueError(f"structured output needs an HFTokenizer or the byte-level fallback, not {tokenizer!r}")


def byte_tokenizer_vocab(tokenizer: ByteTokenizer, vocab_size: int) -> list[bytes]:
    """Each id's bytes as the fallback decodes them: a byte, an added token's text (nothing for the special
    ones: xgrammar never allows those), or the one printable character of any other id."""
    vocab = [bytes([i]) if i < 256 else fallback_char(i).encode() for i in range(min(vocab_size,
                                                                                      tokenizer.vocab_size))]
    vocab += [b""] * (vocab_size - len(vocab))
    for token_id, content, special in R1_ADDED_TOKENS:
        if token_id < vocab_size:
            vocab[token_id] = b"" if special else content.encode()
    return vocab


class GrammarCompiler:
    """Compiles constraints against one vocabulary on a thread pool (`submit`); the vocabulary's tables are
    built by the first compile."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_workers: int = 2) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="r1serve-grammar")
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None

    def submit(self, constraint: StructuredOutput) -> Future[xgr.CompiledGrammar]:
        return self._pool.submit(self.compile, constraint)

    def compile(self, constraint: StructuredOutput) -> xgr.CompiledGrammar:
        """The compiled grammar; an `InvalidRequestError` if the constraint is invalid."""
        try:
            grammar = grammar_of(constraint)
        except (ValueError, RuntimeError) as exc:
            raise InvalidRequestError(f"invalid {constraint.kind}: {grammar_error(exc)}",
                                      param="structured_output", code="invalid_structured_output") from exc
        return self._xgr_compiler().compile_grammar(grammar)

    def _xgr_compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                self._compiler = xgr.GrammarCompiler(tokenizer_info(self.tokenizer, self.vocab_size))
            return self._compiler

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
