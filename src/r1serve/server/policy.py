"""The R1 usage rules as a per-request policy: what the server changes in a request, and a record of it.

DeepSeek's advice for the R1 models (DESIGN.md rules 1-8) is easy to get wrong from the client side: a system
prompt, greedy decoding or a resent chain of thought all hurt the answers. The server applies the rules to
every request itself, each rule switchable by a flag (`PolicyConfig`), and records what it did in a
`PolicyRecord` that becomes the `x-r1serve-policy` response header and a log line, so nothing is changed
silently. The message rules themselves (1 and 4) are `r1serve.r1_rules`, shared with the client; rule 3
(forced thinking) is applied by the tokenizer's chat template, rule 5 by `r1serve.r1_rules`'s splitter in
`serving_chat`, rules 7 and 8 by the engine from the `SamplingParams` built here; rule 6 (the
math instruction) belongs to the client and eval, which take it from `r1serve.prompts`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from r1serve.r1_rules import fold_system_prompt, strip_history_reasoning
from r1serve.sampling_params import R1_TEMPERATURE, R1_TOP_P, RepetitionGuard

logger = logging.getLogger("r1serve.server")

R1_TEMPERATURE_RANGE = (0.5, 0.7)  # the authors' advice: 0.5-0.7, 0.6 recommended
OPENAI_TEMPERATURE = 1.0  # what a request that omits them gets when rule 2 is off (OpenAI's defaults)
OPENAI_TOP_P = 1.0
# OpenAI's `reasoning_effort` as rule 7's thinking budget (docs/serving.md); "high" sets no budget.
REASONING_EFFORT_BUDGETS: dict[str, int | None] = {"low": 1024, "medium": 4096, "high": None}


def _rule(default: Any, help: str, *, flag: str = "", **bounds: int) -> Any:
    """A PolicyConfig switch with its server flag's help, the flag's name if it is not the field's, and bounds."""
    return field(default=default, metadata={"help": help, "flag": flag, "bounds": bounds, "server": True})


@dataclass(frozen=True)
class PolicyConfig:
    """Which usage rules the server applies; each is on by default. A field's metadata holds its flag's help
    (`server.settings` makes the flags from them; "flag" where the flag's name differs)."""

    fold_system_prompt: bool = _rule(True, "rule 1: fold system messages into the first user turn")
    r1_sampling_defaults: bool = _rule(
        True, "rule 2: temperature 0.6 / top_p 0.95 if omitted; flag temperature outside 0.5-0.7")
    enforce_temperature: bool = _rule(False, "rule 2: clamp temperature into 0.5-0.7")  # R1_TEMPERATURE_RANGE
    force_thinking: bool = _rule(True, "rule 3: the prompt ends with `<think>\\n`")
    strip_history_reasoning: bool = _rule(
        True, "rule 4: earlier assistant turns keep only their text after </think>")
    reasoning_split: bool = _rule(True, "rule 5: reasoning_content apart from content")
    reasoning_field_alias: bool = _rule(
        True, "rule 5: send the reasoning also as `reasoning` (vLLM's name) beside reasoning_content")
    thinking_budget: bool = _rule(True, "rule 7: honour max_thinking_tokens")
    default_max_thinking_tokens: int | None = _rule(
        None, "rule 7: default thinking budget of requests that set none", flag="max_thinking_tokens", ge=0)
    repetition_guard: bool = _rule(True, "rule 8: stop looping streams (finish_reason 'repetition')")
    default_temperature: float = R1_TEMPERATURE  # rule 2's defaults (--generation-config may change them)
    default_top_p: float = R1_TOP_P


@dataclass
class PolicyRecord:
    """What was applied to one request, in order; `header()` is the `x-r1serve-policy` value."""

    applied: list[str] = field(default_factory=list)

    def add(self, token: str) -> None:
        if token not in self.applied:
            self.applied.append(token)

    def header(self) -> str:
        return ",".join(self.applied) if self.applied else "none"


def apply_message_rules(messages: list[dict[str, Any]], config: PolicyConfig,
                        record: PolicyRecord) -> list[dict[str, Any]]:
    """Rules 1, 3 and 4 on a chat conversation (rule 3 is recorded here, applied by the chat template)."""
    if config.fold_system_prompt and any(m["role"] == "system" for m in messages):
        messages = fold_system_prompt(messages)
        record.add("system-folded")
    if config.strip_history_reasoning:
        stripped = strip_history_reasoning(messages)
        if stripped != messages:
            record.add("history-stripped")
        messages = stripped
    if config.force_thinking:
        record.add("forced-thinking")
    return messages


def sampling_defaults(temperature: float | None, top_p: float | None, config: PolicyConfig,
                      record: PolicyRecord) -> tuple[float, float]:
    """Rule 2: the R1 temperature and top_p where the request set none (OpenAI's 1.0 and 1.0 when the rule is
    off); a temperature outside 0.5-0.7 is flagged, and clamped into it with `enforce_temperature` (which
    works on its own too)."""
    if config.r1_sampling_defaults:
        if temperature is None:
            temperature = config.default_temperature
            record.add("default-temperature")
        if top_p is None:
            top_p = config.default_top_p
            record.add("default-top-p")
    temperature = OPENAI_TEMPERATURE if temperature is None else temperature
    top_p = OPENAI_TOP_P if top_p is None else top_p
    low, high = R1_TEMPERATURE_RANGE
    if (config.r1_sampling_defaults or config.enforce_temperature) and not low <= temperature <= high:
        record.add("temperature-out-of-range")
        logger.info("temperature %s is outside the R1 range %s-%s%s", temperature, low, high,
                    " (clamped)" if config.enforce_temperature else " (honoured; --enforce-temperature clamps)")
        if config.enforce_temperature:
            temperature = min(max(temperature, low), high)
            record.add("temperature-clamped")
    return temperature, top_p


def thinking_budget(requested: int | None, config: PolicyConfig, record: PolicyRecord,
                    effort: str | None = None) -> int | None:
    """Rule 7: the request's `max_thinking_tokens`, else its `reasoning_effort`'s budget
    (`REASONING_EFFORT_BUDGETS`; "high" is none, whatever the server default), else the server's default;
    None when switched off."""
    if not config.thinking_budget:
        return None
    if requested is not None:
        budget = requested
    elif effort is not None:
        budget = REASONING_EFFORT_BUDGETS[effort]
        record.add(f"reasoning-effort={effort}")
    else:
        budget = config.default_max_thinking_tokens
    if budget is not None:
        record.add(f"thinking-budget={budget}")
    return budget


def repetition_guard(config: PolicyConfig, record: PolicyRecord) -> RepetitionGuard | None:
    """Rule 8: the engine's repetition guard with its default thresholds, or None when switched off."""
    if not config.repetition_guard:
        return None
    record.add("repetition-guard")
    return RepetitionGuard()
