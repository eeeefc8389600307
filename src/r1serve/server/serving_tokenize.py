"""`POST /tokenize` and `POST /detokenize`: the server's tokenizer and chat prompt, as vLLM exposes them.

Clients count tokens before they send (does this fit `max_model_len`?) and check what prompt the server
really builds. So a `prompt` is tokenized exactly as `/v1/completions` tokenizes it (the BOS added), and
`messages` exactly as `/v1/chat/completions` renders them: the usage rules that shape a chat prompt apply
(1: system folded into the first user turn, 3: `<think>\\n` after the generation prompt, 4: earlier
reasoning stripped), each as its flag says and reported in the `x-r1serve-policy` header; the sampling and
output rules have nothing to act on. Tokenizing and decoding run on a worker thread, and a text over the
context window is refused (`context_length_exceeded`) from its length or a probe before being tokenized whole.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from fastapi.responses import JSONResponse

from r1serve.engine.validation import check_token_ids
from r1serve.errors import InvalidRequestError
from r1serve.server.errors import bad_request
from r1serve.server.policy import PolicyRecord, apply_message_rules
from r1serve.server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from r1serve.server.serving_common import check_text_length, encode_bounded, off_loop, policy_headers
from r1serve.server.state import ServerState


def _check_shape(request: TokenizeRequest) -> None:
    """Exactly one of `prompt` and `messages`; the features not implemented are a 400."""
    if request.prompt is None and request.messages is None:
        raise bad_request("send `prompt` (text) or `messages` (a conversation)", param="prompt",
                          code="missing_field")
    if request.prompt is not None and request.messages is not None:
        raise bad_request("send either `prompt` or `messages`, not both", param="messages")
    unsupported = {"return_token_strs": request.return_token_strs,
                   "continue_final_message": request.continue_final_message,
                   "chat_template": request.chat_template is not None}
    for name, given in unsupported.items():
        if given:
            raise bad_request(f"{name} is not supported", param=name, code="unsupported")


def _chat_text(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
               force_thinking: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             force_thinking=force_thinking)
    except ValueError as exc:
        raise bad_request(str(exc), param="messages") from exc


def _tokenize_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
                   force_thinking: bool, add_special_tokens: bool, max_model_len: int) -> list[int]:
    text = _chat_text(tokenizer, messages, add_generation_prompt, force_thinking)
    encode = functools.partial(tokenizer.encode, add_special_tokens=add_special_tokens)
    return encode_bounded(encode, text, tokenizer, max_model_len, "messages")


async def create_tokenize(request: TokenizeRequest, state: ServerState) -> JSONResponse:
    if request.model is not None:
        state.check_model(request.model)
    engine = state.require_engine()
    _check_shape(request)
    tokenizer, max_model_len, record = engine.tokenizer, engine.max_model_len, PolicyRecord()
    if request.prompt is not None:
        encode = functools.partial(tokenizer.encode, add_special_tokens=request.add_special_tokens is not False)
        ids = await off_loop(encode_bounded, encode, request.prompt, tokenizer, max_model_len, "prompt")
    else:
        policy = state.policy
        if not request.add_generation_prompt:  # no generation prompt: nothing to force
            policy = dataclasses.replace(policy, force_thinking=False)
        messages = apply_message_rules([m.to_template() for m in request.messages or []], policy, record)
        check_text_length(sum(len(m["content"] or "") for m in messages), tokenizer, max_model_len, "messages")
        ids = await off_loop(_tokenize_chat, tokenizer, messages, request.add_generation_prompt,
                             policy.force_thinking, bool(request.add_special_tokens), max_model_len)
    body = TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids)
    return JSONResponse(body.model_dump(), headers=policy_headers(record))


async def create_detokenize(request: DetokenizeRequest, state: ServerState) -> DetokenizeResponse:
    if request.model is not None:
        state.check_model(request.model)
    engine = state.require_engine()
    try:
        check_token_ids(request.tokens, int(engine.tokenizer.vocab_size), "tokens")
    except InvalidRequestError as exc:
        raise bad_request(exc.message, param=exc.param, code=exc.code) from exc
    decode = functools.partial(engine.tokenizer.decode, skip_special_tokens=False)
    return DetokenizeResponse(prompt=await off_loop(decode, request.tokens))
