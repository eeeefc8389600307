"""`r1serve bench` end to end against a real r1serve server subprocess running a tiny dummy model.

The bench's own request and token counts must agree with what the server itself counted on `/metrics`
(completion requests with status 200, generated tokens, prompt tokens computed plus prefix-cache hits), for
a random workload at concurrency 4 and for a two-URL comparison of the same server with itself; and the
chat route's `reasoning_content` split must give a time to the first answer token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import TOKENIZER_DIR
from r1serve.bench.cli import main
from r1serve.bench.tokens import BenchTokenizer
from server_utils import ServerHandle, running_server

pytestmark = pytest.mark.slow  # a server for the module (20 s to start here) and real load on it

COMPLETIONS_OK = 'r1serve_http_requests_total{route="/v1/completions",status="200"}'
CHAT_OK = 'r1serve_http_requests_total{route="/v1/chat/completions",status="200"}'
GENERATED = "r1serve_generation_tokens_total"
PROMPT = "r1serve_prompt_tokens_total"
CACHE_HITS = "r1serve_prefix_cache_hits_total"
PROBE_PROMPT = "Hello"  # what the bench's ignore_eos probe sends, with max_tokens=1


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[ServerHandle]:
    with running_server(tiny_model_dir, "--max-num-seqs", "8") as handle:
        yield handle


def scrape(url: str) -> dict[str, float]:
    """The samples of /metrics as {"name{labels}": value}."""
    samples = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    rc = main([*args, "--tokenizer", str(TOKENIZER_DIR), "--num-warmups", "0", "--no-progress", "--no-plots",
               "--output", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def server_bos(server: ServerHandle) -> int:
    """Tokens the server adds to a completion prompt (BOS), from the usage of one probe-like request."""
    r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                   json={"model": "DeepSeek-R1-Distill-Qwen-1.5B", "prompt": PROBE_PROMPT, "max_tokens": 1})
    return r.json()["usage"]["prompt_tokens"] - BenchTokenizer(TOKENIZER_DIR).count(PROBE_PROMPT)


def test_random_workload_at_concurrency_4_matches_server_metrics(server: ServerHandle, tmp_path: Path) -> None:
    bos = server_bos(server)
    before = scrape(server.url)
    result = bench(tmp_path, "--url", server.url, "--input-len", "16", "--output-len", "4", "--num-prompts", "8",
                   "--concurrency", "4")
    after = scrape(server.url)
    summary = result["runs"][0]["summary"]
    probes = result["endpoints"][0]["num_probe_requests"]
    assert probes == 1 and result["endpoints"][0]["ignore_eos"] is True
    assert summary["num_completed"] == 8 and summary["errors"] == {}
    assert summary["peak_concurrency"] == 4
    assert summary["token_sources"] == {"usage": 8}
    assert summary["total_output_tokens"] == 8 * 4  # ignore_eos honoured: exactly --output-len each
    assert summary["total_input_tokens"] == 8 * (16 + bos)  # exact prompt lengths, plus the server's BOS
    assert delta(before, after, COMPLETIONS_OK) == 8 + probes
    assert delta(before, after, GENERATED) == summary["total_output_tokens"] + probes
    prompt_tokens = delta(before, after, PROMPT) + delta(before, after, CACHE_HITS)
    probe_prompt_tokens = BenchTokenizer(TOKENIZER_DIR).count(PROBE_PROMPT) + bos
    assert prompt_tokens == summary["total_input_tokens"] + probes * probe_prompt_tokens
    assert summary["finish_reasons"] == {"length": 8}
    assert summary["ttft_ms"]["count"] == 8 and summary["tpot_ms"]["count"] == 8
    assert summary["itl_ms"]["count"] >= 8  # at least one gap per request (the server may bundle tokens)


def test_two_urls_same_server(server: ServerHandle, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = scrape(server.url)
    result = bench(tmp_path, "--url", server.url, "--url", f"{server.url}/v1", "--input-len", "8",
                   "--output-len", "3", "--num-prompts", "4", "--concurrency", "2")
    after = scrape(server.url)
    runs = result["runs"]
    assert [r["endpoint"] for r in runs] == [0, 1] and runs[0]["url"] == runs[1]["url"] == server.url
    assert all(r["summary"]["num_completed"] == 4 and r["summary"]["total_output_tokens"] == 12 for r in runs)
    probes = sum(e["num_probe_requests"] for e in result["endpoints"])
    assert delta(before, after, COMPLETIONS_OK) == 8 + probes
    assert delta(before, after, GENERATED) == 24 + probes
    printed = capsys.readouterr().out
    assert "[1] http://" in printed and "[2] / first" in printed and "x1.00" in printed  # same counts: ratio 1


def test_chat_reasoning_split_gives_first_answer_token(server: ServerHandle, tmp_path: Path) -> None:
    before = scrape(server.url)
    result = bench(tmp_path, "--url", server.url, "--endpoint", "chat", "--input-len", "8", "--output-len", "8",
                   "--max-thinking-tokens", "2", "--num-prompts", "2", "--concurrency", "2")
    after = scrape(server.url)
    summary = result["runs"][0]["summary"]
    assert result["settings"]["extra_body"] == {"max_thinking_tokens": 2}
    assert summary["num_completed"] == 2 and summary["total_output_tokens"] == 16
    assert summary["num_answered"] == 2  # the engine closed the reasoning; content followed
    assert 2 * 2 <= summary["total_reasoning_tokens"] < 16  # the budget, plus the closing tokens
    for r in result["runs"][0]["requests"]:
        assert r["ttft_s"] < r["ttfa_s"] <= r["e2e_s"]
    assert delta(before, after, CHAT_OK) == 2 + result["endpoints"][0]["num_probe_requests"]
