"""`r1serve chat`: driven through a pseudo-terminal against a real r1serve server (dimmed reasoning, a turn,
history kept, /reset, /exit), one-shot and plain output against a fake server, and the REPL's history rules
(earlier answers kept, earlier reasoning never sent back)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from r1serve.client import chat_cli
from r1serve.client.chat_cli import DIM, ChatSession, Renderer, repl
from server_utils import ServerHandle, free_port
from test_client_e2e import KEY, MODEL, shared_server
from test_client_unit import ANSWER, REASONING, FakeServer, chat_bodies, make_client, serving

PROMPT_TOKENS = re.compile(r": chat, (\d+) prompt tokens")


@pytest.fixture()
def server(request: pytest.FixtureRequest, tiny_model_dir: Path) -> ServerHandle:
    return shared_server(request, tiny_model_dir)


def test_chat_in_a_terminal_keeps_history_and_resets(server: ServerHandle) -> None:
    log_start = len(server.read_log())
    child = pexpect.spawn(sys.executable, ["-m", "r1serve.cli", "chat", "--url", server.url, "--api-key", KEY,
                                           "--model", MODEL, "--max-thinking-tokens", "3", "--max-tokens", "8"],
                          env={**os.environ, "TERM": "dumb"}, encoding="utf-8", timeout=60)
    try:
        child.expect_exact(f"r1serve chat: {MODEL} at {server.base_url}")
        for question in ("Hello", "And again"):
            child.expect_exact(">>> ")
            child.sendline(question)
            child.expect_exact(DIM)  # the reasoning streams dimmed
            child.expect(r"\[finish: (stop|length), \d+ tokens \(\d+ reasoning\), [\d.]+ s\]")
        child.expect_exact(">>> ")
        child.sendline("/reset")
        child.expect_exact("(history cleared)")
        child.expect_exact(">>> ")
        child.sendline("Hello")
        child.expect(r"\[finish: ")
        child.expect_exact(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    first, second, after_reset = (int(n) for n in PROMPT_TOKENS.findall(server.read_log()[log_start:])[-3:])
    assert second > first + 2, "the second turn carries the first turn's question and answer"
    assert after_reset == first, "after /reset the history is empty again"


def test_one_shot_plain_output_and_hidden_reasoning() -> None:
    with serving(FakeServer()) as url:
        shown = subprocess.run([sys.executable, "-m", "r1serve.cli", "chat", "--url", url, "2+2?"],
                               capture_output=True, text=True, timeout=60)
        hidden = subprocess.run([sys.executable, "-m", "r1serve.cli", "chat", "--url", url, "--hide-reasoning",
                                 "2+2?"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and hidden.returncode == 0, shown.stderr + hidden.stderr
    assert shown.stdout.startswith(f"[reasoning]\n{REASONING}\n[answer]\n{ANSWER}\n[finish: stop, 20 tokens")
    assert "\x1b[" not in shown.stdout, "no ANSI codes when stdout is not a terminal"
    assert hidden.stdout.startswith(f"[answer]\n{ANSWER}\n") and "Let me add" not in hidden.stdout


def test_repl_history_holds_answers_only() -> None:
    fake = FakeServer()
    out = io.StringIO()
    session = ChatSession(make_client(fake, model="m"), Renderer(out, color=False, show_reasoning=True),
                          system="Be brief.")
    lines = iter(["first", "/help", "/nope", "second", "/reset", "third", "/exit", "never read"])
    assert repl(session, lambda prompt: next(lines), out) == 0
    first, second, third = (body["messages"] for body in chat_bodies(fake))
    assert first == [{"role": "user", "content": "Be brief.\n\nfirst"}]
    assert second == [{"role": "user", "content": "Be brief.\n\nfirst"}, {"role": "assistant", "content": ANSWER},
                      {"role": "user", "content": "second"}]
    assert third == first[:0] + [{"role": "user", "content": "Be brief.\n\nthird"}]
    text = out.getvalue()
    assert "(history cleared)" in text and "/reset clears the history" in text and "unknown command '/nope'" in text


def test_colored_rendering_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    session = ChatSession(make_client(FakeServer(), model="m"), Renderer(out, color=True, show_reasoning=True))
    session.ask("q")
    text = out.getvalue()
    assert text.startswith(DIM + REASONING) and f"\x1b[0m\n{ANSWER}\n" in text
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert chat_cli.main(["--url", url, "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"r1serve chat: cannot connect to {url}")
