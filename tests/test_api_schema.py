"""The OpenAPI document describes the server, and its request schema agrees with the server's validation.

Each test is a failure a review found: error statuses the document did not list (and a 422 it listed but the
server never sends), `/metrics` declared JSON, bodies the schema admitted but the server refused (a message
without content, an empty stop string, `true` as a token id), NaN answered with a range message, 400s without
a `code`, and a lone surrogate answered with a 500. Served in-process from the scripted engine of
test_server_app.py; the request schema is checked with jsonschema_rs, which schemathesis also uses.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import pytest
from fastapi.testclient import TestClient

from r1serve.server import ServerSettings, create_app
from test_server_app import CHAT, MODEL, ScriptedEngine, make_client

POST_ROUTES = ("/v1/chat/completions", "/v1/completions")
ERROR_REF = "#/components/schemas/ErrorResponse"
COMPLETION = {"model": MODEL, "prompt": "Q"}
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


@pytest.fixture(scope="module")
def client() -> TestClient:
    return make_client(ScriptedEngine(["a"]))


@pytest.fixture(scope="module")
def document(client: TestClient) -> dict[str, Any]:
    return client.get("/openapi.json").json()


def request_validator(document: dict[str, Any], route: str) -> Any:
    """A JSON Schema validator of the request body the document declares for `route`."""
    ref = document["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return jsonschema_rs.validator_for({"$ref": ref, "components": document["components"]})


def post_raw(client: TestClient, route: str, raw: str | bytes) -> Any:
    return client.post(route, content=raw, headers={"content-type": "application/json"})


def assert_error(response: Any, status: int, param: str | None, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    assert error["code"] is not None and (code is None or error["code"] == code), error
    return error


@pytest.mark.parametrize("route", POST_ROUTES)
def test_post_routes_document_every_error_status_with_the_openai_error_model(document: dict[str, Any],
                                                                             route: str) -> None:
    responses = document["paths"][route]["post"]["responses"]
    assert {"200", "400", "404", "413", "500", "503"} <= set(responses)
    assert "422" not in responses and "401" not in responses  # no --api-key: no 401 can happen
    for status in ("400", "404", "413", "500", "503"):
        assert responses[status]["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}, status
    assert "Retry-After" in responses["503"]["headers"]
    assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}


def test_the_error_model_is_the_openai_shape(document: dict[str, Any], client: TestClient) -> None:
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert schemas["ErrorResponse"]["required"] == ["error"]
    assert sorted(schemas["ErrorInfo"]["required"]) == ["code", "message", "param", "type"]
    validator = jsonschema_rs.validator_for({"$ref": ERROR_REF, "components": document["components"]})
    for response in (client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}),
                     client.post("/v1/completions", json={"model": MODEL}), client.get("/v1/nothing")):
        assert response.status_code in (400, 404) and validator.is_valid(response.json()), response.text


def test_api_key_adds_401_and_the_bearer_scheme() -> None:
    client = make_client(ScriptedEngine(["a"]), api_key="sesame")
    document = client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, method in (("/v1/models", "get"), *((route, "post") for route in POST_ROUTES)):
        operation = document["paths"][path][method]
        assert operation["security"] == [{"HTTPBearer": []}], path
        assert operation["responses"]["401"]["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}
    assert "security" not in document["paths"]["/health"]["get"]
    assert_error(client.post("/v1/chat/completions", json=CHAT), 401, None, "invalid_api_key")
    wrong = client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer nope"})
    assert_error(wrong, 401, None, "invalid_api_key")
    right = client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sesame"})
    assert right.status_code == 200


def test_metrics_is_documented_and_served_as_prometheus_text(document: dict[str, Any], client: TestClient) -> None:
    assert list(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    assert "r1serve_model_loaded 1.0" in response.text


def test_health_documents_200_and_503_and_answers_both() -> None:
    app = create_app(None, ServerSettings(model=MODEL))
    client = TestClient(app, raise_server_exceptions=False)
    document = client.get("/openapi.json").json()
    responses = document["paths"]["/health"]["get"]["responses"]
    assert set(responses) == {"200", "503"}
    health = jsonschema_rs.validator_for({"$ref": "#/components/schemas/HealthResponse",
                                          "components": document["components"]})
    loading = client.get("/health")
    assert loading.status_code == 503 and health.is_valid(loading.json())
    app.state.server.engine = ScriptedEngine(["a"])
    ready = client.get("/health")
    assert ready.status_code == 200 and health.is_valid(ready.json())


def test_bounds_are_json_schema_keywords(document: dict[str, Any]) -> None:
    """A pydantic bound it cannot place natively is emitted under its own name (`ge`), which no JSON Schema
    tool reads: the schema would admit what validation refuses."""
    def keys(node: Any, names: bool = False) -> set[str]:  # names: the keys of `properties` are field names
        if isinstance(node, dict):
            own = set() if names else set(node)
            return own | {k for key, value in node.items() for k in keys(value, key == "properties" and not names)}
        return {k for value in node for k in keys(value)} if isinstance(node, list) else set()

    found = keys(document["components"]["schemas"])
    assert not found & {"ge", "gt", "le", "lt", "min_length", "max_length", "strict", "allow_inf_nan"}
    assert {"minimum", "exclusiveMinimum", "maximum", "minLength", "maxItems"} <= found


def with_message(**message: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [message]}


# Bodies the schema used to admit and the server refused (or served wrongly): now refused by both.
REFUSED = [
    ("/v1/chat/completions", with_message(role="user"), "messages[0].content"),
    ("/v1/chat/completions", with_message(role="system", content=None), "messages[0].content"),
    ("/v1/chat/completions", with_message(role="wizard", content="hi"), "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "stop": [""]}, "stop[0]"),
    ("/v1/chat/completions", {**CHAT, "stop": ""}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stop": ["s"] * 17}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stop_token_ids": [True]}, "stop_token_ids[0]"),
    ("/v1/chat/completions", {**CHAT, "stop_token_ids": [-1]}, "stop_token_ids[0]"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "n": "2"}, "n"),
    ("/v1/chat/completions", {**CHAT, "seed": 1.5}, "seed"),
    ("/v1/chat/completions", {**CHAT, "temperature": "0.6"}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "stream": 1}, "stream"),
    ("/v1/completions", {**COMPLETION, "prompt": [True]}, "prompt[0]"),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [[]]}, "prompt[0]"),
    ("/v1/completions", {**COMPLETION, "prompt": ["a", "b"]}, "prompt"),
]


@pytest.mark.parametrize(("route", "body", "param"), REFUSED)
def test_schema_and_server_both_refuse(document: dict[str, Any], client: TestClient, route: str,
                                       body: dict[str, Any], param: str) -> None:
    assert not request_validator(document, route).is_valid(body)
    assert_error(client.post(route, json=body), 400, param)


@pytest.mark.parametrize(("route", "body"), [
    ("/v1/chat/completions", {**CHAT, "temperature": 1, "stop": "x", "stop_token_ids": [5], "seed": -3,
                              "max_tokens": 2.0}),
    ("/v1/chat/completions", {**CHAT, "messages": [*CHAT["messages"], {"role": "assistant"},
                                                   {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
    ("/v1/completions", {**COMPLETION, "prompt": [[5, 6]], "stop": ["a", "b"], "extra_field": {"any": 1}}),
])
def test_schema_and_server_both_accept(document: dict[str, Any], client: TestClient, route: str,
                                       body: dict[str, Any]) -> None:
    assert request_validator(document, route).is_valid(body)
    response = client.post(route, json=body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused_as_not_finite(client: TestClient, field: str, literal: str) -> None:
    raw = json.dumps(CHAT)[:-1] + f', "{field}": {literal}}}'
    error = assert_error(post_raw(client, "/v1/chat/completions", raw), 400, field, "invalid_value")
    assert "must be a finite number" in error["message"] and "less than" not in error["message"]


@pytest.mark.parametrize(("raw", "message"), [
    (b'{"model": "\xff\xfe", "prompt": "x"}', "not valid UTF-8"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"model": ', "not valid JSON"),
    ("[]", "must be a JSON object"),
    ("", "a JSON request body is required"),
])
@pytest.mark.parametrize("route", POST_ROUTES)
def test_undecodable_bodies_are_400_invalid_json(client: TestClient, route: str, raw: str | bytes,
                                                 message: str) -> None:
    error = assert_error(post_raw(client, route, raw), 400, None, "invalid_json")
    assert message in error["message"]


@pytest.mark.parametrize(("route", "body", "code"), [
    ("/v1/chat/completions", {**CHAT, "max_tokens": 10**6}, "context_length_exceeded"),
    ("/v1/chat/completions", {**CHAT, "n": 10**6}, "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "unsupported"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "invalid_value"),
    ("/v1/chat/completions", {"messages": CHAT["messages"]}, "missing_field"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, "invalid_type"),
    ("/v1/completions", {**COMPLETION, "prompt": [10**9]}, "invalid_token_id"),
    ("/v1/completions", {**COMPLETION, "stop_token_ids": [10**9], "min_tokens": 2}, "invalid_token_id"),
])
def test_every_400_has_a_code(client: TestClient, route: str, body: dict[str, Any], code: str) -> None:
    response = client.post(route, json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == code, response.text


SURROGATE = "x\\ud800y"  # a JSON escape: decodes to a lone surrogate, which no UTF-8 text can hold


@pytest.mark.parametrize(("route", "template", "param"), [
    ("/v1/completions", '{"model": "M", "prompt": "S"}', "prompt"),
    ("/v1/completions", '{"model": "M", "prompt": ["S"]}', "prompt[0]"),
    ("/v1/completions", '{"model": "M", "prompt": "x", "stop": ["S"]}', "stop[0]"),
    ("/v1/completions", '{"model": "M", "prompt": "x", "stop": "S"}', "stop"),
    ("/v1/completions", '{"model": "S", "prompt": "x"}', "model"),
    ("/v1/chat/completions", '{"model": "M", "messages": [{"role": "user", "content": "S"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", '{"model": "M", "messages": [{"role": "user", "content": [{"type": "text", '
                             '"text": "S"}]}]}', "messages[0].content[0].text"),
    ("/v1/chat/completions", '{"model": "M", "messages": [{"role": "user", "content": "x", "name": "S"}]}',
     "messages[0].name"),
    ("/v1/chat/completions", '{"model": "M", "messages": [{"role": "user", "content": "x"}], "user": "S"}', "user"),
])
def test_lone_surrogate_is_a_400_naming_the_field(client: TestClient, route: str, template: str,
                                                  param: str) -> None:
    raw = template.replace('"M"', json.dumps(MODEL)).replace('"S"', f'"{SURROGATE}"')
    error = assert_error(post_raw(client, route, raw), 400, param, "invalid_value")
    assert "surrogate" in error["message"]
    assert client.get("/health").status_code == 200
