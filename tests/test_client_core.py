"""The client's sans-IO core driven by hand: each operation yields the I/O it needs and is sent the result,
so retries, the auto fold and health decisions are tested without a server, a socket or a clock."""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import pytest

from r1serve.client import ClientConnectionError, ClientTimeoutError
from r1serve.client.core import ClientCore, CreateChat, Get, Op, Sleep
from r1serve.client.retry import RetryPolicy
from r1serve.client.settings import ClientSettings

MODELS = {"object": "list", "data": [{"id": "m", "object": "model"}]}


def _refused() -> openai.APIConnectionError:
    return openai.APIConnectionError(request=httpx2.Request("GET", "http://fake/v1/models"))


def drive(op: Op[Any], answers: list[Any]) -> tuple[Any, list[Any]]:
    """Run `op`, answering its effects in order (an exception in `answers` is raised at the effect)."""
    effects: list[Any] = []
    try:
        effect = next(op)
        while True:
            effects.append(effect)
            answer = answers.pop(0)
            effect = op.throw(answer) if isinstance(answer, BaseException) else op.send(answer)
    except StopIteration as stop:
        return stop.value, effects


def core(**kw: Any) -> ClientCore:
    kw.setdefault("retry", RetryPolicy(max_retries=2, backoff_base=1.0, jitter=0.0))
    return ClientCore(ClientSettings(base_url="http://fake:8000", **kw))


def test_a_refused_connection_is_retried_after_a_backoff() -> None:
    models, effects = drive(core().list_models(), [_refused(), None, _refused(), None, MODELS])
    assert models == ["m"]
    assert effects == [Get("http://fake:8000/v1/models"), Sleep(1.0), Get("http://fake:8000/v1/models"),
                       Sleep(2.0), Get("http://fake:8000/v1/models")]


def test_retries_run_out_as_a_typed_error() -> None:
    with pytest.raises(ClientConnectionError, match="cannot connect"):
        drive(core().list_models(), [_refused(), None, _refused(), None, _refused()])


def test_the_request_asks_the_server_what_it_is_once_then_folds_for_others() -> None:
    client = core()
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    op = client.open_stream(messages, {"temperature": 0.6, "max_thinking_tokens": 8})
    effect = next(op)
    assert effect == Get("http://fake:8000/version")
    effect = op.send({"name": "other"})
    assert effect == Get("http://fake:8000/v1/models")
    effect = op.send(MODELS)
    assert isinstance(effect, CreateChat)
    assert effect.kwargs["messages"] == [{"role": "user", "content": "S\n\nU"}]
    assert effect.kwargs["temperature"] == 0.6 and effect.kwargs["extra_body"] == {"max_thinking_tokens": 8}
    assert client.info is not None and not client.info.is_r1serve and client.model == "m"


def test_wait_until_ready_polls_and_gives_up_with_the_last_problem() -> None:
    op = core().wait_until_ready(timeout_s=0.0, poll_s=0.1)
    with pytest.raises(ClientTimeoutError, match="not ready after 0 s"):
        next(op)
