"""`EvalConfig`: every setting of an evaluation, frozen and validated once; the command line is built from it.

The defaults are the DeepSeek-R1 paper's protocol (temperature 0.6, top-p 0.95, up to 32,768 tokens, the
math instruction in the user turn, no system prompt), with 5 samples per problem as the usage advice says.
Each field carries its help text, so `r1serve eval --help` and this class cannot drift apart, and the
whole config goes into `summary.json` and the final JSON line, so any result can be reproduced.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from r1serve.sampling_params import R1_TEMPERATURE, R1_TOP_P

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_MAX_TOKENS = 32768


def _opt(default: Any, help_: str, **argparse_kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help_, **argparse_kwargs})


@dataclass(frozen=True)
class EvalConfig:
    """The settings of one `r1serve eval` run (field names are the flags, `_` spelled `-`)."""

    base_url: tuple[str, ...] = _opt((DEFAULT_BASE_URL,), "OpenAI-compatible base URLs (r1serve's or any "
                                     "other); several run the same samples and are compared with the first",
                                     nargs="+", action="extend")
    label: tuple[str, ...] = _opt((), "a name per --url for tables and samples (default: host:port)",
                                  nargs="+", action="extend")
    api_key: str | None = _opt(None, "API key (default: $R1SERVE_API_KEY, else none)")
    model: str | None = _opt(None, "model to ask for (default: the first the server lists)")
    task: tuple[str, ...] = _opt(("gsm8k",), "tasks: gsm8k, math500, aime24, a JSONL path, NAME=PATH or "
                                 "hf:owner/name[@split]", nargs="+")
    policy: tuple[str, ...] = _opt(("paper",), "prompt policies, compared with the first: paper, paper-zh, "
                                   "system, none, custom[-NAME]:TEMPLATE (with {problem}; @file reads it)",
                                   nargs="+")
    num_samples: int = _opt(5, "samples per problem (pass@1 averages them; maj@k votes over them)")
    temperature: float = _opt(R1_TEMPERATURE, "sampling temperature (the paper: 0.6)")
    top_p: float = _opt(R1_TOP_P, "nucleus sampling top-p (the paper: 0.95)")
    max_tokens: int = _opt(DEFAULT_MAX_TOKENS, "output token limit, capped by the server's context window")
    max_thinking_tokens: int | None = _opt(None, "r1serve extension: close the reasoning after this many "
                                           "tokens (other servers ignore or refuse it)")
    seed: int = _opt(0, "base seed: sample i of every problem uses seed + i")
    concurrency: int = _opt(32, "requests in flight at once, per endpoint")
    limit: int | None = _opt(None, "evaluate only the first N problems of each task")
    output_dir: str = _opt("eval_results", "folder for samples.jsonl, summary.json, report.md and plots; "
                           "rerunning into it resumes")
    data_dir: str | None = _opt(None, "folder holding gsm8k/, math500/, aime24/ test.jsonl "
                                "(default: $R1SERVE_DATA_DIR, ./data, ../shared/data)")
    problem_field: str | None = _opt(None, "JSONL field holding the problem (default: problem)")
    answer_field: str | None = _opt(None, "JSONL field holding the gold answer (default: answer)")
    id_field: str | None = _opt(None, "JSONL field holding a problem id (default: the line number)")
    answer_kind: str | None = _opt(None, "numeric (GSM8K-style fallbacks and tolerance) or math "
                                   "(boxed answers, math-verify); default: by task", choices=("numeric", "math"))
    timeout: float = _opt(3600.0, "seconds one request may take")
    max_retries: int = _opt(3, "retries of a request on connection errors and 429/502/503/504")
    stream: bool = _opt(False, "stream responses (records time to first token)")
    split_reasoning: bool = _opt(True, "split reasoning at </think> (off for models that do not reason)")
    grader_workers: int = _opt(2, "math-verify worker processes")
    grader_timeout: int = _opt(5, "seconds math-verify may spend parsing or comparing one answer")
    bootstrap_resamples: int = _opt(2000, "bootstrap resamples for the 95%% intervals")
    progress: bool = _opt(True, "show a progress bar")
    report_only: bool = _opt(False, "recompute summary, report and plots from samples.jsonl; no requests")

    def __post_init__(self) -> None:
        if isinstance(self.base_url, str):  # EvalConfig(base_url="...") from Python
            object.__setattr__(self, "base_url", (self.base_url,))
        checks = [
            ("num_samples", self.num_samples >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0.0, "must be non-negative"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("max_tokens", self.max_tokens >= 1, "must be at least 1"),
            ("max_thinking_tokens", self.max_thinking_tokens is None or self.max_thinking_tokens >= 0,
             "must be non-negative"),
            ("concurrency", self.concurrency >= 1, "must be at least 1"),
            ("limit", self.limit is None or self.limit >= 1, "must be at least 1"),
            ("timeout", self.timeout > 0, "must be positive"),
            ("max_retries", self.max_retries >= 0, "must be non-negative"),
            ("grader_workers", self.grader_workers >= 1, "must be at least 1"),
            ("grader_timeout", self.grader_timeout >= 1, "must be at least 1"),
            ("bootstrap_resamples", self.bootstrap_resamples >= 100, "must be at least 100"),
            ("task", len(self.task) >= 1, "needs at least one task"),
            ("policy", len(self.policy) >= 1, "needs at least one policy"),
            ("base_url", len(self.base_url) >= 1, "needs at least one URL"),
            ("label", not self.label or len(self.label) == len(self.base_url),
             f"needs one label per --url ({len(self.base_url)})"),
            ("label", all(name.strip() for name in self.label), "must be non-empty"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} {why}, got {getattr(self, name)!r}")
        if len(set(self.task)) != len(self.task):
            raise ValueError(f"--task lists a task twice: {', '.join(self.task)}")
        if len(set(self.base_url)) != len(self.base_url):
            raise ValueError(f"--url lists a URL twice: {', '.join(self.base_url)}")
        labels = self.endpoint_labels
        if len(set(labels)) != len(labels):
            raise ValueError(f"endpoint labels must be unique, got {', '.join(labels)}: name them with --label")

    @property
    def endpoint_labels(self) -> tuple[str, ...]:
        """The name of each endpoint: its --label, else the URL's host:port."""
        return self.label or tuple(default_label(url) for url in self.base_url)

    @property
    def endpoints(self) -> tuple[tuple[str, str], ...]:
        """(label, base URL) per endpoint, the first being the comparison baseline."""
        return tuple(zip(self.endpoint_labels, self.base_url, strict=True))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["api_key"] = "***" if self.api_key else None  # never write a key to disk
        return data


