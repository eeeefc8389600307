"""Property-based fuzzing of the real server, generated from its own `/openapi.json` with schemathesis.

A tiny-model `r1serve serve` runs on 127.0.0.1 (a 64-token context, so every generation is short), and
schemathesis sends it requests drawn from the document the server publishes: bodies that fit the schema
(with the served model name put in, so they reach the engine) and bodies that break it. Every response
must be documented: no 5xx, a status the operation lists, a content type it lists, a body that matches the
model of that status; a body that breaks the schema must be refused with a 4xx; a stream must end with
`[DONE]` and carry no internal error. At the end the server is healthy, every KV block is free and its log
holds no traceback.

The default run is a few hundred cases (under a minute on a 2-core CPU). For a longer run, set the number of
examples per operation: `R1SERVE_FUZZ_EXAMPLES=2000 pytest tests/test_api_fuzz.py` (the default is 50).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from r1serve.server import ServerSettings, create_app
from r1serve.server.sse import parse_sse_data
from server_utils import ServerHandle, running_server

MODEL = "DeepSeek-R1-Distill-Qwen-1.5B"
STATUSES: dict[str, Counter[int]] = {}  # route -> status -> responses, over the run
EXAMPLES = int(os.environ.get("R1SERVE_FUZZ_EXAMPLES", "50"))
MAX_MODEL_LEN = 32
OUTPUT_CAP = 4  # most tokens a generated request may ask for: the sampler is ~50 ms a token on this CPU
SERVER_ARGS = ("--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "2",
               "--max-thinking-tokens", "2")
REQUEST_TIMEOUT_S = 30.0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[ServerHandle]:
    with running_server(tiny_model_dir, *SERVER_ARGS) as handle:
        yield handle
        assert_clean_end(handle)


def served_document() -> dict[str, Any]:
    """The document the server publishes, built by the same code in-process: the tests are generated at import,
    before the server starts (`test_fuzzed_document_is_the_served_one` checks they agree)."""
    return create_app(None, ServerSettings(model=MODEL)).openapi()


schema = schemathesis.openapi.from_dict(served_document())


def content_type(response: Any) -> str:
    """schemathesis' responses hold each header as a list of values."""
    values = {name.lower(): value for name, value in response.headers.items()}.get("content-type", [""])
    return values[0] if isinstance(values, list) else str(values)


def not_a_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 5xx, and no internal error sent inside a stream (its status was 200 already)."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if content_type(response).startswith("text/event-stream"):
        events = parse_sse_data(response.text.split("\n"))  # not splitlines: U+2028 may be in the text
        complete = not response.stream_cut_short  # schemathesis stops reading after 20 events
        assert events and (events[-1] == "[DONE]" or not complete), f"no [DONE]: {response.text[-500:]}"
        errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
        assert not [e for e in errors if e.get("type") == "internal_server_error"], errors
    return None


def every_400_has_a_code(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code == 400:
        error = response.json()["error"]
        assert error["code"], f"400 without a code: {error}"
    return None


def aim_at_the_engine(case: Any) -> None:
    """Generated model names are unknown (404): in a body that fits the schema, put the served name in, so the
    request reaches the engine, and cap the output at OUTPUT_CAP tokens where it would fit the context (a larger
    value is left as it is: it is refused at once). A body that breaks the schema is refused by validation before
    either counts, so it is left alone."""
    positive = case.meta is not None and not case.meta.generation.mode.is_negative
    body = case.body
    if not (positive and isinstance(body, dict) and isinstance(body.get("model"), str)):
        return
    body["model"] = MODEL
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if body.get(field) is None or body[field] <= MAX_MODEL_LEN:
            body[field] = min(body.get(field) or OUTPUT_CAP, OUTPUT_CAP)
    if "messages" not in body:
        body.pop("max_completion_tokens")  # a chat field
    if "input" not in body:
        body.pop("max_output_tokens")  # a Responses field


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, print_blob=True,
          suppress_health_check=list(HealthCheck))
def test_server_answers_as_its_openapi_document_says(case: Any, server: ServerHandle) -> None:
    aim_at_the_engine(case)
    response = case.call_and_validate(
        base_url=server.url,
        checks=[status_code_conformance, content_type_conformance, response_schema_conformance,
                negative_data_rejection, not_a_server_error, every_400_has_a_code],
        timeout=REQUEST_TIMEOUT_S)
    STATUSES.setdefault(f"{case.method} {case.path}", Counter())[response.status_code] += 1


def assert_clean_end(server: ServerHandle) -> None:
    """After the run: still healthy, no request left in the engine, every KV block free, no traceback."""
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    deadline = time.monotonic() + 20.0
    while True:
        figures = engine_gauges(server)
        if figures["running"] == figures["waiting"] == 0 and figures["free"] == figures["total"]:
            break
        assert time.monotonic() < deadline, f"engine not idle after the run: {figures}"
        time.sleep(0.2)
    log = server.read_log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-5000:]


def engine_gauges(server: ServerHandle) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    names = {"running": "r1serve_num_requests_running", "waiting": "r1serve_num_requests_waiting",
             "free": "r1serve_kv_cache_free_blocks", "total": "r1serve_kv_cache_total_blocks"}
    figures = {}
    for key, name in names.items():
        match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
        assert match, f"{name} not in /metrics"
        figures[key] = float(match.group(1))
    return figures


def test_fuzzed_document_is_the_served_one(server: ServerHandle) -> None:
    served = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert served == json.loads(json.dumps(served_document()))
    assert set(served["paths"]) == {"/health", "/version", "/metrics", "/v1/models", "/v1/chat/completions",
                                    "/v1/completions", "/v1/responses", "/tokenize", "/detokenize"}


def test_the_fuzz_reached_the_engine_and_the_validation(server: ServerHandle) -> None:
    """Runs after the fuzz (same module, file order): the cases did not all stop at one gate. It takes the
    server fixture so that it skips where the fuzz did (no tokenizer on a fresh clone)."""
    print({route: dict(counts) for route, counts in STATUSES.items()})
    for route in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/responses"):
        counts = STATUSES.get(route, Counter())
        assert counts[200] >= 5 and counts[400] >= 5, (route, counts)
