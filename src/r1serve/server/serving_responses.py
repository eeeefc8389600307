"""`POST /v1/responses`: OpenAI's Responses API on the chat pipeline, for text input and a reasoning model.

A Responses request is turned into the chat request it means (`instructions` as a system message, so rule 1
folds it as it folds any system prompt; `input` as the conversation; `max_output_tokens` as `max_tokens`;
`reasoning.effort` as `reasoning_effort`), and from there it is a chat completion: the same policy, template,
length checks and engine call. Only the output is shaped differently: the reasoning (rule 5) becomes a
`reasoning` item with `reasoning_text` content and the answer a `message` item with `output_text` content. A
stream sends the Responses event types, each with its `sequence_number`, and ends with `data: [DONE]` as every
r1serve stream does (the `openai` SDK stops there). Fields for tools or server-side state are a 400 naming the
field: nothing here stores a response or calls a tool.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from r1serve.server.errors import APIError, bad_request
from r1serve.server.policy import PolicyRecord
from r1serve.server.protocol import ChatCompletionRequest, ChatCompletionResponse, UsageInfo
from r1serve.server.protocol_responses import (
    IncompleteDetails,
    InputTokensDetails,
    MessageItem,
    OutputText,
    OutputTokensDetails,
    ReasoningEcho,
    ReasoningItem,
    ReasoningText,
    ResponseObject,
    ResponsesRequest,
    ResponsesUsage,
)
from r1serve.server.serving_chat import ChatJob, SampleStream, chat_response, prepare_chat, stream_error_event
from r1serve.server.serving_common import (
    Admission,
    FinalOutputs,
    make_usage,
    metered_outputs,
    policy_headers,
    run_to_end,
)
from r1serve.server.sse import SSE_DONE, SSEResponse, sse_event
from r1serve.server.state import EngineClient, ServerState

CHAT_TO_RESPONSES_PARAM = {"messages": "input", "max_tokens": "max_output_tokens"}


def check_unsupported(request: ResponsesRequest) -> None:
    """400 for the Responses features r1serve does not implement, naming the field."""
    refused = {
        "tools": bool(request.tools), "tool_choice": request.tool_choice is not None,
        "parallel_tool_calls": bool(request.parallel_tool_calls),
        "previous_response_id": request.previous_response_id is not None,
        "conversation": request.conversation is not None, "store": bool(request.store),
        "background": bool(request.background), "include": bool(request.include),
        "prompt": request.prompt is not None, "truncation": request.truncation == "auto",
        "top_logprobs": request.top_logprobs is not None, "max_tool_calls": request.max_tool_calls is not None,
    }
    for name, bad in refused.items():
        if bad:
            raise bad_request(f"`{name}` is not supported by r1serve's /v1/responses (text in, reasoning and text "
                              "out; nothing is stored)", param=name, code="unsupported")


def chat_request(request: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request a Responses request means."""
    messages = [{"role": "user", "content": request.input}] if isinstance(request.input, str) else [
        m.to_chat() for m in request.input]
    if request.instructions is not None:
        messages.insert(0, {"role": "system", "content": request.instructions})
    chat = {
        "model": request.model, "messages": messages, "max_tokens": request.max_output_tokens,
        "temperature": request.temperature, "top_p": request.top_p,
        "max_thinking_tokens": request.max_thinking_tokens, "ignore_eos": request.ignore_eos,
        "reasoning_effort": request.reasoning.effort if request.reasoning else None,
        "response_format": response_format(request.text),
    }
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:  # only text.format can fail here: the other fields are checked already
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"][1:])
        raise bad_request(f"text.format{'.' + where if where else ''}: {error['msg']}",
                          param="text.format") from exc


