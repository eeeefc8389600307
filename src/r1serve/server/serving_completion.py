"""`POST /v1/completions`: raw text (or token ids) in, continuation out, streamed or not.

Text completions bypass the chat template, so rules 1, 3, 4 and 5 do not apply (the caller writes the whole
prompt, `<think>` included if wanted, and gets the raw text back); the sampling rules 2, 7 and 8 do. A text
prompt gets the tokenizer's BOS, as Hugging Face and vLLM add it; a token-id prompt is used as given. `echo`
puts the prompt text (a token-id prompt decoded) before each choice's text, and with `logprobs` the prompt
tokens' logprobs before the output's (server/logprobs.py), in full responses and in a stream's first chunk of
each choice. `max_tokens: 0` with `echo` returns the prompt alone (finish_reason "length", no completion
tokens), as OpenAI's legacy API did for scoring a prompt: the engine samples one token, which is dropped.
vLLM's `prompt_logprobs` fills each choice's `prompt_logprobs` in full responses.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from r1serve.engine.validation import check_token_ids
from r1serve.errors import InvalidRequestError
from r1serve.outputs import CompletionOutput
from r1serve.sampling_params import SamplingParams
from r1serve.server.errors import bad_request
from r1serve.server.logprobs import CompletionLogprobs, join_completion_logprobs, vllm_prompt_logprobs
from r1serve.server.policy import PolicyRecord
from r1serve.server.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    completion_choice,
    completion_chunk,
)
from r1serve.server.serving_chat import stream_error_event
from r1serve.server.serving_common import (
    Admission,
    FinalOutputs,
    build_sampling_params,
    check_fits,
    check_text_length,
    check_unsupported,
    encode_bounded,
    make_usage,
    metered_outputs,
    off_loop,
    policy_headers,
    run_to_end,
)
from r1serve.server.sse import SSE_DONE, SSEResponse, sse_event
from r1serve.server.state import EngineClient, ServerState
from r1serve.server.structured import structured_output_of

logger = logging.getLogger("r1serve.server")


def prompt_token_ids(prompt: str | list[int] | list[str] | list[list[int]], tokenizer: Any,
                     max_model_len: int) -> list[int]:
    """The ids of a single prompt: text (with BOS; run it on a worker thread) or ids (checked against the
    vocabulary)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request(f"batched prompts are not supported yet (got {len(prompt)}); send one request "
                              "per prompt", param="prompt", code="unsupported")
        prompt = prompt[0]
    if isinstance(prompt, str):
        encode = functools.partial(tokenizer.encode, add_special_tokens=True)
        return encode_bounded(encode, prompt, tokenizer, max_model_len, "prompt") if prompt else []
    try:
        check_token_ids(prompt, int(tokenizer.vocab_size), "prompt")
    except InvalidRequestError as exc:
        raise bad_request(exc.message, param=exc.param, code=exc.code) from exc
    return list(prompt)


async def create_completion(request: CompletionRequest, raw_request: Request, state: ServerState) -> Response:
    state.check_model(request.model)
    engine = state.require_engine()
    check_unsupported(request)
    if request.max_tokens == 0 and not request.echo:
        raise bad_request("max_tokens must be at least 1 (0 only with echo: true, for the prompt alone)",
                          param="max_tokens")
    record = PolicyRecord()
    with Admission(state, f"cmpl-{uuid.uuid4().hex}") as admission:
        request_id = admission.request_id
        if isinstance(request.prompt, str):
            check_text_length(len(request.prompt), engine.tokenizer, engine.max_model_len, "prompt")
        params = build_sampling_params(request, state, record, engine.tokenizer.vocab_size,
                                       await structured_output_of(request))
        ids = await off_loop(prompt_token_ids, request.prompt, engine.tokenizer, engine.max_model_len)
        check_fits(len(ids), params.max_tokens, engine.max_model_len, "prompt")
        if not state.settings.disable_log_requests:
            logger.info("%s: completion, %d prompt tokens, n=%d, max_tokens=%s, stream=%s, policy=%s", request_id,
                        len(ids), params.n, params.max_tokens, request.stream, record.header())
        if request.stream:
            stream = completion_stream(engine, ids, params, request_id, request, state)
            return SSEResponse(stream, headers=policy_headers(record), on_close=admission.hand_over())
        final = await run_to_end(engine, ids, params, request_id, state, raw_request)
    echo = Echo(request, ids, engine.tokenizer)
    samples = [echo.view(s) for s in final.ordered()]
    prompt_logprobs = None
    if request.prompt_logprobs is not None and final.prompt_logprobs is not None:
        prompt_logprobs = vllm_prompt_logprobs(ids, final.prompt_logprobs, request.prompt_logprobs, engine.tokenizer)
    choices = [CompletionChoice(index=s.index, text=echo.text() + s.text, finish_reason=s.finish_reason,
                                stop_reason=s.stop_reason, logprobs=echo.logprobs(final, s),
                                prompt_logprobs=prompt_logprobs)
               for s in samples]
    usage = make_usage(final.prompt_token_ids, samples, final.num_cached_tokens, None)
    body = CompletionResponse(id=request_id, model=request.model, choices=choices, usage=usage)
    return JSONResponse(body.model_dump(), headers=policy_headers(record))