def default_label(url: str) -> str:
    """`host:port` of a URL (the URL itself if it has no host)."""
    parts = urlsplit(url)
    if not parts.hostname:
        return url
    return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname


def _annotation_type(annotation: str) -> type:
    for name, kind in (("int", int), ("float", float)):
        if annotation.startswith(name):
            return kind
    return str


def build_parser(prog: str = "r1serve eval") -> argparse.ArgumentParser:
    """The argument parser, one option per `EvalConfig` field."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Accuracy of an OpenAI-compatible server on GSM8K / MATH-500 / AIME 2024 with "
        "repeated sampling, bootstrap intervals and prompt-policy comparisons.",
    )
    for f in dataclasses.fields(EvalConfig):
        meta = dict(f.metadata)
        kwargs: dict[str, Any] = {"help": meta.pop("help"), "default": f.default, "dest": f.name}
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _annotation_type(str(f.type))
            kwargs["metavar"] = {int: "N", float: "X", str: "TEXT"}[kwargs["type"]]
            if "nargs" in meta:
                kwargs["metavar"] = f.name.upper()
        kwargs.update(meta)
        if kwargs.get("action") == "extend":  # argparse would extend the default; parse_config fills it in
            kwargs["default"] = None
        names = [flag, "--url"] if f.name == "base_url" else [flag]
        parser.add_argument(*names, **kwargs)
    return parser


def parse_config(argv: list[str]) -> EvalConfig:
    """An `EvalConfig` from command-line arguments (argparse exits 2 on unknown or malformed options)."""
    args = vars(build_parser().parse_args(argv))
    defaults = {f.name: f.default for f in dataclasses.fields(EvalConfig)}
    for name in ("task", "policy", "base_url", "label"):
        args[name] = defaults[name] if args[name] is None else tuple(args[name])
    return EvalConfig(**args)
