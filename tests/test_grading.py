"""Grading: the (gold, model output, expected) table, every GSM8K and MATH-500 reference solution, and the
pieces (last `</think>`, last box with brace matching, numbers, fallbacks) on their own.

The table lives in tests/data/eval/grading_table.jsonl, one row per case, each named after the pitfall it
covers (fractions, `\\frac` vs `/`, `\\dfrac`, units and degrees, `\\text{}`, intervals, multiple answers,
nested braces, several boxes, no box, thousands separators, negative numbers, answers only inside the
reasoning, truncated outputs). Outputs are whole completions as the model writes them after the forced
`<think>\\n`: reasoning, `</think>`, answer.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from r1serve.eval.datasets import load_task
from r1serve.eval.grader_pool import GradeRequest, GraderPool
from r1serve.eval.grading import (
    answer_region,
    extract_answer,
    grade_sync,
    last_boxed,
    normalize,
    split_output,
    to_number,
    vote_key,
)

TABLE_PATH = Path(__file__).parent / "data" / "eval" / "grading_table.jsonl"
TABLE = [json.loads(line) for line in TABLE_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
REQUIRED_CASES = {
    "fraction", "frac-vs-slash", "dfrac", "degrees", "units", "text", "interval", "multiple-answers",
    "nested-braces", "several-boxes", "no-box", "thousands", "negative", "reasoning-only", "truncated",
}


def _request(row: dict) -> GradeRequest:
    return GradeRequest(row["gold"], split_output(row["output"])[1], row["kind"])


def test_table_is_large_and_covers_every_pitfall() -> None:
    cases = Counter(row["case"] for row in TABLE)
    assert len(TABLE) >= 150
    assert REQUIRED_CASES <= set(cases), f"missing: {REQUIRED_CASES - set(cases)}"
    assert all(cases[c] >= 3 for c in REQUIRED_CASES), cases
    expected = Counter(row["expected"] for row in TABLE)
    assert expected[True] >= 50 and expected[False] >= 50  # both directions are tested


@pytest.mark.parametrize("row", TABLE, ids=[f"{r['id']}-{r['case']}" for r in TABLE])
def test_grading_table_row(row: dict) -> None:
    grade = grade_sync(row["gold"], split_output(row["output"])[1], row["kind"])
    assert grade.correct is row["expected"], grade


def test_pool_decides_the_table_like_the_main_thread() -> None:
    with GraderPool(num_workers=2, timeout_s=5) as pool:
        grades = pool.grade_many([_request(r) for r in TABLE])
    wrong = [(r["id"], r["case"], g) for r, g in zip(TABLE, grades, strict=True) if g.correct is not r["expected"]]
    assert not wrong
    assert {g.method for g in grades} >= {"string", "numeric", "math-verify", "none"}


def _gsm8k_pairs(shared_data: Path) -> tuple[list[GradeRequest], list[GradeRequest]]:
    """Each GSM8K solution with its `#### N` line boxed, graded against its own gold and the next problem's."""
    records = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()]
    golds = [p.answer for p in load_task("gsm8k", data_dir=shared_data).problems]
    right, shifted = [], []
    for i, record in enumerate(records):
        body, final = record["answer"].rsplit("#### ", 1)
        output = f"Let me solve it.\n</think>\n\n{body}The answer is $\\boxed{{{final.strip()}}}$."
        answer = split_output(output)[1]
        right.append(GradeRequest(golds[i], answer, "numeric"))
        shifted.append(GradeRequest(str(float(golds[i]) + 1), answer, "numeric"))  # the answer is off by one
        following = golds[(i + 1) % len(golds)]
        if vote_key(following) != vote_key(golds[i]):
            shifted.append(GradeRequest(following, answer, "numeric"))
    return right, shifted


def _math500_pairs(shared_data: Path) -> tuple[list[GradeRequest], list[GradeRequest]]:
    """Each MATH-500 solution (which boxes its answer) against its own gold and the next problem's gold."""
    records = [json.loads(line) for line in (shared_data / "math500" / "test.jsonl").read_text().splitlines()]
    right, shifted = [], []
    for i, record in enumerate(records):
        answer = split_output(f"Thinking.\n</think>\n\n{record['solution']}")[1]
        right.append(GradeRequest(record["answer"], answer, "math"))
        following = records[(i + 1) % len(records)]["answer"]
        if vote_key(following) != vote_key(record["answer"]):  # skip neighbours with the same answer
            shifted.append(GradeRequest(following, answer, "math"))
    return right, shifted


