"""The flags a vLLM recipe for this model pastes: each is accepted, and those that mean something here do it
(several served names after one flag, CORS, root path, chat template, generation config); an unknown flag's
error names the closest known one; another reasoning parser is refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from r1serve.server import ServerSettings, create_app
from r1serve.server.cli import main, parse_settings
from r1serve.server.launcher import log_accepted_flags, read_chat_template
from test_server_app import CHAT, MODEL, ScriptedEngine

RECIPE = ["--model", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "--trust-remote-code", "--reasoning-parser",
          "deepseek_r1", "--enable-reasoning", "--enable-chunked-prefill", "--disable-log-requests",
          "--uvicorn-log-level", "warning", "--max-logprobs", "5", "--download-dir", "/tmp/hf",
          "--served-model-name", "r1", "r1-distill", "--max-model-len", "4096", "--stream-interval", "20",
          "--port", "8000"]


def test_a_vllm_recipe_parses_with_several_served_names() -> None:
    settings = parse_settings(RECIPE)
    assert settings.served_model_name == ["r1", "r1-distill"]
    assert settings.model_names()[:2] == ["r1", "r1-distill"]
    assert settings.engine_config().download_dir == "/tmp/hf"
    assert settings.engine_config().stream_interval == 20
    assert settings.disable_log_requests and settings.uvicorn_log_level == "warning"
    assert settings.max_logprobs == 5  # a real limit now (server/logprobs.py), not a flag merely accepted


def test_accepted_flags_each_get_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="r1serve.server"):
        log_accepted_flags(parse_settings(RECIPE))
    for flag in ("--trust-remote-code", "--reasoning-parser deepseek_r1", "--enable-reasoning",
                 "--enable-chunked-prefill"):
        assert sum(flag in r.getMessage() for r in caplog.records) == 1, flag


def test_an_unknown_flag_names_the_closest_known_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--max-model-length", "10"]) == 2
    assert "did you mean --max-model-len?" in capsys.readouterr().err


def test_another_reasoning_parser_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--reasoning-parser", "qwen3"]) == 2
    assert "deepseek_r1" in capsys.readouterr().err


def test_allowed_origins_as_a_json_list_turn_cors_on() -> None:
    settings = parse_settings(["--allowed-origins", '["https://app.example"]'])
    assert settings.allowed_origins == ["https://app.example"]
    client = TestClient(create_app(ScriptedEngine(["x"]), settings))
    preflight = client.options("/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    other = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    plain = TestClient(create_app(ScriptedEngine(["x"]), ServerSettings()))
    assert "access-control-allow-origin" not in plain.get("/health", headers={"Origin": "https://a"}).headers


def test_root_path_prefixes_the_documented_server() -> None:
    """uvicorn passes --root-path in each request's scope (launcher.py); the app documents it."""
    client = TestClient(create_app(ScriptedEngine(["x"]), ServerSettings(root_path="/r1")), root_path="/r1")
    assert client.get("/openapi.json").json()["servers"] == [{"url": "/r1"}]


def test_generation_config_folder_sets_the_defaults_of_omitted_fields(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.55, "top_p": 0.9}))
    engine = ScriptedEngine(["Answer"])
    client = TestClient(create_app(engine, ServerSettings(model=f"/models/{MODEL}",
                                                          generation_config=str(tmp_path))))
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    params = engine.calls[-1][1]
    assert (params.temperature, params.top_p) == (0.55, 0.9)
    vllm = ServerSettings(generation_config="vllm").policy_config()
    assert not vllm.r1_sampling_defaults
    with pytest.raises(ValueError, match="generation_config.json"):
        ServerSettings(generation_config=str(tmp_path / "absent"))


def test_chat_template_is_read_from_a_file_or_taken_as_text(tmp_path: Path) -> None:
    path = tmp_path / "template.jinja"
    path.write_text("{{ messages[0]['content'] }}!")
    assert read_chat_template(str(path)) == "{{ messages[0]['content'] }}!"
    assert read_chat_template("{{ 'inline' }}") == "{{ 'inline' }}"
