"""What chat and text completions share: request checks, sampling parameters under the policy, running a
request to its end while watching for a client that leaves, and the usage block.

Both endpoints turn a validated request into a prompt and `SamplingParams`, refuse what cannot be served
(a prompt over `--max-model-len`, `max_tokens` that cannot fit, `n` over `--max-num-seqs`, features not
implemented) with a 400 that names the field, and hand the work to the engine. Keeping those steps here means
the two endpoints differ only in how they build the prompt and shape the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from r1serve.outputs import CompletionOutput, RequestOutput
from r1serve.sampling_params import SamplingParams
from r1serve.server.errors import bad_request
from r1serve.server.policy import PolicyRecord, repetition_guard, sampling_defaults, thinking_budget
from r1serve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    CompletionTokensDetails,
    PromptTokensDetails,
    UsageInfo,
)
from r1serve.server.state import EngineClient, ServerState

logger = logging.getLogger("r1serve.server")

POLICY_HEADER = "x-r1serve-policy"


class ClientDisconnected(Exception):
    """The client went away before its (non-streamed) answer was ready; the request was aborted."""


def check_unsupported(request: ChatCompletionRequest | CompletionRequest) -> None:
    """400 for OpenAI features r1serve does not implement, rather than ignoring them silently."""
    if request.logprobs or getattr(request, "top_logprobs", None):
        raise bad_request("logprobs are not supported yet", param="logprobs", code="unsupported")
    if isinstance(request, ChatCompletionRequest):
        if request.tools:
            raise bad_request("tools / function calling are not supported", param="tools", code="unsupported")
        if request.response_format and request.response_format.get("type", "text") != "text":
            raise bad_request("response_format other than text is not supported", param="response_format",
                              code="unsupported")
        return
    if request.echo:
        raise bad_request("echo is not supported", param="echo", code="unsupported")
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


def vocab_size_of(tokenizer: Any) -> int:
    """The tokenizer's vocabulary size, 0 when it does not say."""
    return int(getattr(tokenizer, "vocab_size", 0) or 0)


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    """400 for a token id outside the vocabulary (the schema only knows ids are non-negative)."""
    bad = [t for t in token_ids if t < 0 or (vocab_size and t >= vocab_size)]
    if bad:
        raise bad_request(f"{param}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param=param)


def build_sampling_params(request: ChatCompletionRequest | CompletionRequest, state: ServerState,
                          record: PolicyRecord, vocab_size: int) -> SamplingParams:
    """`SamplingParams` of a request with the usage rules 2, 7 and 8 applied (and recorded)."""
    check_token_ids(request.stop_token_ids or [], vocab_size, "stop_token_ids")
    max_num_seqs = state.settings.max_num_seqs
    if request.n > max_num_seqs:
        raise bad_request(f"n={request.n} is more than this server runs at once (--max-num-seqs {max_num_seqs})",
                          param="n")
    temperature, top_p = sampling_defaults(request.temperature, request.top_p, state.policy, record)
    try:
        return SamplingParams(
            n=request.n, temperature=temperature, top_p=top_p, top_k=request.top_k or 0,
            min_p=request.min_p or 0.0, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, repetition_penalty=request.repetition_penalty,
            seed=request.seed, max_tokens=request.output_limit, min_tokens=request.min_tokens,
            stop=list(request.stop or []), stop_token_ids=list(request.stop_token_ids or []),
            ignore_eos=request.ignore_eos, include_stop_str_in_output=request.include_stop_str_in_output,
            skip_special_tokens=request.skip_special_tokens,
            max_thinking_tokens=thinking_budget(request.max_thinking_tokens, state.policy, record),
            repetition_guard=repetition_guard(state.policy, record),
        )
    except ValueError as exc:
        raise bad_request(str(exc), param=str(exc).split(" ", 1)[0]) from exc


@contextlib.asynccontextmanager
async def tracked(state: ServerState, request_id: str) -> AsyncIterator[None]:
    """Registers a request as in flight (for overload checks and the shutdown's abort) while it runs."""
    state.in_flight.add(request_id)
    try:
        yield
    finally:
        state.in_flight.discard(request_id)


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

    def update(self, output: RequestOutput) -> int:
        """Keep the newest cumulative state of each sample; returns how many new tokens arrived."""
        self.prompt_token_ids, self.num_cached_tokens = output.prompt_token_ids, output.num_cached_tokens
        num_new = 0
        for sample in output.outputs:
            num_new += len(sample.delta_token_ids)
            self.samples[sample.index] = sample
        return num_new

    def ordered(self) -> list[CompletionOutput]:
        return [self.samples[i] for i in sorted(self.samples)]


async def run_to_end(engine: EngineClient, prompt: str | list[int], params: SamplingParams, request_id: str,
                     state: ServerState, raw_request: Request) -> FinalOutputs:
    """Run a request to its end; a client that disconnects first gets its request aborted (ClientDisconnected).
    An input the engine refuses becomes a 400."""
    final = FinalOutputs()
    timer = state.metrics.timer()

    async def consume() -> None:
        async with contextlib.aclosing(engine.generate(prompt, params, request_id)) as stream:
            async for output in stream:
                timer.tokens(final.update(output))

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
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    timer.finished([s.finish_reason or "abort" for s in final.ordered()])
    return final


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

