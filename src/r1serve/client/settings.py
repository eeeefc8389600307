"""How a client is set up: the validated, frozen settings that the sync and async clients share.

A client is told a URL, perhaps a key and a model, a timeout and how hard to retry. Those are checked once
here, with errors that name the bad value, and the URL is normalised (`http://host:8000` gets `/v1`, a
trailing slash goes) so that `--url` accepts what people type. The key defaults to `R1SERVE_API_KEY`, not
`OPENAI_API_KEY`, so that a real OpenAI key is never sent to some local server by accident.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from r1serve.client.errors import BadRequestError
from r1serve.client.retry import RetryPolicy

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
API_KEY_ENV = "R1SERVE_API_KEY"
NO_KEY = "EMPTY"  # what servers without authentication expect (vLLM's convention)


def normalize_base_url(url: str) -> str:
    """`url` without a trailing slash, with `/v1` added when it has no path; refuses non-http(s) URLs."""
    if not isinstance(url, str) or not url.strip():
        raise BadRequestError(f"base_url must be an http(s) URL such as {DEFAULT_BASE_URL}, got {url!r}")
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadRequestError(f"base_url must be an http(s) URL such as {DEFAULT_BASE_URL}, got {url!r}")
    url = url.rstrip("/")
    return url + "/v1" if parts.path in ("", "/") else url


@dataclass(frozen=True)
class ClientSettings:
    """Everything a client needs to know before its first request."""

    base_url: str = DEFAULT_BASE_URL
    api_key: str = NO_KEY
    model: str | None = None
    timeout: float = 600.0
    retry: RetryPolicy = RetryPolicy()
    fold_system_prompt: bool | None = None  # None: fold unless the server is r1serve (which folds itself)
    split_reasoning: bool = True  # False: a model that does not reason; all text is the answer

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_url", normalize_base_url(self.base_url))
        if not self.timeout > 0:
            raise BadRequestError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise BadRequestError(
                f"model must be a non-empty name or None (the server's first), got {self.model!r}"
            )

    @classmethod
    def build(
        cls,
        base_url: str,
        *,
        api_key: str | None,
        model: str | None,
        timeout: float,
        max_retries: int,
        backoff_base: float,
        backoff_max: float = 8.0,
        fold_system_prompt: bool | None,
        split_reasoning: bool,
    ) -> ClientSettings:
        """Settings from the clients' keyword arguments (`api_key` None: `$R1SERVE_API_KEY` or none)."""
        try:
            retry = RetryPolicy(max_retries=max_retries, backoff_base=backoff_base, backoff_max=backoff_max)
        except ValueError as e:
            raise BadRequestError(str(e)) from e
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or NO_KEY
        return cls(
            base_url=base_url,
            api_key=key,
            model=model,
            timeout=timeout,
            retry=retry,
            fold_system_prompt=fold_system_prompt,
            split_reasoning=split_reasoning,
        )

    @property
    def root_url(self) -> str:
        """The server's root (where r1serve has `/health` and `/version`): the base URL without `/v1`."""
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
