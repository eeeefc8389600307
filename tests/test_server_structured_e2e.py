"""Structured output against the real server (tiny random model, real tokenizer) through the `openai` SDK: the
answer after `</think>` parses against its schema whatever the random weights want, the reasoning stays free,
free requests sample the same tokens beside constrained ones, and a bad schema is a 400."""

from __future__ import annotations

import concurrent.futures
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from server_utils import ServerHandle, running_server

openai = pytest.importorskip("openai")
pytest.importorskip("xgrammar")

MODEL = "DeepSeek-R1-Distill-Qwen-1.5B"
MESSAGES = [{"role": "user", "content": "Is 7 prime?"}]
THINK = {"max_thinking_tokens": 4}  # random weights never write </think>: the budget closes the reasoning


class Verdict(BaseModel):
    prime: bool
    confidence: Literal["low", "high"]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[ServerHandle]:
    # float32: free outputs are compared alone and in other batches (bf16's rounding could tip a near-tied draw)
    with running_server(tiny_model_dir, "--max-num-seqs", "8", "--dtype", "float32") as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> Any:
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)


@pytest.mark.slow  # builds the vocabulary's tables, then ~100 JSON tokens
def test_parse_with_a_pydantic_model_returns_the_model_and_free_reasoning(client: Any) -> None:
    completion = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Verdict,
                                               max_tokens=400, seed=3, extra_body=THINK)
    message = completion.choices[0].message
    assert isinstance(message.parsed, Verdict)
    assert Verdict.model_validate_json(message.content) == message.parsed
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and len(reasoning) >= 1  # the budget's reasoning: whatever the model wrote


@pytest.mark.slow
def test_a_streamed_json_schema_answer_parses(client: Any) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=400, seed=5, stream=True, extra_body=THINK,
        response_format={"type": "json_schema", "json_schema": {"name": "N", "schema": schema}})
    content = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert 0 <= json.loads(content)["n"] <= 9


@pytest.mark.parametrize(("extra", "pattern"), [
    ({"guided_choice": ["alpha", "beta"]}, "alpha|beta"),
    ({"guided_regex": "[0-9]{3}-[a-c]{2}"}, "[0-9]{3}-[a-c]{2}"),
    ({"structured_outputs": {"grammar": 'root ::= "x" [0-9] [0-9]'}}, "x[0-9]{2}"),
])
def test_guided_choice_regex_and_grammar_shape_the_answer(client: Any, extra: dict[str, Any], pattern: str) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=60, seed=1,
                                                extra_body={**THINK, **extra})
    choice = completion.choices[0]
    assert re.fullmatch(pattern, choice.message.content) and choice.finish_reason == "stop"


def test_a_completion_without_think_is_constrained_from_its_first_token(client: Any) -> None:
    completion = client.completions.create(model=MODEL, prompt="The answer:", max_tokens=30, seed=2,
                                           extra_body={"guided_regex": "(yes|no)!"})
    assert re.fullmatch("(yes|no)!", completion.choices[0].text)


@pytest.mark.slow
def test_free_outputs_are_the_same_beside_constrained_requests(client: Any) -> None:
    def free(seed: int) -> str:
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, seed=seed,
                                              extra_body=THINK).choices[0].message.content

    def guided(seed: int) -> str:
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, seed=seed,
                                              extra_body={**THINK, "guided_regex": "[a-z]{8}"}
                                              ).choices[0].message.content

    alone = [free(seed) for seed in (11, 12)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        mixed = [pool.submit(free, 11), pool.submit(guided, 21), pool.submit(free, 12), pool.submit(guided, 22)]
        results = [future.result() for future in mixed]
    assert [results[0], results[2]] == alone
    assert all(re.fullmatch("[a-z]{8}", text) for text in (results[1], results[3]))


def test_an_invalid_schema_is_a_400_through_the_sdk(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "integer", "minimum": "x"}}})
    assert info.value.body["param"] == "response_format.json_schema.schema"
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices
