"""`r1serve eval` end to end against a real r1serve server subprocess running a tiny dummy model.

10 GSM8K problems x 2 samples x 2 policies with a small `max_tokens` and a thinking budget, so that the
engine closes the reasoning itself and every output has an answer part. The weights are random, so the
accuracy is not the point; the pipeline is: samples.jsonl, summary.json, report.md and the three PNGs are
written, the settings are recorded, and a rerun after losing some samples runs exactly the missing ones
and, thanks to the per-sample seeds, reproduces them (in float32: bf16's batch-dependent rounding can
tip a near-tied draw).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from r1serve.eval.cli import main
from server_utils import ServerHandle, running_server

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[ServerHandle]:
    # float32: a rerun's other batches then round the logits apart by float32 ulps only, which tips no draw of
    # this data (in bf16, where the CPU has it, one of its draws is tied within 0.1% and flips)
    with running_server(tiny_model_dir, "--max-model-len", "1024", "--max-num-seqs", "40",
                        "--dtype", "float32") as handle:
        yield handle


def _args(server: ServerHandle, out: Path, shared_data: Path) -> list[str]:
    return ["--url", server.base_url, "--task", "gsm8k", "--data-dir", str(shared_data), "--limit", "10",
            "--num-samples", "2", "--policy", "paper", "none", "--max-tokens", "12",
            "--max-thinking-tokens", "6", "--concurrency", "40", "--output-dir", str(out), "--no-progress",
            "--bootstrap-resamples", "500"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.slow
def test_eval_end_to_end_and_resume(server: ServerHandle, shared_data: Path, tmp_path: Path, capsys) -> None:
    args = _args(server, tmp_path, shared_data)
    assert main(args) == 0, server.read_log()[-3000:]
    first = capsys.readouterr()
    samples = _lines(tmp_path / "samples.jsonl")
    assert len(samples) == 40 and not any(s["error"] for s in samples)
    assert {(s["policy"], s["sample_index"]) for s in samples} == {(p, i) for p in ("paper", "none") for i in (0, 1)}
    assert all(s["grade"]["method"] in ("none", "string", "numeric", "math-verify") for s in samples)
    assert all(s["finish_reason"] in ("stop", "length", "repetition") for s in samples)
    assert all(s["completion_tokens"] <= 12 and s["reasoning_tokens"] is not None for s in samples)
    assert sum(bool(s["content"]) for s in samples) >= 30  # the thinking budget closed the reasoning

    data = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert [(r["task"], r["policy"], r["num_samples"]) for r in data["results"]] == [
        ("gsm8k", "paper", 20), ("gsm8k", "none", 20)]
    assert len(data["comparisons"]) == 1 and data["settings"]["max_model_len"] == 1024
    assert any("dummy weights" in n for n in data["notes"])
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "## Results" in report and "## Policy comparison" in report and "accuracy_by_policy.png" in report
    for name in ("accuracy_by_policy.png", "accuracy_vs_reasoning_length.png", "reasoning_tokens_hist.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert json.loads(first.out.strip().splitlines()[-1])["eval"]["policy"] == ["paper", "none"]

    kept, lost = samples[:30], {(s["policy"], s["problem_id"], s["sample_index"]): s for s in samples[30:]}
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in kept), encoding="utf-8")
    assert main(args) == 0
    assert "40 samples, 30 already done, 10 to run" in capsys.readouterr().err
    redone = _lines(tmp_path / "samples.jsonl")[30:]
    assert len(redone) == 10
    for s in redone:  # same seeds, same engine: the same texts again
        before = lost[(s["policy"], s["problem_id"], s["sample_index"])]
        assert (s["seed"], s["reasoning"], s["content"]) == (before["seed"], before["reasoning"], before["content"])
