"""The request fields that constrain the answer, in-process on the scripted engine: every dialect (OpenAI's
`response_format`, vLLM's `structured_outputs` and `guided_*`, the Responses API's `text.format`) reaches the
engine as one `StructuredOutput`, and every bad constraint is a 400 naming its field while the server stays up."""

from __future__ import annotations

import json
from typing import Any

import pytest

from r1serve.sampling_params import StructuredOutput
from test_server_app import CHAT, MODEL, ScriptedEngine, make_client

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
TEXT = {"model": MODEL, "prompt": "Q"}


@pytest.mark.parametrize(("extra", "expected"), [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredOutput("json_object")),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "A", "schema": SCHEMA, "strict": True}}},
     StructuredOutput("json", json.dumps(SCHEMA))),
    ({"guided_json": SCHEMA}, StructuredOutput("json", json.dumps(SCHEMA))),
    ({"guided_json": json.dumps(SCHEMA), "guided_decoding_backend": "xgrammar"},
     StructuredOutput("json", json.dumps(SCHEMA))),
    ({"guided_regex": "[0-9]+"}, StructuredOutput("regex", "[0-9]+")),
    ({"guided_choice": ["yes", "no"]}, StructuredOutput("choice", '["yes", "no"]')),
    ({"guided_grammar": 'root ::= "a"'}, StructuredOutput("grammar", 'root ::= "a"')),
    ({"structured_outputs": {"json": SCHEMA}}, StructuredOutput("json", json.dumps(SCHEMA))),
    ({"structured_outputs": {"regex": "a+"}}, StructuredOutput("regex", "a+")),
    ({"structured_outputs": {"choice": ["x"]}}, StructuredOutput("choice", '["x"]')),
    ({"structured_outputs": {"grammar": 'start: "a"'}}, StructuredOutput("grammar", 'start: "a"')),
    ({"structured_outputs": {"json_object": True}}, StructuredOutput("json_object")),
])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_each_dialect_reaches_the_engine_as_one_constraint(route: str, extra: dict[str, Any],
                                                           expected: StructuredOutput | None) -> None:
    engine = ScriptedEngine(["x"])
    base = CHAT if route == "/v1/chat/completions" else TEXT
    response = make_client(engine).post(route, json={**base, **extra})
    assert response.status_code == 200, response.text
    assert engine.calls[0][1].structured_output == expected


@pytest.mark.parametrize(("extra", "param"), [
    ({"guided_json": {"type": "nope"}}, "guided_json"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "A", "schema": {"type": 3}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "A"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"structural_tag": {"x": 1}}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
     "structured_outputs.disable_any_whitespace"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ({"guided_regex": "a", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
])
def test_a_bad_constraint_is_a_400_naming_its_field_and_the_server_stays_up(extra: dict[str, Any],
                                                                             param: str) -> None:
    engine = ScriptedEngine(["x"])
    client = make_client(engine)
    for stream in (False, True):
        response = client.post("/v1/chat/completions", json={**CHAT, **extra, "stream": stream})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param, response.text
    assert not engine.calls
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_responses_text_format_json_schema_is_the_chat_json_schema() -> None:
    engine = ScriptedEngine(["x"])
    fmt = {"type": "json_schema", "name": "A", "schema": SCHEMA, "strict": True}
    response = make_client(engine).post("/v1/responses", json={"model": MODEL, "input": "Q", "text": {"format": fmt}})
    assert response.status_code == 200, response.text
    assert engine.calls[0][1].structured_output == StructuredOutput("json", json.dumps(SCHEMA))
    assert response.json()["text"] == {"format": fmt}


def test_responses_text_format_errors_name_text_format() -> None:
    fmt = {"type": "json_schema", "name": "A", "schema": {"type": "nope"}}
    response = make_client(ScriptedEngine(["x"])).post("/v1/responses",
                                                        json={"model": MODEL, "input": "Q", "text": {"format": fmt}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "text.format.schema"
