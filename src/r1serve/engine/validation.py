"""What the engine demands of a request before it queues it: a prompt it can encode, token ids inside the
vocabulary, lengths that fit the context window, and `n` within `max_num_seqs`.

Every token id a request carries (prompt ids, stop ids) is checked here against the model's vocabulary: an id
out of range would otherwise fail inside a batched step, where it would take the step's other requests down
with it. The checks run where a request enters (`StreamingEngine.generate` in the server's process,
`LLMEngine.add_request` for the library) and raise an `InvalidRequestError` naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence

from r1serve.errors import InvalidRequestError
from r1serve.sampling_params import SamplingParams
from r1serve.tokenizer import Tokenizer


def encode_prompt(tokenizer: Tokenizer, vocab_size: int, prompt: str | list[int]) -> list[int]:
    """Token ids of a prompt; text gets the tokenizer's BOS unless it already starts with it."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        bos = tokenizer.bos_token_id
        if len(ids) > 1 and ids[0] == ids[1] == bos:
            ids = ids[1:]
        return ids
    ids = list(prompt)
    if not ids:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    check_token_ids(ids, vocab_size, "prompt")
    return ids


def check_token_ids(ids: Sequence[object], vocab_size: int, param: str) -> None:
    """Every id an int in [0, vocab_size) (a bool is not one), else an error naming `param` and the id."""
    for token in ids:
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
            raise InvalidRequestError(f"{param}: token id {token!r} is outside the vocabulary [0, {vocab_size})",
                                      param=param, code="invalid_token_id")


def check_request(prompt_ids: list[int], params: SamplingParams, max_model_len: int, max_num_seqs: int,
                  vocab_size: int) -> int:
    """Validates token ids, lengths and n; returns the effective max_tokens."""
    check_token_ids(params.stop_token_ids, vocab_size, "stop_token_ids")
    room = max_model_len - len(prompt_ids)
    if room < 1:
        raise InvalidRequestError(
            f"prompt: {len(prompt_ids)} tokens do not fit max_model_len={max_model_len} "
            "(at least one token must be left to generate)", param="prompt", code="context_length_exceeded")
    if params.max_tokens is not None and params.max_tokens > room:
        raise InvalidRequestError(
            f"max_tokens: {params.max_tokens} plus the prompt's {len(prompt_ids)} tokens exceeds "
            f"max_model_len={max_model_len} (at most {room})", param="max_tokens", code="context_length_exceeded")
    if params.n > max_num_seqs:
        raise InvalidRequestError(f"n: {params.n} exceeds max_num_seqs={max_num_seqs}", param="n")
    return params.max_tokens or room
