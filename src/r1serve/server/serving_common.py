"""What chat and text completions share: admission, request checks, tokenizing off the event loop, sampling
parameters under the policy, running a request to its end while watching for a client that leaves, and the
usage block.

Both endpoints admit a request (it counts against `--max-pending-requests` from then on, streamed or not), turn
it into a prompt and `SamplingParams`, refuse what cannot be served (a prompt over `--max-model-len`,
`max_tokens` that cannot fit, `n` over `--max-num-seqs`, token ids outside the vocabulary, features not
implemented) with a 400 that names the field, and hand the work to the engine. Tokenizing runs on a worker
thread, so one huge prompt never stalls the other requests, and a text that is certainly too long is refused
from its length alone (or from a probe of its beginning) without being tokenized whole. Keeping those steps
here means the two endpoints differ only in how they build the prompt and shape the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from r1serve.engine.validation import check_token_ids
from r1serve.errors import EngineDeadError, InvalidRequestError
from r1serve.outputs import CompletionOutput, RequestOutput
from r1serve.sampling_params import SamplingParams, StructuredOutput
from r1serve.server.errors import APIError, bad_request, unavailable
from r1serve.server.logprobs import requested_counts
from r1serve.server.policy import PolicyRecord, repetition_guard, sampling_defaults, thinking_budget
from r1serve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    CompletionTokensDetails,
    PromptTokensDetails,
    UsageInfo,
)
from r1serve.server.state import RETRY_AFTER_DEAD_S, EngineClient, ServerState

T = TypeVar("T")

logger = logging.getLogger("r1serve.server")

POLICY_HEADER = "x-r1serve-policy"
PROBE_CHARS_PER_TOKEN = 8  # a long text's first (max_model_len x this) characters are tokenized first


class ClientDisconnected(Exception):
    """The client went away before its (non-streamed) answer was ready; the request was aborted."""


def check_unsupported(request: ChatCompletionRequest | CompletionRequest) -> None:
    """400 for OpenAI features r1serve does not implement, rather than ignoring them silently."""
    if isinstance(request, ChatCompletionRequest):
        if request.tools:
            raise bad_request("tools / function calling are not supported", param="tools", code="unsupported")
        return
    if request.suffix:
        raise bad_request("suffix is not supported", param="suffix", code="unsupported")
    if request.best_of not in (None, request.n):
        raise bad_request("best_of is not supported (use n)", param="best_of", code="unsupported")


def check_fits(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, prompt_param: str) -> None:
    """400 when the prompt, or the prompt plus `max_tokens`, exceeds the context window."""
    if num_prompt_tokens == 0:
        raise bad_request(f"{prompt_param} is empty", param=prompt_param)
    if num_prompt_tokens >= max_model_len:
        raise bad_request(
            f"the prompt has {num_prompt_tokens} tokens, over this server's context window of {max_model_len} "
            "tokens (--max-model-len), which must also hold at least one output token",
            param=prompt_param, code="context_length_exceeded")
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise bad_request(
            f"max_tokens={max_tokens} does not fit: the prompt has {num_prompt_tokens} tokens and the context "
            f"window is {max_model_len} (--max-model-len), so at most {max_model_len - num_prompt_tokens}",
            param="max_tokens", code="context_length_exceeded")


def build_sampling_params(request: ChatCompletionRequest | CompletionRequest, state: ServerState,
                          record: PolicyRecord, vocab_size: int,
                          structured_output: StructuredOutput | None = None) -> SamplingParams:
    """`SamplingParams` of a request with the usage rules 2, 7 and 8 applied (and recorded); its stop ids are
    checked against the vocabulary here, before a stream's response starts. `structured_output` is the
    request's checked constraint (`server.structured.structured_output_of`)."""
    max_num_seqs = state.settings.max_num_seqs
    if request.n > max_num_seqs:
        raise bad_request(f"n={request.n} is more than this server runs at once (--max-num-seqs {max_num_seqs})",
                          param="n")
    temperature, top_p = sampling_defaults(request.temperature, request.top_p, state.policy, record)
    logprobs, prompt_logprobs = requested_counts(request, state.settings.max_logprobs)
    try:
        params = SamplingParams(
            n=request.n, temperature=temperature, top_p=top_p, top_k=request.top_k or 0,
            min_p=request.min_p or 0.0, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, repetition_penalty=request.repetition_penalty,
            seed=request.seed, max_tokens=request.output_limit, min_tokens=request.min_tokens,
            stop=list(request.stop or []), stop_token_ids=list(request.stop_token_ids or []),
            ignore_eos=request.ignore_eos, include_stop_str_in_output=request.include_stop_str_in_output,
            skip_special_tokens=request.skip_special_tokens,
            max_thinking_tokens=thinking_budget(request.max_thinking_tokens, state.policy, record,
                                                getattr(request, "reasoning_effort", None)),
            repetition_guard=repetition_guard(state.policy, record), logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, structured_output=structured_output,
        )
        check_token_ids(params.stop_token_ids, vocab_size, "stop_token_ids")
        return params
    except InvalidRequestError as exc:
        raise bad_request(exc.message, param=exc.param, code=exc.code) from exc


