"""Why a sequence stops (other than stop strings, which the detokenizer finds): end tokens, length, loops.

The repetition guard (usage rule 8) catches a reasoning model stuck in a loop: the output ends with the same
window of `p` tokens repeated, for some period p up to `max_period`, at least `min_repeats` times and over at
least `min_span` tokens. It runs every `CHECK_EVERY` tokens and compares list slices, so its cost per token
stays small even for 256 streams.
"""

from __future__ import annotations

from r1serve.engine.sequence import Sequence
from r1serve.outputs import FinishReason
from r1serve.sampling_params import RepetitionGuard

CHECK_EVERY = 16


def is_repeating(token_ids: list[int], guard: RepetitionGuard) -> bool:
    """True when the tail of `token_ids` is one window repeated (see the module docstring)."""
    n = len(token_ids)
    for period in range(1, guard.max_period + 1):
        span = max(guard.min_repeats * period, guard.min_span)
        span -= span % period  # whole windows only
        if span > n:
            if guard.min_repeats * period > n:
                break
            continue
        if token_ids[-1] != token_ids[-1 - period]:  # cheap filter before comparing windows
            continue
        tail = token_ids[n - span:]
        if tail[period:] == tail[:-period]:
            return True
    return False


def finish_reason(seq: Sequence, token: int, eos_token_id: int | None,
                  max_model_len: int) -> tuple[FinishReason | None, int | None]:
    """Whether `seq` ends after appending `token`: (finish_reason, stop token id) or (None, None)."""
    params = seq.params
    num_output = len(seq.output_ids)
    ended = num_output >= params.min_tokens
    if ended and token in params.stop_token_ids:
        return "stop", token
    if ended and token == eos_token_id and not params.ignore_eos:
        return "stop", None
    if num_output >= seq.request.max_tokens or len(seq.token_ids) >= max_model_len:
        return "length", None
    guard = params.repetition_guard
    if guard is not None and num_output % CHECK_EVERY == 0 and is_repeating(seq.output_ids, guard):
        return "repetition", None
    return None, None