def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat's `response_format` for the Responses API's `text.format`, which writes the json_schema flat."""
    fmt = (text or {}).get("format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return fmt
    return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}


async def _prepare(request: ResponsesRequest, engine: EngineClient, state: ServerState, record: PolicyRecord,
                   request_id: str) -> ChatJob:
    """The chat job, with errors naming the Responses fields (`input`, not `messages`)."""
    try:
        return await prepare_chat(chat_request(request), engine, state, record, request_id)
    except APIError as exc:
        param = exc.param or ""
        if param.startswith("response_format"):  # text.format writes json_schema's fields flat
            exc.param = "text.format" + param.removeprefix("response_format").removeprefix(".json_schema")
        else:
            exc.param = CHAT_TO_RESPONSES_PARAM.get(param, exc.param)
        raise


async def create_response(request: ResponsesRequest, raw_request: Request, state: ServerState) -> Response:
    state.check_model(request.model)
    engine = state.require_engine()
    check_unsupported(request)
    record = PolicyRecord()
    with Admission(state, f"resp_{uuid.uuid4().hex}") as admission:
        job = await _prepare(request, engine, state, record, admission.request_id)
        shell = response_shell(request, job)
        if request.stream:
            return SSEResponse(ResponsesStream(engine, job, state, shell).events(), headers=policy_headers(record),
                               on_close=admission.hand_over())
        final = await run_to_end(engine, job.prompt_token_ids, job.params, job.request_id, state, raw_request)
    body = full_response(shell, chat_response(job, final, engine.tokenizer))
    return JSONResponse(body.model_dump(), headers=policy_headers(record))


def response_shell(request: ResponsesRequest, job: ChatJob) -> ResponseObject:
    """The response before any output: what every event of a stream and the full answer share."""
    return ResponseObject(
        id=job.request_id, created_at=int(time.time()), model=request.model, status="in_progress",
        instructions=request.instructions, max_output_tokens=request.max_output_tokens,
        temperature=job.params.temperature, top_p=job.params.top_p, output=[],
        reasoning=ReasoningEcho(effort=request.reasoning.effort if request.reasoning else None),
        metadata=request.metadata or {}, user=request.user,
        **({"text": {"format": request.text["format"]}} if request.text and request.text.get("format") else {}))


def status_of(finish_reason: str | None) -> dict[str, Any]:
    """`status` and `incomplete_details` for a finish reason: only `stop` is complete."""
    if finish_reason == "stop":
        return {"status": "completed", "incomplete_details": None}
    details = IncompleteDetails(reason="max_output_tokens") if finish_reason == "length" else None
    return {"status": "incomplete", "incomplete_details": details}


def usage_of(usage: UsageInfo) -> ResponsesUsage:
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    reasoning = usage.completion_tokens_details.reasoning_tokens if usage.completion_tokens_details else 0
    return ResponsesUsage(input_tokens=usage.prompt_tokens, input_tokens_details=InputTokensDetails(
        cached_tokens=cached), output_tokens=usage.completion_tokens, output_tokens_details=OutputTokensDetails(
        reasoning_tokens=reasoning), total_tokens=usage.total_tokens)


def full_response(shell: ResponseObject, chat: ChatCompletionResponse) -> ResponseObject:
    """The whole answer: a reasoning item (when there is reasoning), then the message item."""
    choice = chat.choices[0]
    status = status_of(choice.finish_reason)
    item_status = "completed" if status["status"] == "completed" else "incomplete"
    output: list[Any] = []
    if choice.message.reasoning_content:
        output.append(ReasoningItem(id=f"rs_{shell.id[5:]}", status=item_status,
                                    content=[ReasoningText(text=choice.message.reasoning_content)]))
    output.append(MessageItem(id=f"msg_{shell.id[5:]}", status=item_status,
                              content=[OutputText(text=choice.message.content or "")]))
    return shell.model_copy(update={**status, "output": output, "usage": usage_of(chat.usage)})


class ResponsesStream:
    """The events of one streamed response: items opened and closed as the output turns from reasoning to
    answer, a delta event per piece of text, and the finished response last."""

    def __init__(self, engine: EngineClient, job: ChatJob, state: ServerState, shell: ResponseObject) -> None:
        self.engine, self.job, self.state, self.shell = engine, job, state, shell
        self.sequence_number = 0
        self.items: list[ReasoningItem | MessageItem] = []  # the last one is open until closed
        self.open = False
        self.finish_reason: str | None = None

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {kind}\n" + sse_event(data)

    def _item_fields(self) -> dict[str, Any]:
        return {"item_id": self.items[-1].id, "output_index": len(self.items) - 1, "content_index": 0}

    def _open(self, kind: str) -> list[str]:
        suffix = self.shell.id[5:]
        item = (ReasoningItem(id=f"rs_{suffix}", status="in_progress") if kind == "reasoning"
                else MessageItem(id=f"msg_{suffix}", status="in_progress"))
        self.items.append(item)
        self.open = True
        part = {"type": "reasoning_text", "text": ""} if kind == "reasoning" else OutputText(text="").model_dump()
        return [self.event("response.output_item.added", output_index=len(self.items) - 1,
                           item=item.model_dump()),
                self.event("response.content_part.added", part=part, **self._item_fields())]

    def _close(self, status: str) -> list[str]:
        if not self.open:
            return []
        self.open = False
        item = self.items[-1]
        text = "".join(part.text for part in item.content)
        item.status = status  # type: ignore[assignment]
        done = ("response.reasoning_text.done" if isinstance(item, ReasoningItem) else "response.output_text.done")
        extra = {} if isinstance(item, ReasoningItem) else {"logprobs": []}
        part = item.content[0].model_dump() if item.content else {}
        return [self.event(done, text=text, **extra, **self._item_fields()),
                self.event("response.content_part.done", part=part, **self._item_fields()),
                self.event("response.output_item.done", output_index=len(self.items) - 1, item=item.model_dump())]

    def text(self, kind: str, delta: str) -> list[str]:
        """Events for a piece of reasoning or answer text, opening (and closing) items as needed."""
        events: list[str] = []
        if not (self.open and isinstance(self.items[-1], ReasoningItem) == (kind == "reasoning")):
            events += self._close("completed") + self._open(kind)
        item = self.items[-1]
        if isinstance(item, ReasoningItem):
            item.content = [ReasoningText(text=(item.content[0].text if item.content else "") + delta)]
            return [*events, self.event("response.reasoning_text.delta", delta=delta, **self._item_fields())]
        item.content = [OutputText(text=(item.content[0].text if item.content else "") + delta)]
        return [*events, self.event("response.output_text.delta", delta=delta, logprobs=[], **self._item_fields())]

    def finish(self, usage: UsageInfo) -> list[str]:
        """Close the last item (an answer always has a message item, if empty), then the whole response."""
        status = status_of(self.finish_reason)
        item_status = "completed" if status["status"] == "completed" else "incomplete"
        events = []
        if not self.items or isinstance(self.items[-1], ReasoningItem):
            events += self._close(item_status) + self._open("message")
            self.items[-1].content = [OutputText(text="")]
        events += self._close(item_status)
        body = self.shell.model_copy(update={**status, "output": list(self.items), "usage": usage_of(usage)})
        kind = "response.completed" if status["status"] == "completed" else "response.incomplete"
        return [*events, self.event(kind, response=body.model_dump())]

    async def events(self) -> AsyncIterator[str]:
        job, final = self.job, FinalOutputs()
        sample_stream = SampleStream(job.in_reasoning)
        outputs = metered_outputs(self.engine, job.prompt_token_ids, job.params, job.request_id, self.state, final)
        try:
            yield self.event("response.created", response=self.shell.model_dump())
            yield self.event("response.in_progress", response=self.shell.model_dump())
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    for sample in output.outputs:
                        for event in self._on_sample(sample_stream, sample):
                            yield event
        except Exception as exc:  # the status line is sent already: report in-band, keep the server up
            yield stream_error_event(job.request_id, exc)
            yield SSE_DONE
            return
        samples = final.ordered()
        num_reasoning = sum(sample_stream.reasoning_tokens(s, self.engine.tokenizer) for s in samples)
        for event in self.finish(make_usage(final.prompt_token_ids, samples, final.num_cached_tokens,
                                            num_reasoning)):
            yield event
        yield SSE_DONE

    def _on_sample(self, sample_stream: SampleStream, sample: Any) -> list[str]:
        events: list[str] = []
        for choice in sample_stream.choices(sample, self.job.split, alias=False):
            delta = choice["delta"]
            if delta.get("reasoning_content"):
                events += self.text("reasoning", delta["reasoning_content"])
            if delta.get("content"):
                events += self.text("message", delta["content"])
            if choice["finish_reason"]:
                self.finish_reason = choice["finish_reason"]
        return events