class Admission:
    """A request counted as pending (`ServerState.admit`) until the `with` block ends, or, for a stream, until
    the response that `hand_over` gave the release to has ended."""

    def __init__(self, state: ServerState, request_id: str) -> None:
        state.admit(request_id)
        self.state, self.request_id, self._handed_over = state, request_id, False

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._handed_over:
            self.release()

    def hand_over(self) -> Callable[[], None]:
        """The release, for the streaming response to call when it ends."""
        self._handed_over = True
        return self.release

    def release(self) -> None:
        self.state.release(self.request_id)


def prompt_too_long(num_tokens: str, max_model_len: int, param: str) -> APIError:
    return bad_request(f"the prompt has {num_tokens} tokens, over this server's context window of {max_model_len} "
                       "tokens (--max-model-len), which must also hold at least one output token",
                       param=param, code="context_length_exceeded")


def check_text_length(num_chars: int, tokenizer: Any, max_model_len: int, param: str) -> None:
    """400 for a text that has more than `max_model_len` tokens whatever it says (no token is longer than
    `max_chars_per_token` characters): refused at once, before any tokenizing."""
    if num_chars > max_model_len * tokenizer.max_chars_per_token():
        raise prompt_too_long(f"more than {max_model_len}", max_model_len, param)


def encode_bounded(encode: Callable[[str], list[int]], text: str, tokenizer: Any, max_model_len: int,
                   param: str) -> list[int]:
    """Token ids of `text` (run it on a worker thread). A text over the context window is refused from its
    length, or from a probe of its first characters, before it is tokenized whole; a text the tokenizer cannot
    take (e.g. a lone surrogate) is a 400."""
    check_text_length(len(text), tokenizer, max_model_len, param)
    try:
        probe_chars = max_model_len * PROBE_CHARS_PER_TOKEN
        if len(text) > probe_chars and len(encode(text[:probe_chars])) > max_model_len:
            raise prompt_too_long(f"more than {max_model_len}", max_model_len, param)
        return encode(text)
    except (TypeError, UnicodeError) as exc:
        raise bad_request(f"{param} cannot be tokenized: it is not valid Unicode text ({exc})", param=param,
                          code="invalid_text") from exc


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a worker thread, so that the event loop keeps serving other requests meanwhile."""
    return await asyncio.to_thread(fn, *args)


async def wait_for_disconnect(raw_request: Request) -> None:
    """Returns when the client closes its connection (the body has been read, so only that can arrive)."""
    while (await raw_request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class FinalOutputs:
    """The last state of every sample of a request, gathered from its stream of outputs."""

    prompt_token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    samples: dict[int, CompletionOutput] = field(default_factory=dict)
    prompt_logprobs: list[Any] | None = None  # when asked (they come once)

    def update(self, output: RequestOutput) -> int:
        """Keep the newest cumulative state of each sample; returns how many new tokens arrived."""
        self.prompt_token_ids, self.num_cached_tokens = output.prompt_token_ids, output.num_cached_tokens
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        num_new = 0
        for sample in output.outputs:
            num_new += len(sample.delta_token_ids)
            self.samples[sample.index] = sample
        return num_new

    def ordered(self) -> list[CompletionOutput]:
        return [self.samples[i] for i in sorted(self.samples)]


async def metered_outputs(engine: EngineClient, prompt: str | list[int], params: SamplingParams, request_id: str,
                          state: ServerState, final: FinalOutputs) -> AsyncIterator[RequestOutput]:
    """The engine's outputs of one request, gathered into `final` and counted in /metrics: tokens as they come,
    then each sample's finish reason, or "abort" for every sample if the request ended early (the client left,
    the engine failed). Close it with `contextlib.aclosing`, so that an early end aborts the request at once."""
    timer = state.metrics.timer()
    ended = False
    try:
        async with contextlib.aclosing(engine.generate(prompt, params, request_id)) as stream:
            async for output in stream:
                timer.tokens(final.update(output))
                yield output
        ended = True
    finally:
        timer.finished([s.finish_reason or "abort" for s in final.ordered()] if ended else ["abort"] * params.n)


async def run_to_end(engine: EngineClient, prompt: str | list[int], params: SamplingParams, request_id: str,
                     state: ServerState, raw_request: Request) -> FinalOutputs:
    """Run a request to its end; a client that disconnects first gets its request aborted (ClientDisconnected).
    An input the engine refuses becomes a 400."""
    final = FinalOutputs()

    async def consume() -> None:
        async with contextlib.aclosing(metered_outputs(engine, prompt, params, request_id, state, final)) as outputs:
            async for _ in outputs:
                pass

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(wait_for_disconnect(raw_request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():  # the client left (or this task was cancelled): abort the request
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
    if consumer.cancelled():
        logger.info("request %s: client disconnected; aborted", request_id)
        raise ClientDisconnected(request_id)
    try:
        consumer.result()
    except Exception as exc:
        raise engine_error(exc) from exc
    return final


def engine_error(exc: Exception) -> Exception:
    """What the client gets for an engine failure: 400 for its own input, 503 for an engine that is gone or
    going; anything else stays itself (logged, and answered 500)."""
    if isinstance(exc, InvalidRequestError):
        return bad_request(exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, EngineDeadError):
        return unavailable(f"the engine has stopped ({exc}); the server is exiting so that its supervisor "
                           "restarts it", "engine_dead", RETRY_AFTER_DEAD_S)
    if isinstance(exc, ValueError):
        return bad_request(str(exc), code="invalid_value")
    if isinstance(exc, RuntimeError) and "shutting down" in str(exc):
        return unavailable("the server is shutting down", "shutting_down", RETRY_AFTER_DEAD_S)
    return exc


def make_usage(prompt_token_ids: list[int], samples: list[CompletionOutput], num_cached_tokens: int,
               reasoning_tokens: int | None) -> UsageInfo:
    """The OpenAI usage block; `reasoning_tokens` None omits `completion_tokens_details`."""
    completion_tokens = sum(len(s.token_ids) for s in samples)
    return UsageInfo(
        prompt_tokens=len(prompt_token_ids), completion_tokens=completion_tokens,
        total_tokens=len(prompt_token_ids) + completion_tokens,
        completion_tokens_details=None if reasoning_tokens is None else CompletionTokensDetails(
            reasoning_tokens=reasoning_tokens),
        prompt_tokens_details=PromptTokensDetails(cached_tokens=num_cached_tokens),
    )


def policy_headers(record: PolicyRecord) -> dict[str, str]:
    return {POLICY_HEADER: record.header()}

