"""`SamplingParams`: how one request is decoded and when it stops, validated when it is built.

Defaults follow the model's usage rules (temperature 0.6, top-p 0.95, from its generation_config.json) rather
than vLLM's (1.0, 1.0): r1serve serves R1 reasoning models, and those defaults are what their authors advise.
Every invalid value raises an `InvalidRequestError` (a `ValueError`) whose `param` names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from r1serve.errors import InvalidRequestError

R1_TEMPERATURE = 0.6
R1_TOP_P = 0.95

StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar"]
STRUCTURED_KINDS: tuple[str, ...] = ("json", "json_object", "regex", "choice", "grammar")


@dataclass
class RepetitionGuard:
    """Stops a stream caught in a loop: the last `min_repeats` windows of some period `p` (1 ≤ p ≤ max_period
    tokens) are identical and together span at least `min_span` tokens (usage rule 8)."""

    max_period: int = 200
    min_repeats: int = 4
    min_span: int = 128

    def __post_init__(self) -> None:
        for name in ("max_period", "min_repeats", "min_span"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"repetition_guard.{name} must be at least 1, got {getattr(self, name)}",
                                          param=f"repetition_guard.{name}")


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the answer (after `</think>`): `kind` and its `spec`, a string. `json`: a JSON schema
    (JSON text); `json_object`: any JSON object (spec empty); `regex`: a regular expression; `choice`: a JSON
    list of strings, one of which is the answer; `grammar`: an EBNF grammar (xgrammar's GBNF, with `::=`) or
    a Lark grammar. Whether the spec itself is valid is checked by `engine.grammar.check_structured_output`."""

    kind: StructuredKind
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidRequestError(f"structured_output.kind must be one of {', '.join(STRUCTURED_KINDS)}, "
                                      f"got {self.kind!r}", param="structured_output.kind")
        if not isinstance(self.spec, str):
            raise InvalidRequestError(f"structured_output.spec must be a string, got {type(self.spec).__name__}",
                                      param="structured_output.spec")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = R1_TEMPERATURE
    top_p: float = R1_TOP_P
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = None  # None: up to the end of the context window
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    max_thinking_tokens: int | None = None  # usage rule 7: close the reasoning after this many tokens
    repetition_guard: RepetitionGuard | None = None  # usage rule 8
    logprobs: int | None = None  # each sampled token's logprob and this many top ones (engine/logprobs.py)
    prompt_logprobs: int | None = None  # the same for the prompt tokens (the first one has none)
    structured_output: StructuredOutput | None = None  # the answer after </think> follows this constraint

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        errors = [
            ("n", self.n >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0.0, "must be non-negative"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be -1, 0 (off) or positive"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "must be positive"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1"),
            ("min_tokens", self.min_tokens >= 0, "must be non-negative"),
            ("max_thinking_tokens", self.max_thinking_tokens is None or self.max_thinking_tokens >= 0,
             "must be non-negative"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", all(_is_token_id(t) for t in self.stop_token_ids), "must be non-negative token ids"),
            ("logprobs", self.logprobs is None or _is_token_id(self.logprobs), "must be None or non-negative"),
            ("prompt_logprobs", self.prompt_logprobs is None or _is_token_id(self.prompt_logprobs),
             "must be None or non-negative"),
        ]
        for name, ok, why in errors:
            if not ok:
                raise InvalidRequestError(f"{name} {why}, got {getattr(self, name)!r}", param=name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _is_token_id(value: object) -> bool:
    """A plain non-negative int (a bool is not a token id); the vocabulary bound is the engine's check."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
