"""The server's engine and usage-rule options are EngineConfig's and PolicyConfig's fields, declared once there."""
from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from r1serve.config import EngineConfig
from r1serve.server.policy import PolicyConfig
from r1serve.server.settings import ServerSettings


def test_every_engine_option_has_the_engine_configs_default_and_help() -> None:
    for f in dataclasses.fields(EngineConfig):
        if not f.metadata["server"]:
            assert f.name not in ServerSettings.model_fields  # e.g. num_kv_blocks: tests only
            continue
        info = ServerSettings.model_fields[f.name]
        assert info.description == f.metadata["help"]
        assert info.default == ("none" if f.name == "quantization" else f.default), f.name


def test_default_settings_describe_the_default_configs() -> None:
    settings = ServerSettings()
    assert settings.engine_config() == EngineConfig()
    assert settings.policy_config() == PolicyConfig()


def test_a_flag_named_apart_from_its_field_still_reaches_it() -> None:
    settings = ServerSettings(max_thinking_tokens=64, fold_system_prompt=False, quantization="awq", block_size=32)
    assert settings.policy_config().default_max_thinking_tokens == 64
    assert settings.policy_config().fold_system_prompt is False
    assert settings.engine_config().quantization == "awq" and settings.engine_config().block_size == 32


@pytest.mark.parametrize(("name", "value"), [("max_model_len", 0), ("gpu_memory_utilization", 1.5),
                                             ("num_cpu_threads", 0), ("max_thinking_tokens", -1)])
def test_bounds_are_enforced_by_both_and_name_the_field(name: str, value: float) -> None:
    with pytest.raises(ValidationError, match=name):
        ServerSettings(**{name: value})
    if name in {f.name for f in dataclasses.fields(EngineConfig)}:
        with pytest.raises(ValueError, match=name):
            EngineConfig(**{name: value})


def test_engine_config_has_no_unread_extra_field() -> None:
    assert "extra" not in {f.name for f in dataclasses.fields(EngineConfig)}
