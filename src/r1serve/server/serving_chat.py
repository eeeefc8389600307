"""`POST /v1/chat/completions`: a conversation in, the R1 answer out, with the usage rules applied.

The messages go through the policy (rules 1, 3, 4), the model's chat template and the length checks; the
output is split into `reasoning_content` (also sent as `reasoning`, vLLM's name) and `content` (rule 5), in
full responses and in stream deltas, and `usage.completion_tokens_details.reasoning_tokens` counts the tokens
of reasoning. A stream sends one chunk per piece of reasoning or answer (never both in one chunk), a chunk
with the `finish_reason` of each sample, the usage if asked, and `[DONE]`. A sample's first chunk also
carries its `role`, as vLLM's does: nothing goes out before prefill, so a client timing the first chunk
measures a true time to first token. With `logprobs`, they cover every output token, reasoning included (as
vLLM's do): a full response lists them all in `choices[].logprobs.content`, and a stream chunk carries those of
the tokens that arrived since the sample's previous chunk.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from r1serve.outputs import CompletionOutput, TextBuffer
from r1serve.r1_rules import ReasoningSplitter, split_reasoning
from r1serve.sampling_params import SamplingParams
from r1serve.server.errors import APIError, bad_request, error_body
from r1serve.server.logprobs import chat_logprobs, vllm_prompt_logprobs
from r1serve.server.policy import PolicyRecord, apply_message_rules
from r1serve.server.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ResponseMessage,
    chat_choice,
    chat_chunk,
)
from r1serve.server.reasoning import count_reasoning_tokens, reasoning_fields
from r1serve.server.serving_common import (
    Admission,
    FinalOutputs,
    build_sampling_params,
    check_fits,
    check_text_length,
    check_unsupported,
    encode_bounded,
    engine_error,
    make_usage,
    metered_outputs,
    off_loop,
    policy_headers,
    run_to_end,
)
from r1serve.server.sse import SSE_DONE, TEXT_SLOT, EventTemplate, SSEResponse, sse_event
from r1serve.server.state import EngineClient, ServerState
from r1serve.server.structured import structured_output_of

logger = logging.getLogger("r1serve.server")


@dataclass(frozen=True)
class ChatJob:
    """One accepted chat request, ready for the engine."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    split: bool  # rule 5 on
    alias: bool  # the reasoning also as `reasoning`
    in_reasoning: bool  # the prompt ends inside <think> (rule 3 on and the tokenizer has the token)
    include_usage: bool


async def prepare_chat(request: ChatCompletionRequest, engine: EngineClient, state: ServerState,
                       record: PolicyRecord, request_id: str) -> ChatJob:
    """Policy, chat template, sampling parameters and length checks; any problem is a 400. The template and
    the tokenizer run on a worker thread."""
    check_unsupported(request)
    messages = apply_message_rules([m.to_template() for m in request.messages], state.policy, record)
    tokenizer = engine.tokenizer
    num_chars = sum(len(m["content"] or "") for m in messages)
    check_text_length(num_chars, tokenizer, engine.max_model_len, "messages")
    params = build_sampling_params(request, state, record, engine.tokenizer.vocab_size,
                                   await structured_output_of(request))
    prompt_token_ids = await off_loop(_encode_chat, tokenizer, messages, state.policy.force_thinking,
                                      engine.max_model_len)
    check_fits(len(prompt_token_ids), params.max_tokens, engine.max_model_len, "messages")
    if state.policy.reasoning_split:
        record.add("reasoning-split")
    in_reasoning = state.policy.force_thinking and tokenizer.think_start_id is not None
    return ChatJob(request_id, request.model, prompt_token_ids, params, state.policy.reasoning_split,
                   state.policy.reasoning_field_alias, in_reasoning, request.include_usage)


def _encode_chat(tokenizer: Any, messages: list[dict[str, Any]], force_thinking: bool,
                 max_model_len: int) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, force_thinking=force_thinking)
    except ValueError as exc:
        raise bad_request(str(exc), param="messages") from exc
    return encode_bounded(tokenizer.encode, text, tokenizer, max_model_len, "messages")


