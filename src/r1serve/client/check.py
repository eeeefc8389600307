"""`r1serve check`: verify a running deployment end to end and exit non-zero if anything is wrong.

The seeds verified a deployment by grepping the server log and running three notebook cells whose failures
printed and moved on. This does the same checks properly: the log file (startup completed, no CUDA OOM,
no model-not-found, no traceback, each problem with its fix), `/health`, `/v1/models` (the model answers
to the expected name), a plain chat, a streamed chat (several chunks, time to first token), a math
question with the R1 math prompt (a `\\boxed{}` answer; with `--expect`, its value), and the usage rules
(system message accepted, reasoning apart from the answer). It prints a table (step, result, time), or
JSON with `--json`. Problems that make the rest pointless (server unreachable, key refused, model not
served, not an OpenAI API) stop the check with one clear line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from r1serve.client.errors import (
    AuthenticationError,
    ClientConnectionError,
    ClientError,
    ModelNotFoundError,
    NotOpenAICompatibleError,
)
from r1serve.client.settings import DEFAULT_BASE_URL
from r1serve.client.sync_client import LLMClient
from r1serve.client.types import ChatResult, ServerInfo, StreamDelta, StreamEnd

Status = Literal["ok", "fail", "skip"]
MATH_PROBLEM = "What is 12 * 13 - 6?"
MATH_ANSWER = "150"

# (what to look for, the problem, the fix) for the server log.
LOG_PROBLEMS: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(r"CUDA out of memory|OutOfMemoryError"), "CUDA out of memory",
     "lower --gpu-memory-utilization, --max-model-len or --max-num-seqs, or free the GPU (see nvidia-smi)"),
    (re.compile(r"model not found|ModelNotFoundError|model folder .* does not exist", re.IGNORECASE),
     "model not found", "pass --model a local folder with config.json, or a hub id on a machine that can download"),
    (re.compile(r"address already in use", re.IGNORECASE), "port already in use",
     "stop the other process on that port, or start the server with another --port"),
    (re.compile(r"Traceback \(most recent call last\)"), "a traceback",
     "the server raised an exception: read the traceback in the log"),
]
STARTED = "Started server process"
STARTUP_DONE = "Application startup complete"
SHUTDOWN_DONE = "Finished server process"
ERROR_LINE = re.compile(r"^(?:ERROR|CRITICAL)\b.*?\] (.*)$", re.MULTILINE)  # the text of r1serve's format
RESULT_WIDTH = 76


@dataclass
class Step:
    """One row of the report."""

    step: str
    status: Status
    detail: str
    time_s: float

    def cell(self) -> str:
        label = {"ok": "ok", "fail": "FAIL", "skip": "skipped"}[self.status]
        return f"{label}: {self.detail}" if self.detail else label


class Fatal(Exception):
    """A problem that makes the remaining steps pointless; its message is the one line shown."""


def check_log(path: Path) -> list[tuple[Status, str]]:
    """The verdicts on a server log: each problem found with its fix, or one "ok". The file is appended to by
    each start, so only the last start counts (line numbers are the file's)."""
    if not path.is_file():
        return [("fail", f"no log file at {path}: pass the file given to `r1serve serve --log-file`")]
    text = path.read_text(errors="replace")
    start = max(text.rfind(STARTED), 0)
    run = text[start:]

    def line_of(offset: int) -> int:
        return text.count("\n", 0, start + offset) + 1

    found: list[tuple[Status, str]] = []
    if STARTUP_DONE not in run:
        error = ERROR_LINE.search(run)
        found.append(("fail", f"the server failed to start (line {line_of(error.start())}): {error.group(1)}"
                      if error else f"no '{STARTUP_DONE}': the server is still loading; wait, or read the log"))
    for pattern, problem, fix in LOG_PROBLEMS:
        match = pattern.search(run)
        if match:
            found.append(("fail", f"{problem} (line {line_of(match.start())}): {fix}"))
    stopped = run.find(SHUTDOWN_DONE)
    if stopped >= 0:
        found.append(("fail", f"the server has shut down (line {line_of(stopped)}): start it again"))
    return found or [("ok", "startup complete; no OOM, model-not-found or traceback")]


@dataclass(frozen=True)
class Budget:
    """Token limits of the chat steps: small for random dummy weights (only the round trip matters)."""

    thinking: int | None
    max_tokens: int
    math_thinking: int | None
    math_max_tokens: int

    @classmethod
    def for_server(cls, info: ServerInfo, args: argparse.Namespace) -> Budget:
        dummy = info.dummy_weights
        thinking = args.max_thinking_tokens if args.max_thinking_tokens is not None else (16 if dummy else 512)
        math_thinking = args.max_thinking_tokens if args.max_thinking_tokens is not None else (16 if dummy else 2048)
        if not info.is_r1serve:  # the thinking budget is an r1serve extension; elsewhere only max_tokens
            return cls(None, args.max_tokens or 1024, None, args.max_tokens or 4096)
        return cls(thinking, args.max_tokens or thinking + (32 if dummy else 256), math_thinking,
                   args.max_tokens or math_thinking + (32 if dummy else 512))

    def chat_kwargs(self, math: bool = False) -> dict[str, Any]:
        thinking = self.math_thinking if math else self.thinking
        kw: dict[str, Any] = {"max_tokens": self.math_max_tokens if math else self.max_tokens}
        if thinking is not None:
            kw["max_thinking_tokens"] = thinking
        return kw


FATAL_ERRORS = (ClientConnectionError, AuthenticationError, NotOpenAICompatibleError, ModelNotFoundError)


def same_answer(got: str, expected: str) -> bool:
    """Loose equality of two final answers: spacing, `$` and a trailing period ignored; numbers by value."""
    norm = [re.sub(r"\s+|\$", "", s).rstrip(".") for s in (got, expected)]
    try:
        return abs(float(norm[0].replace(",", "")) - float(norm[1].replace(",", ""))) < 1e-9
    except ValueError:
        return norm[0] == norm[1]


def _tokens(result: ChatResult) -> str:
    return f"{result.usage.completion_tokens} tokens" if result.usage else "no usage"


class Checker:
    """Runs the steps in order against one client, collecting a `Step` per check."""

    def __init__(self, client: LLMClient, args: argparse.Namespace) -> None:
        self.client, self.args = client, args
        self.steps: list[Step] = []
        self.info = ServerInfo(is_r1serve=False)
        self.budget = Budget.for_server(self.info, args)

    def step(self, name: str, run: Callable[[], tuple[Status, str]]) -> None:
        """Run one check; a `Fatal` or a connection/key/model/API error ends the whole check (re-raised)."""
        started = time.perf_counter()
        try:
            status, detail = run()
        except (Fatal, *FATAL_ERRORS) as e:
            self.steps.append(Step(name, "fail", _message(e), time.perf_counter() - started))
            raise Fatal(_message(e)) from e
        except ClientError as e:
            status, detail = "fail", e.message
        self.steps.append(Step(name, status, detail, time.perf_counter() - started))

    def run(self) -> str | None:
        """All steps; returns the one-line reason when the check had to stop early."""
        if self.args.log_file is not None:
            started = time.perf_counter()
            for status, detail in check_log(Path(self.args.log_file)):
                self.steps.append(Step("log", status, detail, time.perf_counter() - started))
        try:
            for name, run in [("health", self.health), ("server", self.server), ("models", self.models),
                              ("chat", self.chat), ("stream", self.stream), ("math", self.math),
                              ("rules", self.rules)]:
                self.step(name, run)
        except Fatal as e:
            return str(e)
        return None

    def health(self) -> tuple[Status, str]:
        if self.args.wait:
            self.client.wait_until_ready(self.args.wait)
        try:
            healthy = self.client.health()
        except NotOpenAICompatibleError:
            return "skip", "no /health route (not r1serve)"
        if not healthy:
            raise Fatal(f"{self.client.settings.root_url} is still loading (503 on /health): wait, or rerun with "
                        "--wait SECONDS")
        return "ok", "200"

    def server(self) -> tuple[Status, str]:
        self.info = self.client.server_info()
        self.budget = Budget.for_server(self.info, self.args)
        if not self.info.is_r1serve:
            return "ok", "not r1serve (no /version): generic OpenAI checks only"
        weights = "random dummy weights: answers are not checked" if self.info.dummy_weights else "real weights"
        quant = f", quantization {self.info.quantization}" if self.info.quantization is not None else ""
        runtime = f"; {self.info.runtime()}" if self.info.runtime() is not None else ""
        return "ok", f"r1serve {self.info.version}, load format {self.info.load_format}{quant}{runtime} ({weights})"

    def models(self) -> tuple[Status, str]:
        entries = self.client.list_model_details()
        ids = [entry["id"] for entry in entries]
        limit = entries[0].get("max_model_len")
        limit_note = f", max_model_len {limit}" if limit else ""
        expected = self.args.model
        if expected is None:
            return "ok", f"serves {', '.join(ids)}{limit_note}"
        if expected in ids:
            return "ok", f"{expected} is served{limit_note}"
        try:  # r1serve also answers to the basename and aliases it may not list
            self.client.chat_completion([{"role": "user", "content": "Hi"}], max_tokens=1)
        except ModelNotFoundError as e:
            raise Fatal(f"model {expected!r} is not served by {self.client.base_url} (it serves "
                        f"{', '.join(ids)}): pass --model {ids[0]}") from e
        return "ok", f"answers to {expected} (listed as {', '.join(ids)}){limit_note}"

    def chat(self) -> tuple[Status, str]:
        messages = [{"role": "user", "content": "Say hello in one short sentence."}]
        result = self.client.chat_completion(messages, **self.budget.chat_kwargs())
        assert isinstance(result, ChatResult)
        if not result.content.strip():
            return "fail", (f"empty answer (finish_reason {result.finish_reason}, {_tokens(result)}): the reasoning "
                            "did not end within --max-tokens; raise it")
        return "ok", f"{len(result.content)} chars of answer, {_tokens(result)}, finish {result.finish_reason}"

    def stream(self) -> tuple[Status, str]:
        messages = [{"role": "user", "content": "Count from 1 to 5."}]
        kinds: list[str] = []
        end: StreamEnd | None = None
        for item in self.client.stream_chat(messages, **self.budget.chat_kwargs()):
            if isinstance(item, StreamDelta):
                kinds.append(item.kind)
            else:
                end = item
        if len(kinds) < 2:
            return "fail", f"{len(kinds)} chunk(s): the server does not stream"
        if "answer" in kinds and "reasoning" in kinds[kinds.index("answer"):]:
            return "fail", "reasoning arrived after the answer had started"
        if end is None or end.ttft_s is None:
            return "fail", "the stream ended without its final chunk"
        return "ok", f"{len(kinds)} chunks, TTFT {end.ttft_s * 1000:.0f} ms, total {end.latency_s:.2f} s"

    def math(self) -> tuple[Status, str]:
        solved = self.client.solve_math(self.args.problem, **self.budget.chat_kwargs(math=True))
        expect, result = self.args.expect, solved.result
        if expect is None and self.info.dummy_weights:
            return "skip", f"dummy weights (the request round-tripped, {_tokens(result)}; --expect to insist)"
        if solved.answer is None:
            return "fail", (f"no \\boxed{{}} answer (finish_reason {result.finish_reason}, {_tokens(result)}): "
                            "raise --max-tokens, or the model is not following the math prompt")
        if expect is not None and not same_answer(solved.answer, expect):
            return "fail", f"boxed {solved.answer!r}, expected {expect!r}"
        checked = f" = expected {expect}" if expect is not None else " (pass --expect to check its value)"
        return "ok", f"\\boxed{{{solved.answer}}}{checked}"

    def rules(self) -> tuple[Status, str]:
        messages = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
                    {"role": "user", "content": "What is 2 + 2?"}]
        result = self.client.chat_completion(messages, **self.budget.chat_kwargs())
        assert isinstance(result, ChatResult)
        problems = []
        if not result.reasoning.strip():
            problems.append("no reasoning came apart from the answer")
        if "think>" in result.content:
            problems.append("the answer still holds a <think> tag")
        if self.info.is_r1serve and "system-folded" not in (result.policy or ""):
            problems.append(f"the server did not fold the system prompt (x-r1serve-policy: {result.policy})")
        if self.info.is_r1serve and result.reasoning_source != "server":
            problems.append("the server did not split the reasoning (reasoning_content missing)")
        if problems:
            return "fail", "; ".join(problems)
        folded_by = "server" if self.info.is_r1serve else "client"
        return "ok", (f"system message accepted (folded by the {folded_by}); reasoning apart from the answer "
                      f"(split by the {result.reasoning_source})")