class Echo:
    """What `echo` and `logprobs` add to one choice: the prompt's text and logprobs first, then the output's."""

    def __init__(self, request: CompletionRequest, prompt_ids: list[int], tokenizer: Any) -> None:
        self.echo, self.asks, self.only = request.echo, request.logprobs is not None, request.echo_only
        self.k = request.logprobs or 0  # the prompt's records may hold more (a larger prompt_logprobs)
        self.prompt_ids, self.tokenizer = prompt_ids, tokenizer
        prompt = request.prompt[0] if isinstance(request.prompt, list) else request.prompt
        self.prompt_text = "" if not self.echo else prompt if isinstance(prompt, str) else tokenizer.decode(prompt_ids)

    def text(self) -> str:
        return self.prompt_text

    def view(self, sample: CompletionOutput) -> CompletionOutput:
        """The sample as the choice shows it: with `max_tokens: 0`, no output (its one token dropped)."""
        if not self.only:
            return sample
        empty = None if sample.logprobs is None else []
        return CompletionOutput(sample.index, "", [], "length" if sample.finished else None, None, "", [], empty,
                                empty)

    def prompt_entries(self, entries: list[Any]) -> list[Any]:
        """The prompt's records cut to the `logprobs` count asked."""
        return [e if e is None else (e[0], e[1][:self.k], e[2][:self.k], e[3]) for e in entries]

    def logprobs(self, final: FinalOutputs, sample: Any, whole: bool = True,
                 builder: CompletionLogprobs | None = None) -> dict[str, Any] | None:
        """The choice's `logprobs`: of the sample's tokens (all of them, or its delta), the prompt's first if
        echoed and `builder` has not started yet."""
        if not self.asks:
            return None
        builder = builder or CompletionLogprobs(self.tokenizer)
        parts = []
        if self.echo and builder.offset == 0 and final.prompt_logprobs is not None:
            parts.append(builder.build(self.prompt_ids, self.prompt_entries(final.prompt_logprobs)))
        ids, entries = (sample.token_ids, sample.logprobs) if whole else (sample.delta_token_ids,
                                                                           sample.delta_logprobs)
        parts.append(builder.build(ids, entries or []))
        return join_completion_logprobs(parts)


async def completion_stream(engine: EngineClient, ids: list[int], params: SamplingParams, request_id: str,
                            request: CompletionRequest, state: ServerState) -> AsyncIterator[str]:
    """The SSE events of a streamed text completion: text deltas, a finish chunk per sample, usage, [DONE]."""
    created = int(time.time())
    final = FinalOutputs()

    def event(choices: list[dict[str, Any]], usage: Any = None) -> str:
        return sse_event(completion_chunk(request_id, created, request.model, choices, usage))

    echo = Echo(request, ids, engine.tokenizer)
    choices = {i: StreamChoice(echo) for i in range(params.n)}
    outputs = metered_outputs(engine, ids, params, request_id, state, final)
    try:
        async with contextlib.aclosing(outputs):
            async for output in outputs:
                for sample in output.outputs:
                    for choice in choices[sample.index].choices(final, sample):
                        yield event([choice])
    except Exception as exc:  # the status line is sent already: report in-band, keep the server up
        yield stream_error_event(request_id, exc)
        yield SSE_DONE
        return
    if request.include_usage:
        samples = [echo.view(s) for s in final.ordered()]
        yield event([], make_usage(final.prompt_token_ids, samples, final.num_cached_tokens, None))
    yield SSE_DONE


@dataclass
class _Pending:
    """Tokens of a stream's choice not yet sent with logprobs (read as a sample's delta)."""

    delta_token_ids: list[int]
    delta_logprobs: list[Any]


class StreamChoice:
    """One choice of a text-completion stream: its text deltas (the echoed prompt before the first), each with the
    logprobs of the tokens since the previous chunk, then its finish chunk."""

    def __init__(self, echo: Echo) -> None:
        self.echo = echo
        self.builder = CompletionLogprobs(echo.tokenizer)
        self.started = False
        self.pending = _Pending([], [])

    def choices(self, final: FinalOutputs, sample: Any) -> list[dict[str, Any]]:
        sample = self.echo.view(sample)
        text = sample.delta_text
        if not self.started:
            text, self.started = self.echo.text() + text, True
        self.pending.delta_token_ids.extend(sample.delta_token_ids)
        self.pending.delta_logprobs.extend(sample.delta_logprobs or ())
        out = []
        if text:
            out.append(completion_choice(sample.index, text))
        if sample.finished:
            out.append(completion_choice(sample.index, "", sample.finish_reason, sample.stop_reason))
        if out and self.echo.asks and (self.pending.delta_token_ids or self.builder.offset == 0):
            out[0]["logprobs"] = self.echo.logprobs(final, self.pending, whole=False, builder=self.builder)
            self.pending = _Pending([], [])
        return out