async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request,
                                 state: ServerState) -> Response:
    state.check_model(request.model)
    engine = state.require_engine()
    record = PolicyRecord()
    with Admission(state, f"chatcmpl-{uuid.uuid4().hex}") as admission:
        job = await prepare_chat(request, engine, state, record, admission.request_id)
        if not state.settings.disable_log_requests:
            logger.info("%s: chat, %d prompt tokens, n=%d, max_tokens=%s, stream=%s, policy=%s", job.request_id,
                        len(job.prompt_token_ids), job.params.n, job.params.max_tokens, request.stream,
                        record.header())
        if request.stream:
            return SSEResponse(chat_stream(engine, job, state), headers=policy_headers(record),
                               on_close=admission.hand_over())
        final = await run_to_end(engine, job.prompt_token_ids, job.params, job.request_id, state, raw_request)
    body = chat_response(job, final, engine.tokenizer)
    no_alias = None if job.alias else {"choices": {"__all__": {"message": {"reasoning"}}}}
    return JSONResponse(body.model_dump(exclude=no_alias), headers=policy_headers(record))


def chat_response(job: ChatJob, final: FinalOutputs, tokenizer: Any) -> ChatCompletionResponse:
    choices: list[ChatCompletionChoice] = []
    num_reasoning = 0
    for sample in final.ordered():
        reasoning, content, closed = split_reasoning(sample.text, job.in_reasoning)
        num_reasoning += count_reasoning_tokens(sample.token_ids, reasoning is not None, closed, reasoning or "",
                                                tokenizer.think_end_id, tokenizer.encode)
        message = (ResponseMessage(content=content, **reasoning_fields(reasoning, job.alias)) if job.split
                   else ResponseMessage(content=sample.text))
        logprobs = None if sample.logprobs is None else chat_logprobs(sample.token_ids, sample.logprobs, tokenizer)
        choices.append(ChatCompletionChoice(index=sample.index, message=message, finish_reason=sample.finish_reason,
                                            stop_reason=sample.stop_reason, logprobs=logprobs))
    usage = make_usage(final.prompt_token_ids, final.ordered(), final.num_cached_tokens, num_reasoning)
    k, prompt_logprobs = job.params.prompt_logprobs, None
    if k is not None and final.prompt_logprobs is not None:
        prompt_logprobs = vllm_prompt_logprobs(final.prompt_token_ids, final.prompt_logprobs, k, tokenizer)
    return ChatCompletionResponse(id=job.request_id, model=job.model, choices=choices, usage=usage,
                                  prompt_logprobs=prompt_logprobs)


class SampleStream:
    """The reasoning/answer state of one sample of a stream."""

    def __init__(self, in_reasoning: bool) -> None:
        self.splitter = ReasoningSplitter(in_reasoning)
        self.reasoning = TextBuffer()  # for the usage's reasoning-token count
        self.role_sent = False  # the sample's first chunk carries `role`
        self.pending_ids: list[int] = []  # tokens whose logprobs no chunk has carried yet
        self.pending_logprobs: list[Any] = []

    def with_logprobs(self, out: list[dict[str, Any]], sample: CompletionOutput, tokenizer: Any) -> None:
        """The first of `out` carries the logprobs of the tokens since the last chunk that carried some."""
        if sample.delta_logprobs is None:
            return
        self.pending_ids.extend(sample.delta_token_ids)
        self.pending_logprobs.extend(sample.delta_logprobs)
        if out and self.pending_ids:
            out[0]["logprobs"] = chat_logprobs(self.pending_ids, self.pending_logprobs, tokenizer)
            self.pending_ids, self.pending_logprobs = [], []

    def pieces(self, sample: CompletionOutput, split: bool) -> list[tuple[str, str]]:
        """The texts one output of this sample adds, each a chunk of its own: ("reasoning" or "content", text)."""
        parts = [self.splitter.feed(sample.delta_text)]
        if sample.finished:
            parts.append(self.splitter.flush())
        out: list[tuple[str, str]] = []
        for part in parts:
            self.reasoning.append(part.reasoning)
            if split and part.reasoning:
                out.append(("reasoning", part.reasoning))
            if split and part.content:
                out.append(("content", part.content))
        if not split and sample.delta_text:
            out.append(("content", sample.delta_text))
        return out

    def choices(self, sample: CompletionOutput, split: bool, alias: bool) -> list[dict[str, Any]]:
        """The stream choices one output of this sample produces, each a chunk of its own."""
        out = [chat_choice(sample.index, reasoning_fields(text, alias) if kind == "reasoning" else {"content": text})
               for kind, text in self.pieces(sample, split)]
        if sample.finished:
            out.append(chat_choice(sample.index, {}, sample.finish_reason, sample.stop_reason))
        if out and not self.role_sent:
            out[0]["delta"] = {"role": "assistant", **out[0]["delta"]}
            self.role_sent = True
        return out

    def events(self, sample: CompletionOutput, job: ChatJob, chunks: ChatChunks, tokenizer: Any) -> str:
        """The SSE events of one output of this sample, as one string (one socket write). A text-only chunk
        after the first (nearly every chunk) is filled into its template; the others are serialised whole."""
        if self.role_sent and not sample.finished and sample.delta_logprobs is None:
            return "".join([chunks.text(sample.index, kind, text) for kind, text in self.pieces(sample, job.split)])
        out = self.choices(sample, job.split, job.alias)
        self.with_logprobs(out, sample, tokenizer)
        return "".join([chunks.event([choice]) for choice in out])

    def reasoning_tokens(self, sample: CompletionOutput, tokenizer: Any) -> int:
        return count_reasoning_tokens(sample.token_ids, self.splitter.has_reasoning, self.splitter.closed,
                                      str(self.reasoning), tokenizer.think_end_id, tokenizer.encode)


