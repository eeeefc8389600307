"""Usage rule 5's token count: how many output tokens the reasoning took, for `usage.reasoning_tokens`.

The split itself (`reasoning_content` before `</think>`, `content` after it, in full responses and stream
deltas) is `r1serve.r1_rules`, shared with the client; only counting tokens needs the server's tokenizer.
The reasoning goes out under DeepSeek's name and, unless `--no-reasoning-field-alias`, vLLM's
(`reasoning_fields`).
Reasoning tokens are counted by the `</think>` token id when the tokenizer has one, else by re-encoding the
reasoning text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REASONING_FIELD = "reasoning_content"  # DeepSeek's name
REASONING_ALIAS = "reasoning"  # vLLM's name since late 2025


def reasoning_fields(reasoning: str | None, alias: bool) -> dict[str, str | None]:
    """The reasoning of a message or delta under each name it is sent as."""
    return {REASONING_FIELD: reasoning, REASONING_ALIAS: reasoning} if alias else {REASONING_FIELD: reasoning}


def count_reasoning_tokens(token_ids: Sequence[int], has_reasoning: bool, closed: bool, reasoning_text: str,
                           think_end_id: int | None, encode: Callable[[str], list[int]]) -> int:
    """Output tokens spent before `</think>`: the position of the `</think>` token when the output has it,
    every token when the reasoning never closed, else (no such id) the reasoning text re-encoded."""
    if not has_reasoning:
        return 0
    if think_end_id is not None and think_end_id in token_ids:
        return list(token_ids).index(think_end_id)
    if not closed:
        return len(token_ids)
    return len(encode(reasoning_text)) if reasoning_text else 0
