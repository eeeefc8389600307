"""`r1serve eval` with several `--url`s: two fake servers (one always right, one wrong on chosen problems)
get the same problems, seeds and settings, their samples carry their labels, the endpoint comparison is the
paired interval of the policy comparison, resumes work per endpoint, and bad endpoint input exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest

import test_eval_fake_server as fake
from r1serve.eval.cli import main
from r1serve.eval.records import load_samples
from test_eval_fake_server import GSM8K, _problem_index, eval_args, read_jsonl, summary

fake_server = fake.fake_server  # the fixture, shared with the single-endpoint tests

pytestmark = pytest.mark.skipif(not GSM8K, reason="no shared data")


def two_endpoint_args(a: str, b: str, out: Path, *extra: str) -> list[str]:
    return eval_args(a, out, "--url", b, "--label", "bf16", "awq", *extra)


def _sent(bodies: list[dict]) -> list[tuple[int, int]]:
    return sorted((_problem_index(b), b["seed"]) for b in bodies)


def test_endpoints_get_the_same_samples_and_a_worse_one_shows_a_negative_interval(
        fake_server, tmp_path: Path, capsys) -> None:
    good, worse = fake_server(wrong=set()), fake_server(wrong={0, 1, 2, 3})
    assert main(two_endpoint_args(good.url, worse.url, tmp_path)) == 0
    stdout = capsys.readouterr().out
    assert _sent(good.behavior.bodies) == _sent(worse.behavior.bodies) == sorted(
        (i, seed) for i in range(6) for seed in (0, 1))
    lines = read_jsonl(tmp_path / "samples.jsonl")
    assert sorted(r["endpoint"] for r in lines) == ["awq"] * 12 + ["bf16"] * 12
    assert all(r["grade"]["correct"] for r in lines if r["endpoint"] == "bf16")
    data = summary(tmp_path)
    assert [(r["endpoint"], r["pass1"]) for r in data["results"]] == [("bf16", 1.0), ("awq", pytest.approx(2 / 6))]
    assert data["comparisons"] == []
    (row,) = data["endpoint_comparisons"]
    assert (row["baseline"], row["endpoint"], row["policy"], row["num_problems"]) == ("bf16", "awq", "paper", 6)
    assert row["diff"] == pytest.approx(-4 / 6) and row["ci_high"] < 0 and row["excludes_zero"] is True
    assert [e["label"] for e in data["settings"]["endpoints"]] == ["bf16", "awq"]
    table_row = next(line for line in stdout.splitlines() if line.startswith("gsm8k  paper   bf16      awq"))
    assert table_row.split()[4:7] == ["6", "100.0", "33.3"] and " -66.7 " in table_row
    assert table_row.endswith("yes") and "endpoint %" in stdout
    assert "## Endpoint comparison" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_a_resume_across_two_endpoints_runs_only_what_each_misses(fake_server, tmp_path: Path) -> None:
    good, worse = fake_server(wrong=set()), fake_server(wrong=set(), fail={1})
    args = two_endpoint_args(good.url, worse.url, tmp_path)
    assert main(args) == 0
    assert (len(good.behavior.bodies), len(worse.behavior.bodies)) == (12, 12)
    worse.behavior.fail.clear()
    assert main(args) == 0
    assert len(good.behavior.bodies) == 12  # nothing to redo at bf16
    assert _sent(worse.behavior.bodies[12:]) == [(1, 0), (1, 1)]  # only awq's two failed samples
    loaded = load_samples(tmp_path / "samples.jsonl")
    assert len(loaded.done()) == 24 and not loaded.failed()
    (row,) = summary(tmp_path)["endpoint_comparisons"]
    assert (row["num_problems"], row["diff"], row["excludes_zero"]) == (6, 0.0, False)


def test_several_policies_are_compared_within_each_endpoint_and_endpoints_within_each_policy(
        fake_server, tmp_path: Path) -> None:
    good, worse = fake_server(wrong=set()), fake_server(wrong={0})
    assert main(two_endpoint_args(good.url, worse.url, tmp_path, "--policy", "paper", "none",
                                  "--limit", "2")) == 0
    data = summary(tmp_path)
    assert [(r["policy"], r["endpoint"]) for r in data["results"]] == [
        ("paper", "bf16"), ("paper", "awq"), ("none", "bf16"), ("none", "awq")]
    assert [(c["endpoint"], c["baseline"], c["policy"]) for c in data["comparisons"]] == [
        ("bf16", "paper", "none"), ("awq", "paper", "none")]
    assert [(c["policy"], c["baseline"], c["endpoint"], c["diff"]) for c in data["endpoint_comparisons"]] == [
        ("paper", "bf16", "awq", -0.5), ("none", "bf16", "awq", -0.5)]


def test_report_only_with_two_endpoints_needs_their_labels(fake_server, tmp_path: Path, capsys) -> None:
    good, worse = fake_server(wrong=set()), fake_server(wrong={0, 1})
    assert main(two_endpoint_args(good.url, worse.url, tmp_path, "--limit", "2")) == 0
    before = summary(tmp_path)["endpoint_comparisons"]
    capsys.readouterr()
    assert main(eval_args("http://127.0.0.1:9/v1", tmp_path, "--limit", "2", "--report-only")) == 2
    assert "holds the endpoints awq, bf16: name the ones to report with --label" in capsys.readouterr().err
    assert main(eval_args("http://127.0.0.1:9/v1", tmp_path, "--url", "http://127.0.0.1:10/v1", "--limit", "2",
                          "--label", "bf16", "awq", "--report-only")) == 0
    assert summary(tmp_path)["endpoint_comparisons"] == before


def test_a_single_endpoint_resumes_lines_written_without_an_endpoint(fake_server, tmp_path: Path) -> None:
    server = fake_server()
    assert main(eval_args(server.url, tmp_path, "--limit", "2")) == 0
    samples = tmp_path / "samples.jsonl"
    old_style = [line.replace(f'"endpoint": "{r["endpoint"]}", ', "")
                 for line, r in zip(samples.read_text().splitlines(), read_jsonl(samples), strict=True)]
    assert all('"endpoint"' not in line for line in old_style)
    samples.write_text("\n".join(old_style) + "\n")
    num_before = len(server.behavior.bodies)
    assert main(eval_args(server.url, tmp_path, "--limit", "2")) == 0
    assert len(server.behavior.bodies) == num_before
    (result,) = summary(tmp_path)["results"]
    assert result["num_samples"] == 4 and result["endpoint"] == server.url.split("/")[2]


@pytest.mark.parametrize("extra, message", [
    (["--url", "http://127.0.0.1:9/v1", "--label", "only-one"], "--label needs one label per --url (2)"),
    (["--url", "http://127.0.0.1:10/v1", "--label", "a", "a"], "endpoint labels must be unique"),
    (["--url", "http://127.0.0.1:9/v2"], "labels must be unique, got 127.0.0.1:9, 127.0.0.1:9"),
    (["--url", "http://127.0.0.1:9/v1"], "--url lists a URL twice"),
])
def test_bad_endpoint_input_is_one_clear_error(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    assert main(eval_args("http://127.0.0.1:9/v1", tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "samples.jsonl").exists()