class ChatChunks:
    """The SSE events of one chat stream: any chunk serialised whole (`event`), or a text chunk filled into the
    template of its sample and field (`text`), made on first use; the bytes are the same either way."""

    def __init__(self, job: ChatJob, created: int) -> None:
        self.request_id, self.created, self.model, self.alias = job.request_id, created, job.model, job.alias
        self._templates: dict[tuple[int, str], EventTemplate] = {}

    def event(self, choices: list[dict[str, Any]], usage: Any = None) -> str:
        return sse_event(chat_chunk(self.request_id, self.created, self.model, choices, usage))

    def text(self, index: int, kind: str, text: str) -> str:
        """The chunk of one text of sample `index`: its reasoning (`kind` "reasoning") or its answer."""
        template = self._templates.get((index, kind))
        if template is None:
            delta = reasoning_fields(TEXT_SLOT, self.alias) if kind == "reasoning" else {"content": TEXT_SLOT}
            template = EventTemplate(chat_chunk(self.request_id, self.created, self.model,
                                                [chat_choice(index, delta)]))
            self._templates[(index, kind)] = template
        return template.fill(text)


async def chat_stream(engine: EngineClient, job: ChatJob, state: ServerState) -> AsyncIterator[str]:
    """The SSE events of a streamed chat completion: one string per engine output (its events together), the
    last output's with the usage and `[DONE]`."""
    samples = {i: SampleStream(job.in_reasoning) for i in range(job.params.n)}
    chunks = ChatChunks(job, int(time.time()))
    final = FinalOutputs()
    tail = ""  # the finished output's events, sent with what ends the stream
    outputs = metered_outputs(engine, job.prompt_token_ids, job.params, job.request_id, state, final)
    try:
        async with contextlib.aclosing(outputs):
            async for output in outputs:
                text = "".join([samples[sample.index].events(sample, job, chunks, engine.tokenizer)
                                for sample in output.outputs])
                if output.finished:
                    tail = text
                elif text:
                    yield text
    except Exception as exc:  # the status line is sent already: report in-band, keep the server up
        yield tail + stream_error_event(job.request_id, exc) + SSE_DONE
        return
    if job.include_usage:
        num_reasoning = sum(samples[s.index].reasoning_tokens(s, engine.tokenizer) for s in final.ordered())
        tail += chunks.event([], make_usage(final.prompt_token_ids, final.ordered(), final.num_cached_tokens,
                                            num_reasoning))
    yield tail + SSE_DONE


def stream_error_event(request_id: str, exc: Exception) -> str:
    """An error inside a started stream, as an OpenAI-shaped `data:` event (logged once here)."""
    error = engine_error(exc)
    if isinstance(error, APIError):
        logger.info("%s: ended with %d: %s", request_id, error.status_code, error.message)
        return sse_event(error.body())
    logger.exception("%s: engine failure while streaming", request_id)
    return sse_event(error_body(f"the engine failed while serving this request ({type(exc).__name__}); "
                                "the error is logged on the server", "internal_server_error"))
