"""`r1serve eval` against a small fake OpenAI server in this process, whose answers are known in advance.

The fake answers each GSM8K problem right on even seeds and off by one on odd seeds (or, given `wrong`,
right on all problems but those), so every metric has an exact expected value; it can fail chosen problems
with HTTP 500, refuse `max_tokens` above a limit the way r1serve does, stream, and answer slowly. Checked
here: failures are recorded per sample, counted, and retried by a rerun; settings reach the server (seeds,
sampling, the thinking budget, a real system message, `max_tokens` capped by the context); a resume with
other settings is refused; `--report-only`; an unreachable server; a bad dataset; Ctrl-C (exit 130, finished
samples kept, the same command resumes).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from conftest import SHARED_DATA
from r1serve.eval.cli import main
from r1serve.eval.datasets import load_task
from server_utils import free_port

GSM8K = load_task("gsm8k", data_dir=SHARED_DATA, limit=6).problems if SHARED_DATA.exists() else ()
pytestmark = pytest.mark.skipif(not GSM8K, reason=f"no shared data at {SHARED_DATA}")


@dataclass
class Behavior:
    fail: set[int] = field(default_factory=set)  # indices of GSM8K problems answered with HTTP 500
    refuse_above: int | None = None  # 400 like r1serve when max_tokens is larger
    max_model_len: int = 100000
    delay_s: float = 0.0
    wrong: set[int] | None = None  # if set: right on every problem but these, whatever the seed
    bodies: list[dict] = field(default_factory=list)


def _problem_index(body: dict) -> int:
    text = body["messages"][-1]["content"]
    return next(i for i, p in enumerate(GSM8K) if p.problem in text)


def _is_right(body: dict, behavior: Behavior) -> bool:
    if behavior.wrong is not None:
        return _problem_index(body) not in behavior.wrong
    return body.get("seed", 0) % 2 == 0


def _message(body: dict, behavior: Behavior) -> dict:
    gold = int(GSM8K[_problem_index(body)].answer)
    answer = gold if _is_right(body, behavior) else gold + 1
    return {"role": "assistant", "reasoning_content": "Let me add 1 and 2 and 3.",
            "content": f"So the answer is $\\boxed{{{answer}}}$."}


USAGE = {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70,
         "completion_tokens_details": {"reasoning_tokens": 12}}


async def _stream(body: dict, behavior: Behavior) -> AsyncIterator[bytes]:
    message = _message(body, behavior)
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "fake-r1"}
    deltas = [{"role": "assistant"}, {"reasoning_content": message["reasoning_content"]},
              {"content": message["content"]}]
    for delta in deltas:
        yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': delta}]})}\n\n".encode()
        await asyncio.sleep(0.01)
    last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": USAGE}
    yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode()


def fake_app(behavior: Behavior) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-r1", "object": "model",
                                            "max_model_len": behavior.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> object:
        body = await request.json()
        behavior.bodies.append(body)
        await asyncio.sleep(behavior.delay_s)
        if _problem_index(body) in behavior.fail:
            return JSONResponse({"error": {"message": "injected failure", "type": "server_error"}}, 500)
        if behavior.refuse_above is not None and body["max_tokens"] > behavior.refuse_above:
            message = (f"max_tokens={body['max_tokens']} does not fit: the prompt has 80 tokens and the context "
                       f"window is {behavior.refuse_above + 80} (--max-model-len), so at most {behavior.refuse_above}")
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, 400)
        if body.get("stream"):
            return StreamingResponse(_stream(body, behavior), media_type="text/event-stream")
        return {"id": "c1", "object": "chat.completion", "created": 0, "model": "fake-r1",
                "choices": [{"index": 0, "message": _message(body, behavior), "finish_reason": "stop"}], "usage": USAGE}

    return app


@dataclass
class FakeServer:
    url: str
    behavior: Behavior


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeServer]]:
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**kwargs: object) -> FakeServer:
        behavior = Behavior(**kwargs)  # type: ignore[arg-type]
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(fake_app(behavior), host="127.0.0.1", port=port,
                                               log_level="error", lifespan="off"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started, "fake server did not start"
        servers.append((server, thread))
        return FakeServer(f"http://127.0.0.1:{port}/v1", behavior)

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=5)


def eval_args(url: str, out: Path, *extra: str) -> list[str]:
    return ["--url", url, "--task", "gsm8k", "--data-dir", str(SHARED_DATA), "--limit", "6",
            "--num-samples", "2", "--output-dir", str(out), "--no-progress", "--max-retries", "0",
            "--bootstrap-resamples", "200", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def test_failed_requests_are_recorded_counted_and_retried(fake_server, tmp_path: Path, capsys) -> None:
    server = fake_server(fail={1, 4})
    assert main(eval_args(server.url, tmp_path)) == 0
    stdout = capsys.readouterr().out
    lines = read_jsonl(tmp_path / "samples.jsonl")
    assert len(lines) == 12
    errors = [r for r in lines if r["error"]]
    assert len(errors) == 4 and all("injected failure" in r["error"] for r in errors)
    assert {r["problem_id"] for r in errors} == {GSM8K[1].id, GSM8K[4].id}
    (result,) = summary(tmp_path)["results"]
    assert (result["num_errors"], result["num_problems"], result["num_samples"]) == (4, 4, 8)
    assert result["pass1"] == 0.5 and result["pass1_per_set"] == [1.0, 0.0]
    assert result["pass_at_k"] == {"1": 0.5, "2": 1.0} and result["maj_at_k"]["2"] == 1.0  # tie: first wins
    assert result["mean_reasoning_tokens"] == 12 and result["mean_answer_tokens"] == 8
    assert "gsm8k  paper" in stdout and "4 samples failed" in stdout
    assert json.loads(stdout.strip().splitlines()[-1])["eval"]["num_samples"] == 2
    assert {(b["seed"], b["temperature"], b["top_p"]) for b in server.behavior.bodies} == {(0, 0.6, 0.95),
                                                                                          (1, 0.6, 0.95)}

    with (tmp_path / "samples.jsonl").open("a") as f:
        f.write('{"task": "gsm8k", "policy": "pa')  # a line cut off by a killed process
    server.behavior.fail.clear()
    num_before = len(server.behavior.bodies)
    assert main(eval_args(server.url, tmp_path)) == 0
    assert len(server.behavior.bodies) - num_before == 4  # only the failed samples were sent again
    (result,) = summary(tmp_path)["results"]
    assert (result["num_errors"], result["num_problems"], result["pass1"]) == (0, 6, 0.5)
    assert any("1 unreadable lines" in n for n in summary(tmp_path)["notes"])


def test_settings_reach_the_server(fake_server, tmp_path: Path, capsys) -> None:
    server = fake_server(max_model_len=400)
    args = eval_args(server.url, tmp_path, "--policy", "paper", "system", "--seed", "100",
                     "--max-thinking-tokens", "7", "--limit", "2")
    assert main(args) == 0
    bodies = server.behavior.bodies
    assert len(bodies) == 2 * 2 * 2 and {b["seed"] for b in bodies} == {100, 101}
    assert all(b["max_thinking_tokens"] == 7 for b in bodies)
    assert all(1 <= b["max_tokens"] < 400 for b in bodies)  # 32768 capped by the 400-token window
    system = [b for b in bodies if b["messages"][0]["role"] == "system"]
    assert len(system) == 4 and all("\\boxed{}" in b["messages"][0]["content"] for b in system)
    assert "does not fit the server's context window of 400" in capsys.readouterr().out
    data = summary(tmp_path)
    assert [r["policy"] for r in data["results"]] == ["paper", "system"]
    (comparison,) = data["comparisons"]
    assert comparison["diff"] == 0.0 and comparison["excludes_zero"] is False
    assert data["settings"]["max_model_len"] == 400 and data["settings"]["model"] == "fake-r1"
    assert all((tmp_path / name).stat().st_size > 1000 for name in (
        "accuracy_by_policy.png", "accuracy_vs_reasoning_length.png", "reasoning_tokens_hist.png"))


def test_a_context_refusal_is_retried_at_the_limit_it_states(fake_server, tmp_path: Path) -> None:
    server = fake_server(refuse_above=50)
    assert main(eval_args(server.url, tmp_path, "--limit", "2")) == 0
    lines = read_jsonl(tmp_path / "samples.jsonl")
    assert len(lines) == 4 and not any(r["error"] for r in lines)
    assert {r["generation"]["effective_max_tokens"] for r in lines} == {50}


def test_streamed_requests_record_time_to_first_token(fake_server, tmp_path: Path) -> None:
    server = fake_server()
    assert main(eval_args(server.url, tmp_path, "--limit", "2", "--stream")) == 0
    lines = read_jsonl(tmp_path / "samples.jsonl")
    assert all(b["stream"] for b in server.behavior.bodies)
    assert all(r["ttft_s"] is not None and r["ttft_s"] <= r["latency_s"] for r in lines)
    assert [r["grade"]["correct"] for r in sorted(lines, key=lambda r: r["seed"])] == [True, True, False, False]


def test_resume_with_other_settings_is_refused(fake_server, tmp_path: Path, capsys) -> None:
    server = fake_server()
    assert main(eval_args(server.url, tmp_path, "--limit", "1")) == 0
    capsys.readouterr()
    assert main(eval_args(server.url, tmp_path, "--limit", "1", "--temperature", "0.7")) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "temperature was 0.6, now 0.7" in err and "--output-dir" in err


def test_report_only_recomputes_without_a_server(fake_server, tmp_path: Path) -> None:
    server = fake_server()
    assert main(eval_args(server.url, tmp_path)) == 0
    before = summary(tmp_path)["results"]
    (tmp_path / "summary.json").unlink()
    (tmp_path / "report.md").unlink()
    assert main(eval_args("http://127.0.0.1:9/v1", tmp_path, "--report-only")) == 0
    assert summary(tmp_path)["results"] == before
    assert "pass@1" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_unreachable_server_is_one_clear_error(tmp_path: Path, capsys) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert main(eval_args(url, tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"cannot start the evaluation: cannot connect to {url}" in err
    assert not (tmp_path / "samples.jsonl").exists()


def test_bad_dataset_is_reported_before_any_request(tmp_path: Path, capsys) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2", "answer": \n', encoding="utf-8")
    assert main(["--url", "http://127.0.0.1:9/v1", "--task", str(data), "--output-dir", str(tmp_path)]) == 2
    assert "d.jsonl:2: not valid JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_keeps_finished_samples_and_the_same_command_resumes(fake_server, tmp_path: Path) -> None:
    server = fake_server(delay_s=0.3)
    args = eval_args(server.url, tmp_path, "--concurrency", "2")
    process = subprocess.Popen([sys.executable, "-m", "r1serve.cli", "eval", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = tmp_path / "samples.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not samples.exists() or len(read_jsonl(samples)) < 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    saved = read_jsonl(samples)
    assert 3 <= len(saved) < 12 and not any(r["error"] for r in saved)
    assert "interrupted" in stderr and f"{len(saved)} finished samples are saved" in stderr
    assert "Traceback" not in stderr
    num_before = len(server.behavior.bodies)
    server.behavior.delay_s = 0.0
    assert main(args) == 0
    assert len(read_jsonl(samples)) == 12
    assert len(server.behavior.bodies) - num_before == 12 - len(saved)


def test_a_model_the_server_does_not_serve_is_refused_up_front(fake_server, tmp_path: Path, capsys) -> None:
    server = fake_server()
    assert main(eval_args(server.url, tmp_path, "--model", "other-model")) == 2
    assert "does not serve the model 'other-model' (it serves: fake-r1)" in capsys.readouterr().err
    assert server.behavior.bodies == []
