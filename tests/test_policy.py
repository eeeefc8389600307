"""The R1 usage rules as a policy (rules 1, 2, 4, 7, 8), each on and off, and the record it leaves."""

from __future__ import annotations

from r1serve.sampling_params import RepetitionGuard
from r1serve.server.policy import (
    PolicyConfig,
    PolicyRecord,
    apply_message_rules,
    repetition_guard,
    sampling_defaults,
    thinking_budget,
)

ON = PolicyConfig()


def test_system_prompt_folded_into_first_user_turn() -> None:
    record = PolicyRecord()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}]
    out = apply_message_rules(messages, ON, record)
    assert out[0] == {"role": "user", "content": "Be brief.\n\nHi"}
    assert [m["role"] for m in out] == ["user", "assistant", "user"]
    assert out[2]["content"] == "Again"
    assert messages[1]["content"] == "Hi"  # the request's own messages are not mutated
    assert record.applied == ["system-folded", "forced-thinking"]


def test_system_only_becomes_a_user_turn_and_switch_off_keeps_it() -> None:
    assert apply_message_rules([{"role": "system", "content": "S"}], ON, PolicyRecord()) == [
        {"role": "user", "content": "S"}]
    record = PolicyRecord()
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    off = PolicyConfig(fold_system_prompt=False, force_thinking=False)
    assert apply_message_rules(messages, off, record) == messages
    assert record.header() == "none"


def test_history_reasoning_stripped_and_switch_off() -> None:
    messages = [{"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nA1"},
                {"role": "user", "content": "Q2"}]
    record = PolicyRecord()
    assert apply_message_rules(messages, ON, record)[1]["content"] == "A1"
    assert "history-stripped" in record.applied
    record = PolicyRecord()
    kept = apply_message_rules(messages, PolicyConfig(strip_history_reasoning=False), record)
    assert kept[1]["content"] == messages[1]["content"]
    assert "history-stripped" not in record.applied


def test_sampling_defaults_and_out_of_range_flag() -> None:
    record = PolicyRecord()
    assert sampling_defaults(None, None, ON, record) == (0.6, 0.95)
    assert record.applied == ["default-temperature", "default-top-p"]
    record = PolicyRecord()
    assert sampling_defaults(1.0, 0.5, ON, record) == (1.0, 0.5)  # honoured, but flagged
    assert record.applied == ["temperature-out-of-range"]
    record = PolicyRecord()
    assert sampling_defaults(0.0, None, PolicyConfig(enforce_temperature=True), record) == (0.5, 0.95)
    assert "temperature-clamped" in record.applied
    assert sampling_defaults(0.9, None, PolicyConfig(enforce_temperature=True), PolicyRecord())[0] == 0.7
    assert sampling_defaults(0.6, 0.9, ON, PolicyRecord()) == (0.6, 0.9)


def test_sampling_defaults_switched_off_are_openai_defaults() -> None:
    record = PolicyRecord()
    assert sampling_defaults(None, None, PolicyConfig(r1_sampling_defaults=False), record) == (1.0, 1.0)
    assert sampling_defaults(1.5, None, PolicyConfig(r1_sampling_defaults=False), record) == (1.5, 1.0)
    assert record.applied == []
    alone = PolicyConfig(r1_sampling_defaults=False, enforce_temperature=True)  # clamping works on its own
    assert sampling_defaults(None, None, alone, record) == (0.7, 1.0)
    assert record.applied == ["temperature-out-of-range", "temperature-clamped"]


def test_thinking_budget_request_then_server_default_then_off() -> None:
    record = PolicyRecord()
    assert thinking_budget(None, ON, record) is None and record.applied == []
    assert thinking_budget(12, PolicyConfig(default_max_thinking_tokens=512), record) == 12
    assert thinking_budget(None, PolicyConfig(default_max_thinking_tokens=512), record) == 512
    assert record.applied == ["thinking-budget=12", "thinking-budget=512"]
    assert thinking_budget(12, PolicyConfig(thinking_budget=False), PolicyRecord()) is None


def test_repetition_guard_on_and_off() -> None:
    record = PolicyRecord()
    assert isinstance(repetition_guard(ON, record), RepetitionGuard)
    assert record.header() == "repetition-guard"
    assert repetition_guard(PolicyConfig(repetition_guard=False), PolicyRecord()) is None
