"""`r1serve check` against a real r1serve server (passing; failing on an OOM log line, a wrong model name, a
wrong key, a stopped server) and against fakes (a generic OpenAI server that does not split reasoning; a
server that is not an OpenAI API). Each failure must end the output with one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from r1serve.client import check
from server_utils import ServerHandle, free_port
from test_client_e2e import KEY, MODEL, shared_server
from test_client_unit import FakeServer, serving

FAST_CHECK = ["--max-thinking-tokens", "2", "--max-tokens", "8"]
STEPS = ["health", "server", "models", "chat", "stream", "math", "rules"]


@pytest.fixture()
def server(request: pytest.FixtureRequest, tiny_model_dir: Path) -> ServerHandle:
    return shared_server(request, tiny_model_dir)


def run_check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = check.main(list(argv))
    return code, capsys.readouterr().out.strip().splitlines()


@pytest.mark.slow
def test_check_passes_on_a_healthy_server(server: ServerHandle) -> None:
    argv = ["--url", server.url, "--model", MODEL, "--api-key", KEY, "--log-file", str(server.log_path), *FAST_CHECK]
    done = subprocess.run([sys.executable, "-m", "r1serve.cli", "check", *argv], capture_output=True, text=True,
                          timeout=120)
    print(done.stdout)  # the sample in the README comes from here
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].split() == ["step", "result", "time"]
    rows = {line.split()[0]: line for line in lines[2:-1] if line[:1].strip()}
    assert list(rows) == ["log", *STEPS]
    assert "skipped: dummy weights" in rows["math"]
    assert all(" ok" in rows[name] for name in ["log", "health", "server", "models", "chat", "stream", "rules"])
    assert "TTFT" in rows["stream"] and "folded by the server" in done.stdout
    words = " ".join(done.stdout.split())  # the server row wraps: device, dtype, kernels, KV-cache dtype
    assert "quantization none; cpu, " in words and "kernels torch, attention torch, KV cache" in words
    assert lines[-1].startswith("PASSED: 7 steps ok, 1 skipped")


def test_check_fails_on_an_oom_line_in_the_log_and_on_expect_with_dummy_weights(
        server: ServerHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "deepseek_qwen.log"
    log.write_text(server.read_log() + "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    argv = ["--url", server.base_url, "--api-key", KEY, "--log-file", str(log), "--expect", "150", *FAST_CHECK]
    code, lines = run_check(capsys, *argv, "--json")
    report = json.loads("\n".join(lines))
    assert code == 1 and report["ok"] is False and report["error"] is None
    assert [s["step"] for s in report["steps"]] == ["log", *STEPS]
    oom = report["steps"][0]
    assert oom["status"] == "fail" and oom["detail"].startswith("CUDA out of memory (line")
    assert "lower --gpu-memory-utilization" in oom["detail"]
    math = report["steps"][1 + STEPS.index("math")]
    assert math["status"] == "fail" and "boxed" in math["detail"], "dummy weights cannot box 150"
    assert all(s["status"] == "ok" for s in report["steps"] if s["step"] not in ("log", "math"))
    table = check.render_table([check.Step(**s) for s in report["steps"]])
    assert "FAIL: CUDA out of memory (line" in table
    assert check.summary([check.Step(**s) for s in report["steps"]], None, "u") == "FAILED: 2 of 8 steps failed (u)"


@pytest.mark.parametrize("argv,message", [
    (["--model", "nope", "--api-key", KEY], "FAILED: model 'nope' is not served by"),
    (["--api-key", "wrong"], "refused the API key (401)"),
])
def test_check_fails_clearly_on_wrong_model_or_key(server: ServerHandle, capsys: pytest.CaptureFixture[str],
                                                   argv: list[str], message: str) -> None:
    code, lines = run_check(capsys, "--url", server.url, *argv)
    assert code == 1
    assert lines[-1].startswith("FAILED:") and message in lines[-1]


def test_check_fails_clearly_on_a_stopped_server(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, lines = run_check(capsys, "--url", url)
    assert code == 1
    assert lines[-1] == f"FAILED: cannot connect to {url}: [Errno 111] Connection refused (is the server running? " \
                        "start it with `r1serve serve`)"


def test_check_on_other_servers(capsys: pytest.CaptureFixture[str]) -> None:
    with serving(FakeServer()) as url:  # an OpenAI server that sends raw R1 text
        code, lines = run_check(capsys, "--url", url, "--expect", "4")
    assert code == 0, "\n".join(lines)
    assert "split by the client" in "\n".join(lines) and "\\boxed{4} = expected 4" in "\n".join(lines)
    with serving(FakeServer(failures=[(200, "<html>hello</html>")] * 9)) as url:
        code, lines = run_check(capsys, "--url", url)
    assert code == 1 and "not an OpenAI-compatible API" in lines[-1]


def test_log_checks_name_each_problem_with_its_fix(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("Loading checkpoint shards\nr1serve: model not found: /models/x\n"
                   "Traceback (most recent call last):\nOSError: [Errno 98] Address already in use\n")
    verdicts = check.check_log(log)
    assert all(status == "fail" for status, _ in verdicts)
    text = "\n".join(detail for _, detail in verdicts)
    for expected in ("no 'Application startup complete': the server is still loading",
                     "model not found (line 2): pass --model",
                     "a traceback (line 3)", "port already in use (line 4)"):
        assert expected in text
    assert check.check_log(tmp_path / "absent.log")[0][1].startswith("no log file at")
    log.write_text("INFO Application startup complete.\n")
    assert check.check_log(log) == [("ok", "startup complete; no OOM, model-not-found or traceback")]


def test_log_check_quotes_the_error_of_a_failed_start_and_notices_a_shutdown(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    first_run = ("INFO 12-03 09:00:00 [uvicorn.error] Started server process [1]\n"
                 "ERROR 12-03 09:00:01 [r1serve.server] old failure\n")
    failed = ("INFO 12-03 09:10:00 [uvicorn.error] Started server process [2]\n"
              "INFO 12-03 09:10:00 [uvicorn.error] Waiting for application startup.\n"
              "ERROR 12-03 09:10:05 [r1serve.server] cannot load the model: no config.json in /models/x\n")
    log.write_text(first_run + failed)
    assert check.check_log(log) == [
        ("fail", "the server failed to start (line 5): cannot load the model: no config.json in /models/x")]
    ran = failed.replace("ERROR 12-03 09:10:05 [r1serve.server] cannot load the model: no config.json in /models/x",
                         "INFO 12-03 09:10:09 [uvicorn.error] Application startup complete.")
    log.write_text(first_run + ran + "INFO 12-03 09:20:00 [uvicorn.error] Finished server process [2]\n")
    assert check.check_log(log) == [("fail", "the server has shut down (line 6): start it again")]
    log.write_text(first_run + ran)  # the first run's error is not this run's
    assert check.check_log(log)[0][0] == "ok"


def test_same_answer() -> None:
    assert check.same_answer("150", "150.0") and check.same_answer("$1,000$", "1000")
    assert check.same_answer("\\frac{1}{2}", "\\frac{1}{2}") and not check.same_answer("149", "150")