def _message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, ClientError) else str(exc)


def render_table(steps: list[Step], width: int = RESULT_WIDTH) -> str:
    """Columns step, result, time; a long result wraps onto indented lines below its row."""
    w0 = max(len(s.step) for s in [Step("step", "ok", "", 0.0), *steps])
    w1 = min(width, max([len("result")] + [len(s.cell()) for s in steps]))
    lines = [f"{'step':<{w0}}  {'result':<{w1}}  {'time':>8}", "-" * (w0 + w1 + 12)]
    for s in steps:
        wrapped = textwrap.wrap(s.cell(), w1, break_on_hyphens=False) or [""]
        lines.append(f"{s.step:<{w0}}  {wrapped[0]:<{w1}}  {s.time_s:>6.2f} s")
        lines += [f"{'':<{w0}}    {more}" for more in wrapped[1:]]
    return "\n".join(lines)


def summary(steps: list[Step], error: str | None, url: str) -> str:
    """The last line: PASSED with counts, or FAILED with the stopping problem or the number of failures."""
    failed = sum(s.status == "fail" for s in steps)
    skipped = sum(s.status == "skip" for s in steps)
    if error is not None:
        return f"FAILED: {error}"
    if failed:
        return f"FAILED: {failed} of {len(steps)} steps failed ({url})"
    return f"PASSED: {len(steps) - skipped} steps ok, {skipped} skipped ({url})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r1serve check", description="Verify a running deployment: log file, health, "
                                "models, chat, streaming, a math question and the R1 usage rules.")
    p.add_argument("--url", default=DEFAULT_BASE_URL, help=f"the server's base URL (default {DEFAULT_BASE_URL})")
    p.add_argument("--model", default=None, help="the name the model must answer to (default: the served one)")
    p.add_argument("--api-key", default=None, help="API key (default $R1SERVE_API_KEY, else none)")
    p.add_argument("--log-file", default=None, help="the server's log file (`r1serve serve --log-file`) to check")
    p.add_argument("--problem", default=MATH_PROBLEM, help=f"the math question (default {MATH_PROBLEM!r})")
    p.add_argument("--expect", default=None, help=f"the expected boxed answer (e.g. {MATH_ANSWER} for the default "
                   "question); checked even with dummy weights")
    p.add_argument("--max-tokens", type=int, default=None, help="max_tokens of each chat (default: by weights)")
    p.add_argument("--max-thinking-tokens", type=int, default=None,
                   help="thinking budget of each chat on r1serve (default 16 with dummy weights, else 512; "
                   "2048 for the math question)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    p.add_argument("--wait", type=float, default=0.0, help="wait up to this many seconds for /health first")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        client = LLMClient(args.url, api_key=args.api_key, model=args.model, timeout=args.timeout, max_retries=2)
    except ClientError as e:
        print(f"r1serve check: {e.message}", file=sys.stderr)
        return 2
    with client:
        checker = Checker(client, args)
        error = checker.run()
    steps, ok = checker.steps, error is None and all(s.status != "fail" for s in checker.steps)
    if args.json:
        print(json.dumps({"url": client.base_url, "ok": ok, "error": error,
                          "steps": [asdict(s) for s in steps]}, indent=2))
    else:
        print(render_table(steps))
        print(summary(steps, error, client.base_url))
    return 0 if ok else 1
