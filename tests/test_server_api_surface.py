"""The vLLM drop-in surface, in-process on the scripted engine of test_server_app.py: the role sent with the
first text of a chat stream, the reasoning under both names (`reasoning_content`, `reasoning`),
`reasoning_effort`, `/tokenize` and `/detokenize`, `/v1/responses`, and `/docs` served without a CDN."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from r1serve.server import ServerSettings, create_app
from r1serve.server.cli import parse_settings
from test_api_schema import request_validator
from test_server_app import CHAT, MODEL, ScriptedEngine, make_client, stream


def test_chat_stream_sends_the_role_with_the_first_text_not_before() -> None:
    payloads = stream(make_client(ScriptedEngine(["Let me ", "think</think>", "\n\nok"])), CHAT)
    deltas = [p["choices"][0]["delta"] for p in payloads[:-1] if p["choices"]]
    assert deltas[0]["role"] == "assistant" and deltas[0]["reasoning_content"] == "Let me "
    assert all("role" not in d for d in deltas[1:])
    assert all(d.get("reasoning_content") or d.get("content") for d in deltas[:-1])  # no text-less chunk first


def test_an_output_without_text_still_carries_the_role_in_its_finish_chunk() -> None:
    payloads = stream(make_client(ScriptedEngine([""])), CHAT)
    chunks = [p for p in payloads[:-1] if p["choices"]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


PIECES = ["Let me ", "think</think>", "\n\nok"]


def test_reasoning_is_sent_under_both_names_full_and_streamed() -> None:
    client = make_client(ScriptedEngine(PIECES))
    message = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]
    assert message["reasoning_content"] == message["reasoning"] == "Let me think" and message["content"] == "ok"
    deltas = [p["choices"][0]["delta"] for p in stream(client, CHAT)[:-1] if p["choices"]]
    reasoning = [d for d in deltas if "reasoning_content" in d]
    assert reasoning and all(d["reasoning"] == d["reasoning_content"] for d in reasoning)
    assert not any("reasoning" in d for d in deltas if "content" in d)


def test_no_reasoning_field_alias_sends_only_reasoning_content() -> None:
    client = make_client(ScriptedEngine(PIECES), reasoning_field_alias=False)
    message = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "ok", "reasoning_content": "Let me think"}
    deltas = [p["choices"][0]["delta"] for p in stream(client, CHAT)[:-1] if p["choices"]]
    assert any("reasoning_content" in d for d in deltas) and not any("reasoning" in d for d in deltas)


def test_the_alias_flag_is_generated_from_the_settings() -> None:
    assert parse_settings(["--no-reasoning-field-alias"]).reasoning_field_alias is False
    assert parse_settings([]).reasoning_field_alias is True


@pytest.mark.parametrize(("extra", "budget", "header"), [
    ({"reasoning_effort": "low"}, 1024, "reasoning-effort=low"),
    ({"reasoning_effort": "medium"}, 4096, "reasoning-effort=medium"),
    ({"reasoning_effort": "high"}, None, "reasoning-effort=high"),  # no budget, whatever the server default
    ({"reasoning_effort": "low", "max_thinking_tokens": 9}, 9, "thinking-budget=9"),  # explicit wins
    ({}, 7, "thinking-budget=7"),  # the server default
])
def test_reasoning_effort_maps_to_a_thinking_budget(extra: dict[str, Any], budget: int | None, header: str) -> None:
    engine = ScriptedEngine(["x"])
    response = make_client(engine, max_thinking_tokens=7).post("/v1/chat/completions", json={**CHAT, **extra})
    assert response.status_code == 200, response.text
    assert engine.calls[0][1].max_thinking_tokens == budget
    assert header in response.headers["x-r1serve-policy"].split(",")


@pytest.mark.parametrize("effort", ["extreme", "", 1, "LOW"])
def test_an_invalid_reasoning_effort_is_a_400_naming_it(effort: Any) -> None:
    response = make_client(ScriptedEngine(["x"])).post("/v1/chat/completions",
                                                        json={**CHAT, "reasoning_effort": effort})
    assert response.status_code == 400 and response.json()["error"]["param"] == "reasoning_effort", response.text


def test_tokenize_a_chat_gives_the_ids_the_chat_route_sends_the_engine() -> None:
    engine = ScriptedEngine(["x"])
    client = make_client(engine)
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    response = client.post("/tokenize", json=CHAT)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {"count": len(engine.calls[0][0]), "max_model_len": 256, "tokens": list(engine.calls[0][0]),
                    "token_strs": None}
    assert response.headers["x-r1serve-policy"] == "system-folded,forced-thinking"  # rules 1 and 3


def test_tokenize_without_generation_prompt_forces_no_thinking() -> None:
    client = make_client(ScriptedEngine(["x"]))
    body = client.post("/tokenize", json={**CHAT, "add_generation_prompt": False})
    text = client.post("/detokenize", json={"tokens": body.json()["tokens"]}).json()["prompt"]
    assert text.endswith("<｜User｜>Sys\n\nQ") and body.headers["x-r1serve-policy"] == "system-folded"


def test_tokenize_a_prompt_adds_the_bos_as_completions_do_and_detokenize_inverts_it() -> None:
    engine = ScriptedEngine(["x"])
    client = make_client(engine)
    tokens = client.post("/tokenize", json={"model": MODEL, "prompt": "héllo"}).json()["tokens"]
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "héllo"}).status_code == 200
    assert tokens == list(engine.calls[0][0]) and tokens[0] == engine.tokenizer.bos_token_id
    plain = client.post("/tokenize", json={"prompt": "héllo", "add_special_tokens": False}).json()["tokens"]
    assert plain == tokens[1:]
    assert client.post("/detokenize", json={"model": MODEL, "tokens": plain}).json() == {"prompt": "héllo"}


@pytest.mark.parametrize(("route", "body", "status", "param", "code"), [
    ("/tokenize", {"model": MODEL}, 400, "prompt", "missing_field"),
    ("/tokenize", {"prompt": "a", "messages": CHAT["messages"]}, 400, "messages", "invalid_value"),
    ("/tokenize", {"prompt": None}, 400, "prompt", None),
    ("/tokenize", {"prompt": "a", "return_token_strs": True}, 400, "return_token_strs", "unsupported"),
    ("/tokenize", {"prompt": "a", "continue_final_message": True}, 400, "continue_final_message", "unsupported"),
    ("/tokenize", {"prompt": "a", "chat_template": "{{ x }}"}, 400, "chat_template", "unsupported"),
    ("/tokenize", {"prompt": "word " * 10_000}, 400, "prompt", "context_length_exceeded"),
    ("/tokenize", {"model": "gpt-4", "prompt": "a"}, 404, "model", "model_not_found"),
    ("/detokenize", {"tokens": [10**6]}, 400, "tokens", "invalid_token_id"),
    ("/detokenize", {"tokens": [True]}, 400, "tokens[0]", None),
    ("/detokenize", {}, 400, "tokens", "missing_field"),
])
def test_tokenizer_routes_refuse_bad_input_naming_the_field(route: str, body: dict[str, Any], status: int,
                                                            param: str, code: str | None) -> None:
    response = make_client(ScriptedEngine(["x"])).post(route, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and (code is None or error["code"] == code), error


def test_tokenizer_routes_are_documented_and_guarded_by_the_api_key() -> None:
    client = make_client(ScriptedEngine(["x"]), api_key="k")
    document = client.get("/openapi.json").json()
    for route in ("/tokenize", "/detokenize"):
        responses = document["paths"][route]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "500", "503"} <= set(responses) and "422" not in responses
        assert client.post(route, json={"prompt": "a", "tokens": [1]}).status_code == 401
    ok = client.post("/tokenize", json={"prompt": "a"}, headers={"authorization": "Bearer k"})
    assert ok.status_code == 200


@pytest.mark.parametrize(("body", "accepted"), [
    ({"prompt": "a"}, True), ({"messages": CHAT["messages"], "add_generation_prompt": False}, True),
    ({}, False), ({"prompt": "a", "messages": CHAT["messages"]}, False), ({"prompt": None}, False),
    ({"prompt": None, "messages": CHAT["messages"]}, False), ({"messages": []}, False),
])
def test_the_tokenize_schema_admits_what_the_server_accepts(body: dict[str, Any], accepted: bool) -> None:
    client = make_client(ScriptedEngine(["x"]))
    validator = request_validator(client.get("/openapi.json").json(), "/tokenize")
    assert validator.is_valid(body) is accepted
    assert (client.post("/tokenize", json=body).status_code == 200) is accepted


def sdk(engine: ScriptedEngine, **settings: Any) -> Any:
    """The official `openai` SDK talking to the in-process app (its httpx client is the TestClient)."""
    from openai import OpenAI

    return OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0,
                  http_client=make_client(engine, **settings))


def test_responses_full_answer_parses_in_the_sdk() -> None:
    engine = ScriptedEngine(PIECES)
    response = sdk(engine).responses.create(model=MODEL, input="Q", instructions="Sys", max_output_tokens=50)
    reasoning, message = response.output
    assert (reasoning.type, reasoning.content[0].type, reasoning.content[0].text) == ("reasoning",
                                                                                       "reasoning_text",
                                                                                       "Let me think")
    assert message.type == "message" and message.content[0].text == "ok" and response.output_text == "ok"
    assert response.status == "completed" and response.instructions == "Sys"
    assert response.usage.output_tokens == sum(len(engine.tokenizer.encode(p)) for p in PIECES)
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    text = engine.tokenizer.decode(engine.calls[0][0], skip_special_tokens=False)
    assert text.endswith("<｜User｜>Sys\n\nQ<｜Assistant｜><think>\n")  # instructions folded (rule 1), rule 3
    assert engine.calls[0][1].max_tokens == 50


def test_responses_stream_parses_in_the_sdk_and_agrees_with_the_full_answer() -> None:
    from openai.types.responses import ResponseCompletedEvent

    events = list(sdk(ScriptedEngine(PIECES)).responses.create(model=MODEL, input=[
        {"role": "user", "content": "Q"}], stream=True))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed" and isinstance(events[-1], ResponseCompletedEvent)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    answer = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert (reasoning, answer) == ("Let me think", "ok")
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [item.type for item in done] == ["reasoning", "message"]
    final = events[-1].response
    assert final.output_text == "ok" and final.output[0].content[0].text == "Let me think"
    assert final.usage.output_tokens_details.reasoning_tokens == len("Let me think")


class LengthEngine(ScriptedEngine):
    """Ends its sample with finish_reason "length" (the output limit)."""

    async def generate(self, prompt: Any, params: Any, request_id: str | None = None) -> Any:
        async for output in super().generate(prompt, params, request_id):
            for sample in output.outputs:
                sample.finish_reason = "length" if sample.finish_reason else None
            yield output


def test_responses_cut_by_the_output_limit_is_incomplete_full_and_streamed() -> None:
    client = sdk(LengthEngine(["Let me "]))
    response = client.responses.create(model=MODEL, input="Q")
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in response.output] == ["reasoning", "message"] and response.output_text == ""
    events = list(client.responses.create(model=MODEL, input="Q", stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"
    assert events[-1].response.output[-1].status == "incomplete"


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "function", "name": "f"}]}, "tools"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"store": True}, "store"), ({"background": True}, "background"), ({"tool_choice": "auto"}, "tool_choice"),
    ({"include": ["reasoning.encrypted_content"]}, "include"), ({"truncation": "auto"}, "truncation"),
    ({"text": {"format": {"type": "xml"}}}, "text.format"), ({"conversation": "c"}, "conversation"),
    ({"reasoning": {"effort": "max"}}, "reasoning.effort"), ({"input": []}, "input"),
    ({"input": "w " * 2000}, "input"), ({"max_output_tokens": 10**6}, "max_output_tokens"),
])
def test_responses_refuses_what_it_does_not_implement_naming_the_field(extra: dict[str, Any], param: str) -> None:
    response = make_client(ScriptedEngine(["x"])).post("/v1/responses", json={"model": MODEL, "input": "Q", **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


def test_responses_accepts_store_false_and_maps_effort() -> None:
    engine = ScriptedEngine(["x"])
    body = {"model": MODEL, "input": "Q", "store": False, "reasoning": {"effort": "low"}, "text": {"format": {
        "type": "text"}}}
    assert make_client(engine).post("/v1/responses", json=body).status_code == 200
    assert engine.calls[0][1].max_thinking_tokens == 1024


@pytest.mark.parametrize(("page", "assets"), [
    ("/docs", {"swagger-ui-bundle.js": "javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}),
    ("/redoc", {"redoc.standalone.js": "javascript", "favicon.png": "image/png"}),
])
def test_docs_pages_load_only_local_assets_that_answer(page: str, assets: dict[str, str]) -> None:
    client = make_client(ScriptedEngine(["x"]))
    html = client.get(page).text
    urls = set(re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html))
    assert urls and not [u for u in urls if "//" in u], urls  # no http(s)://, no protocol-relative CDN URL
    assert "/openapi.json" in urls
    for name, kind in assets.items():
        url = f"/docs-static/{name}"
        assert url in urls, (url, urls)
        response = client.get(url)
        assert response.status_code == 200 and kind in response.headers["content-type"], url
        assert len(response.content) > 1000
    assert "SwaggerUIBundle" in client.get("/docs-static/swagger-ui-bundle.js").text or page == "/redoc"


def test_docs_under_a_root_path_point_below_it() -> None:
    app = create_app(ScriptedEngine(["x"]), ServerSettings(model=f"/models/{MODEL}", root_path="/r1"))
    html = TestClient(app, root_path="/r1").get("/docs").text  # uvicorn puts --root-path in the scope
    assert 'src="/r1/docs-static/swagger-ui-bundle.js"' in html and "url: '/r1/openapi.json'" in html
