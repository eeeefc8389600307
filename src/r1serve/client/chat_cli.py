"""`r1serve chat`: a terminal chat with a running server, the reasoning shown dimmed apart from the answer.

The seeds tried a deployment by pasting requests into a notebook; a person wants to type a question and
watch the model think. This is that: multi-turn (history keeps only the answers of earlier turns, as the R1
rules ask), the reasoning streamed in dim text and the answer in normal text (plain text with labels when
the output is not a terminal or with `--no-color`), `/reset` and `/exit`, and a one-shot form
`r1serve chat "question"` for scripts. Errors are one line; an unreachable server ends the chat at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from r1serve.client.errors import ClientError
from r1serve.client.settings import DEFAULT_BASE_URL
from r1serve.client.sync_client import LLMClient
from r1serve.client.types import ChatResult, StreamDelta, StreamEnd

DIM, RESET = "\x1b[2m", "\x1b[0m"
PROMPT = ">>> "
HELP = "/reset clears the history, /exit (or Ctrl-D) quits, /help shows this."


class Renderer:
    """Writes one streamed turn: reasoning dimmed (or labelled when plain), then the answer, then a stats line."""

    def __init__(self, out: TextIO, color: bool, show_reasoning: bool) -> None:
        self.out, self.color, self.show_reasoning = out, color, show_reasoning
        self.section: str | None = None
        self.tail = "\n"  # the last characters written (to end a section with exactly one blank line)

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.tail = (self.tail + text)[-2:]

    def _blank_line(self) -> str:
        return "\n" * (2 - len(self.tail) + len(self.tail.rstrip("\n")))

    def delta(self, delta: StreamDelta) -> None:
        if delta.kind == "reasoning" and not self.show_reasoning:
            return
        if delta.kind != self.section:
            self._switch(delta.kind)
        self._write(delta.text)

    def _switch(self, kind: str) -> None:
        if self.section == "reasoning":
            self._write((RESET if self.color else "") + self._blank_line())
        if self.color:
            self._write(DIM if kind == "reasoning" else "")
        else:
            self._write("[reasoning]\n" if kind == "reasoning" else "[answer]\n")
        self.section = kind

    def end(self, end: StreamEnd | None, interrupted: bool = False) -> None:
        if self.section == "reasoning" and self.color:
            self._write(RESET)
        note = "interrupted" if interrupted or end is None else _stats(end)
        newline = "" if self.tail.endswith("\n") else "\n"
        self._write(f"{newline}{DIM}[{note}]{RESET}\n" if self.color else f"{newline}[{note}]\n")
        self.section = None


def _stats(end: StreamEnd) -> str:
    parts = [f"finish: {end.finish_reason}"]
    if end.usage is not None:
        tokens = f"{end.usage.completion_tokens} tokens"
        if end.usage.reasoning_tokens is not None:
            tokens += f" ({end.usage.reasoning_tokens} reasoning)"
        parts.append(tokens)
    parts.append(f"{end.latency_s:.1f} s")
    return ", ".join(parts)


@dataclass
class ChatSession:
    """A conversation: the history holds user turns and the answers (never the reasoning) of the model."""

    client: LLMClient
    renderer: Renderer
    system: str | None = None
    request_options: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)

    def messages_for(self, question: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, {"role": "user", "content": question}]

    def ask(self, question: str) -> ChatResult | None:
        """Stream one turn to the renderer; keep it in the history unless it was interrupted."""
        stream = self.client.stream_chat(self.messages_for(question), **self.request_options)
        end: StreamEnd | None = None
        try:
            for item in stream:
                if isinstance(item, StreamEnd):
                    end = item
                else:
                    self.renderer.delta(item)
        except KeyboardInterrupt:
            stream.close()
            self.renderer.end(None, interrupted=True)
            return None
        self.renderer.end(end)
        result = stream.result()
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": result.content}]
        return result

    def reset(self) -> None:
        self.history.clear()


def repl(session: ChatSession, read: Callable[[str], str], out: TextIO) -> int:
    """Read questions until /exit or end of input; a failed turn prints one line and the chat goes on."""
    while True:
        try:
            line = read(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            session.reset()
            out.write("(history cleared)\n")
        elif line == "/help":
            out.write(HELP + "\n")
        elif line.startswith("/"):
            out.write(f"unknown command {line.split()[0]!r}; {HELP}\n")
        else:
            try:
                session.ask(line)
            except ClientError as e:
                out.write(f"error: {e.message}\n")
            except KeyboardInterrupt:
                out.write("\n(interrupted)\n")
        out.flush()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r1serve chat", description="Chat with a running r1serve (or any "
                                "OpenAI-compatible) server; the reasoning is shown dimmed, apart from the answer.")
    p.add_argument("question", nargs="?", help="ask this one question, print the answer and exit")
    p.add_argument("--url", default=DEFAULT_BASE_URL, help=f"the server's base URL (default {DEFAULT_BASE_URL})")
    p.add_argument("--model", default=None, help="model name (default: the first the server lists)")
    p.add_argument("--api-key", default=None, help="API key (default $R1SERVE_API_KEY, else none)")
    p.add_argument("--system", default=None, help="a system message (folded into the first turn for R1)")
    p.add_argument("--show-reasoning", dest="show_reasoning", action="store_true", default=True,
                   help="show the reasoning (default)")
    p.add_argument("--hide-reasoning", dest="show_reasoning", action="store_false", help="show only the answer")
    p.add_argument("--no-color", action="store_true", help="plain text even on a terminal")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (server default: 0.6)")
    p.add_argument("--max-tokens", type=int, default=None, help="limit on generated tokens per turn")
    p.add_argument("--max-thinking-tokens", type=int, default=None,
                   help="r1serve: close the reasoning after this many tokens, then answer")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for an answer (default 600)")
    return p


def _request_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {"temperature": args.temperature, "max_tokens": args.max_tokens,
               "max_thinking_tokens": args.max_thinking_tokens}
    return {k: v for k, v in options.items() if v is not None}


def _read_line(prompt: str) -> str:
    return input(prompt)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = sys.stdout
    color = out.isatty() and not args.no_color
    try:
        client = LLMClient(args.url, api_key=args.api_key, model=args.model, timeout=args.timeout, max_retries=2)
        model = client.resolve_model()
    except ClientError as e:
        print(f"r1serve chat: {e.message}", file=sys.stderr)
        return 1
    session = ChatSession(client, Renderer(out, color, args.show_reasoning), system=args.system,
                          request_options=_request_options(args))
    if args.question is not None:
        try:
            session.ask(args.question)
        except ClientError as e:
            print(f"r1serve chat: {e.message}", file=sys.stderr)
            return 1
        return 0
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    out.write(f"r1serve chat: {model} at {client.base_url}. {HELP}\n")
    return repl(session, _read_line, out)
