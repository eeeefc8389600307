"""When to try a request again and how long to wait first: exponential backoff with a cap and a little jitter.

A server that is still starting refuses connections, then answers 503 until its model is loaded; a client
started at the same moment should wait for it instead of failing. So the client retries connection errors
and 429/502/503/504 (see `errors.is_retryable`), waiting `backoff_base * 2**attempt` seconds (capped, with
up to 10% jitter so that many clients do not knock in step), or the server's `Retry-After` when it sends
one. The sync and async clients share this policy; only their way of sleeping differs.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

logger = logging.getLogger("r1serve.client")


@dataclass(frozen=True)
class RetryPolicy:
    """`max_retries` tries after the first; waits of `backoff_base * 2**attempt` s, at most `backoff_max`."""

    max_retries: int = 3
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be non-negative, got {self.max_retries}")
        if self.backoff_base < 0 or self.backoff_max < 0:
            raise ValueError(
                f"backoff times must be non-negative, got {self.backoff_base}, {self.backoff_max}"
            )
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def delay_s(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait before retry number `attempt + 1` (attempt 0 = the first retry)."""
        if retry_after_s is not None:
            return min(retry_after_s, self.backoff_max)
        base = min(self.backoff_base * (2**attempt), self.backoff_max)
        return base * (1.0 + self.jitter * random.random())

    def should_retry(self, attempt: int, retryable: bool) -> bool:
        """Whether a failure on try number `attempt` (0 = the first) gets another try."""
        return retryable and attempt < self.max_retries


def log_retry(error: Exception, attempt: int, policy: RetryPolicy, delay_s: float) -> None:
    """One log line per retry, so that a client waiting for a server says what it is waiting for."""
    logger.info("%s; retry %d of %d in %.1f s", error, attempt + 1, policy.max_retries, delay_s)
