"""The eval's inputs: built-in tasks from ../shared/data, JSONL files with their errors (which line, which
field), prompt policies, and the frozen config with its generated command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from r1serve.eval.config import EvalConfig, parse_config
from r1serve.eval.datasets import BUILTIN_TASKS, DatasetError, load_task
from r1serve.eval.policies import PolicyError, parse_policies, parse_policy
from r1serve.prompts import MATH_PROMPT_EN, MATH_PROMPT_ZH


def test_builtin_tasks_load_with_their_gold_answers(shared_data: Path) -> None:
    gsm8k = load_task("gsm8k", data_dir=shared_data)
    assert len(gsm8k.problems) == 1319 and gsm8k.spec.answer_kind == "numeric"
    assert gsm8k.problems[0].answer == "18" and gsm8k.problems[0].id == "0"
    assert gsm8k.problems[0].problem.startswith("Janet")
    assert all("," not in p.answer for p in gsm8k.problems)
    math500 = load_task("math500", data_dir=shared_data)
    assert len(math500.problems) == 500 and math500.problems[0].id == "test/precalculus/807.json"
    assert math500.problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    aime = load_task("aime24", data_dir=shared_data, limit=3)
    assert [p.id for p in aime.problems] == ["2024-I-1", "2024-I-2", "2024-I-3"]
    assert aime.problems[0].answer == "204" and aime.source.endswith("aime24/test.jsonl")


def test_builtin_task_without_local_file_or_datasets_says_what_to_do(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # a machine without `datasets` (it would go to the hub)
    with pytest.raises(DatasetError, match="no local file.*datasets.*--data-dir"):
        load_task("math500", data_dir=tmp_path)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_task_with_custom_fields_and_name(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.jsonl", [json.dumps({"q": "1+1?", "a": 2, "uid": "x1"}),
                                           "", json.dumps({"q": "2+2?", "a": "4", "uid": "x2"})])
    task = load_task(f"adds={path}", problem_field="q", answer_field="a", id_field="uid")
    assert task.name == "adds" and [p.id for p in task.problems] == ["x1", "x2"]
    assert [p.answer for p in task.problems] == ["2", "4"]
    assert task.spec.answer_kind == "numeric"  # every gold answer is a number
    default = load_task(str(_write(tmp_path / "test.jsonl", [json.dumps({"problem": "p", "answer": "\\pi"})])))
    assert default.name == tmp_path.name and default.spec.answer_kind == "math"


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", [json.dumps({"problem": "a", "answer": "1"}), "{not json", "[]"])
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: not valid JSON"):
        load_task(str(path))
    path = _write(tmp_path / "list.jsonl", [json.dumps({"problem": "a", "answer": "1"}), "[1, 2]"])
    with pytest.raises(DatasetError, match=r"list\.jsonl:2: expected a JSON object, got list"):
        load_task(str(path))


def test_unknown_field_lists_the_fields_present(tmp_path: Path) -> None:
    path = _write(tmp_path / "f.jsonl", [json.dumps({"question": "a", "solution": "1"})])
    with pytest.raises(DatasetError, match=r"f\.jsonl:1: no field 'problem' \(fields present: question, "
                                           r"solution\).*--problem-field"):
        load_task(str(path))
    with pytest.raises(DatasetError, match="no field 'answer'"):
        load_task(str(path), problem_field="question")


@pytest.mark.parametrize("lines, message", [
    ([json.dumps({"problem": "a", "answer": ""})], "field 'answer' is empty"),
    ([json.dumps({"problem": "", "answer": "1"})], "must be a non-empty string"),
    ([], "no records"),
    ([json.dumps({"problem": "a", "answer": "1", "id": "k"})] * 2, "duplicate problem id 'k'"),
])
def test_bad_records(tmp_path: Path, lines: list[str], message: str) -> None:
    path = _write(tmp_path / "d.jsonl", lines)
    with pytest.raises(DatasetError, match=message):
        load_task(str(path), id_field="id" if "duplicate" in message else None)


def test_missing_file_and_unknown_task(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown task 'gsm9k'.*gsm8k, math500, aime24"):
        load_task("gsm9k")
    with pytest.raises(DatasetError, match="no file"):
        load_task(str(tmp_path / "absent.jsonl"))
    with pytest.raises(DatasetError, match="--limit"):
        load_task("gsm8k", limit=0)


def test_hub_ids_need_the_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # a machine without `datasets`
    with pytest.raises(DatasetError, match="needs the `datasets` package.*or pass a local JSONL"):
        load_task("hf:someone/some-math@test")


def test_gsm8k_answer_without_marker_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    _write(folder / "test.jsonl", [json.dumps({"question": "q", "answer": "just 5"})])
    with pytest.raises(DatasetError, match=r"test\.jsonl:1: field 'answer' has no '####'"):
        load_task("gsm8k", data_dir=tmp_path)
    assert BUILTIN_TASKS["gsm8k"].hf_id == "openai/gsm8k"


def test_builtin_policies_build_the_right_messages() -> None:
    problem = "What is 1+1?"
    assert parse_policy("paper").messages(problem) == [
        {"role": "user", "content": f"{problem}\n{MATH_PROMPT_EN}"}]
    assert parse_policy("paper-zh").messages(problem) == [
        {"role": "user", "content": f"{problem}\n{MATH_PROMPT_ZH}"}]
    assert parse_policy("system").messages(problem) == [
        {"role": "system", "content": MATH_PROMPT_EN}, {"role": "user", "content": problem}]
    assert parse_policy("none").messages(problem) == [{"role": "user", "content": problem}]


def test_custom_policies(tmp_path: Path) -> None:
    custom = parse_policy("custom:Solve: {problem} Box it: \\boxed{}.")
    assert custom.name == "custom"
    assert custom.messages("x+1=2") == [{"role": "user", "content": "Solve: x+1=2 Box it: \\boxed{}."}]
    template = tmp_path / "t.txt"
    template.write_text("Problem:\n{problem}\n", encoding="utf-8")
    from_file = parse_policy(f"custom-file:@{template}")
    assert from_file.name == "custom-file" and from_file.messages("p")[0]["content"] == "Problem:\np\n"
    assert from_file.fingerprint != custom.fingerprint
    with pytest.raises(PolicyError, match="must contain {problem}"):
        parse_policy("custom:no placeholder")
    with pytest.raises(PolicyError, match="unknown policy 'papr'.*paper, paper-zh, system, none"):
        parse_policy("papr")
    with pytest.raises(PolicyError, match="template file not found"):
        parse_policy(f"custom:@{tmp_path / 'absent.txt'}")
    with pytest.raises(PolicyError, match="repeated: custom"):
        parse_policies(["custom:a {problem}", "custom:b {problem}"])


def test_config_defaults_are_the_papers_protocol() -> None:
    config = parse_config([])
    assert (config.temperature, config.top_p, config.max_tokens, config.num_samples) == (0.6, 0.95, 32768, 5)
    assert config.task == ("gsm8k",) and config.policy == ("paper",)
    config = parse_config(["--task", "gsm8k", "math500", "--policy", "paper", "none", "--num-samples", "3",
                           "--url", "http://h:1/v1", "--no-progress", "--max-thinking-tokens", "8"])
    assert config.task == ("gsm8k", "math500") and config.policy == ("paper", "none")
    assert (config.num_samples, config.base_url, config.progress, config.max_thinking_tokens) == (
        3, ("http://h:1/v1",), False, 8)
    assert EvalConfig(api_key="secret").to_dict()["api_key"] == "***"


@pytest.mark.parametrize("argv, message", [
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--top-p", "0"], "--top-p must be in"),
    (["--concurrency", "0"], "--concurrency"),
    (["--task", "gsm8k", "gsm8k"], "lists a task twice"),
])
def test_config_refuses_bad_values(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_config(argv)


def test_the_eval_never_imports_torch_or_the_engine() -> None:
    code = ("import sys, r1serve.eval, r1serve.eval.cli, r1serve.eval.evaluate; "
            "bad = [m for m in ('torch', 'r1serve.engine', 'r1serve.model') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