@pytest.mark.slow
def test_every_reference_solution_grades_correct_and_a_shifted_answer_wrong(shared_data: Path) -> None:
    gsm_right, gsm_shifted = _gsm8k_pairs(shared_data)
    math_right, math_shifted = _math500_pairs(shared_data)
    assert len(gsm_right) == 1319 and len(math_right) == 500
    assert len(math_shifted) >= 480 and len(gsm_shifted) >= 2 * 1319 - 60
    requests = gsm_right + math_right + gsm_shifted + math_shifted
    with GraderPool(num_workers=2, timeout_s=3) as pool:
        grades = pool.grade_many(requests)
    num_right = len(gsm_right) + len(math_right)
    not_right = [(r.gold, g.extracted) for r, g in zip(requests[:num_right], grades[:num_right], strict=True)
                 if not g.correct]
    not_wrong = [(r.gold, g.extracted) for r, g in zip(requests[num_right:], grades[num_right:], strict=True)
                 if g.correct]
    assert not not_right, not_right[:10]
    assert not not_wrong, not_wrong[:10]
    assert sum(g.method == "math-verify" for g in grades) > 200  # the hard cases did reach math-verify


def test_cut_is_at_the_last_think_close() -> None:
    assert split_output("a</think>b</think>\n\nc") == ("a</think>b", "\n\nc")
    assert split_output("still thinking \\boxed{1}") == ("still thinking \\boxed{1}", None)
    assert split_output("<think>\nx</think>y") == ("\nx", "y")


def test_answer_region_of_a_split_response() -> None:
    assert answer_region("", "reasoning that never closed \\boxed{5}") is None
    assert answer_region("  \n", "r") is None
    assert answer_region("The answer is \\boxed{5}", "r") == "The answer is \\boxed{5}"
    assert answer_region("x</think>y", "") == "y"  # a server that did not split


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{1} \\boxed{2}", "2"),
    ("\\boxed{\\frac{a}{b^{2}}}", "\\frac{a}{b^{2}}"),
    ("\\boxed{3} and \\boxed{4", "3"),
    ("\\fbox{7}", "7"),
    ("\\boxed 42$", "42"),
    ("\\boxed{ 5 }", "5"),
    ("no box here", None),
    ("\\boxedx{1}", None),
    ("\\boxed{}", ""),
])
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


@pytest.mark.parametrize("text, value", [
    ("18", 18.0), ("1,234,567", 1234567.0), ("\\$18.50", 18.5), ("18 dollars", 18.0), ("25\\%", 25.0),
    ("10^\\circ", 10.0), ("x = 5", 5.0), ("-3", -3.0), ("−3", -3.0), (".5", 0.5), ("5\\text{ cm}", 5.0),
    ("3x", None), ("\\frac{1}{2}", None), ("2, 3", None), ("5x+4=0", None), ("1, 234", None),
])
def test_to_number(text: str, value: float | None) -> None:
    assert to_number(text) == value


def test_numeric_fallbacks_in_order() -> None:
    assert extract_answer("#### 7\nThe answer is 8", "numeric").source == "answer-is"
    assert extract_answer("#### 7", "numeric").answer == "7"
    assert extract_answer("so 3 then 4", "numeric").answer == "4"
    assert extract_answer("so 3 then 4", "math").answer is None
    assert extract_answer(None, "numeric").source == "unclosed"


def test_normalize_and_vote_keys() -> None:
    assert normalize("\\left( 3, \\dfrac{\\pi}{2} \\right)") == normalize("(3,\\frac{\\pi}{2})")
    assert vote_key("1,000") == vote_key("1000.0") == vote_key("\\$1000")
    assert vote_key("\\frac12") != vote_key("\\frac13")
    assert vote_key(None) is None and vote_key("  ") is None
