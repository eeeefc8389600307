"""The request fields that constrain an answer, read into the engine's one `StructuredOutput`.

Clients say "answer in this shape" in several dialects: OpenAI's `response_format` (`json_object`, `json_schema`),
vLLM's `structured_outputs` object and its older `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar` fields. They all mean one constraint, applied to the answer after `</think>` (never to the
reasoning). This module reads whichever the request sets (two at once are a 400 naming the second), refuses
the options r1serve does not implement, and checks the constraint before anything is queued: the grammar is
built without the tokenizer on a worker thread (a large schema takes a while), so that an invalid schema,
regex or grammar is a 400 naming its field. The engine compiles it against the vocabulary.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from r1serve.errors import InvalidRequestError
from r1serve.sampling_params import StructuredOutput
from r1serve.server.errors import bad_request
from r1serve.server.protocol import StructuredFields, StructuredOutputsField

BACKENDS = (None, "auto", "xgrammar")
Constraint = tuple[str, StructuredOutput]  # (the field that set it, the constraint)


def _json_spec(value: dict[str, Any] | str) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _from_response_format(fields: StructuredFields) -> list[Constraint]:
    fmt = fields.response_format
    if fmt is None or fmt.type == "text":
        return []
    if fmt.type == "json_object":
        return [("response_format", StructuredOutput("json_object"))]
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        param = "response_format.json_schema" + ("" if fmt.json_schema is None else ".schema")
        raise bad_request(f"{param} is required with response_format type json_schema", param=param)
    return [("response_format.json_schema.schema", StructuredOutput("json", json.dumps(fmt.json_schema.schema_)))]


def _from_structured_outputs(spec: StructuredOutputsField | None) -> list[Constraint]:
    if spec is None:
        return []
    refused = {"structural_tag": spec.structural_tag is not None, "disable_any_whitespace": spec.disable_any_whitespace,
               "disable_additional_properties": spec.disable_additional_properties,
               "whitespace_pattern": spec.whitespace_pattern is not None}
    for name, bad in refused.items():
        if bad:
            raise bad_request(f"structured_outputs.{name} is not supported", param=f"structured_outputs.{name}",
                              code="unsupported")
    found = _constraints("structured_outputs.{}", spec.json_, spec.regex, spec.choice, spec.grammar)
    if spec.json_object:
        found.append(("structured_outputs.json_object", StructuredOutput("json_object")))
    if not found:
        raise bad_request("structured_outputs needs one of json, regex, choice, grammar, json_object",
                          param="structured_outputs")
    return found


def _from_guided(fields: StructuredFields) -> list[Constraint]:
    if fields.guided_decoding_backend not in BACKENDS:
        raise bad_request(f"guided_decoding_backend {fields.guided_decoding_backend!r} is not available: r1serve "
                          "uses xgrammar", param="guided_decoding_backend", code="unsupported")
    if fields.guided_whitespace_pattern is not None:
        raise bad_request("guided_whitespace_pattern is not supported", param="guided_whitespace_pattern",
                          code="unsupported")
    return _constraints("guided_{}", fields.guided_json, fields.guided_regex, fields.guided_choice,
                        fields.guided_grammar)


def _constraints(field: str, json_spec: Any, regex: str | None, choice: list[str] | None,
                 grammar: str | None) -> list[Constraint]:
    """The json, regex, choice and grammar constraints set (in that order), each named by `field` with its kind
    filled in ("guided_{}" gives guided_json, ...)."""
    specs = {"json": None if json_spec is None else _json_spec(json_spec), "regex": regex,
             "choice": None if choice is None else json.dumps(choice), "grammar": grammar}
    return [(field.format(kind), StructuredOutput(kind, spec)) for kind, spec in specs.items() if spec is not None]


def requested_constraint(fields: StructuredFields) -> Constraint | None:
    """The one constraint the request sets (with the field that set it), or None; a 400 for two at once."""
    found = _from_response_format(fields) + _from_structured_outputs(fields.structured_outputs)
    found += _from_guided(fields)
    if len(found) > 1:
        raise bad_request(f"{found[0][0]} and {found[1][0]} both constrain the answer: set only one",
                          param=found[1][0], code="conflicting_structured_output")
    return found[0] if found else None


def check_constraint(constraint: Constraint) -> StructuredOutput:
    """The constraint, once its grammar builds (run it on a worker thread); else a 400 naming its field."""
    from r1serve.engine.grammar import check_structured_output

    param, output = constraint
    try:
        check_structured_output(output, param)
    except InvalidRequestError as exc:
        raise bad_request(exc.message, param=exc.param, code=exc.code) from exc
    return output


async def structured_output_of(fields: StructuredFields) -> StructuredOutput | None:
    """The request's checked constraint, or None; the check runs on a worker thread."""
    constraint = requested_constraint(fields)
    return None if constraint is None else await asyncio.to_thread(check_constraint, constraint)
