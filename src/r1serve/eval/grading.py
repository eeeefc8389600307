"""Grading one model output against a gold answer: where the answer is, what it is, and whether it is right.

The pitfalls this module exists to avoid: with the forced-thinking template only the closing `</think>`
appears, so the answer is the text after the *last* `</think>`, and an output whose reasoning never closed
(truncated, or still thinking) has no answer at all, even if a `\\boxed{}` sits in its reasoning. The answer
is the last `\\boxed{...}` (or `\\fbox{...}`) with brace matching; numeric tasks (GSM8K) fall back to
"the answer is ...", `#### ...` and the last number. The cheap checks (normalized string equality, numbers
within 1e-6) run here; anything else goes to math-verify, which must run in a process pool (`grader_pool.py`)
because its timeout is a SIGALRM that only works in a main thread. `math_verify_check` is what workers run.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from r1serve.r1_rules import THINK_END, THINK_START, partition_last_think_end

NUMERIC_ABS_TOL = 1e-6
NUMERIC_REL_TOL = 1e-9

Source = Literal["boxed", "hash", "answer-is", "last-number", "none", "unclosed"]
Method = Literal["string", "numeric", "math-verify", "none", "error"]

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_NUMBER_IN_TEXT = re.compile(_NUM)
_PLAIN_NUMBER = re.compile(rf"^(?:{_NUM})$")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)
_HASH = re.compile(r"####\s*(.+)")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox|mathbf)\s*\{([^{}]*)\}")
_NUMBER_WITH_UNIT = re.compile(rf"^({_NUM})(?:\s+[A-Za-z][A-Za-z.\s]*)?$")
_LATEX_THOUSANDS = re.compile(r"(\d),\\!\s*(?=\d{3})")
_SIMPLE_LHS = re.compile(r"^[A-Za-z]\w*\s*=")
_SPACING = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "~", "\\displaystyle")


@dataclass(frozen=True)
class Extraction:
    """The answer found in an output (`None` if there is none) and where it came from."""

    answer: str | None
    source: Source


@dataclass(frozen=True)
class Grade:
    """The grader's decision for one sample, stored with it so that every decision can be audited."""

    correct: bool
    extracted: str | None
    source: Source
    method: Method
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_output(text: str) -> tuple[str, str | None]:
    """(reasoning, answer text) of a raw completion, cut at the last `</think>`; the answer text is None
    when the reasoning never closed. A leading `<think>` (templates that do not force it) is dropped."""
    reasoning, answer = partition_last_think_end(text)
    if answer is None:
        return text, None
    stripped = reasoning.lstrip()
    if stripped.startswith(THINK_START):
        reasoning = stripped[len(THINK_START):]
    return reasoning, answer


def answer_region(content: str | None, reasoning: str | None) -> str | None:
    """The gradable text of a split response (the server's `content`): None when the reasoning never closed
    (empty content). A server that does not split leaves `</think>` in the content; cut there too."""
    if content is None or not content.strip():
        return None
    if THINK_END in content:
        return split_output(content)[1]
    return content


def _match_brace(text: str, open_at: int) -> int | None:
    """Index of the `}` closing the `{` at `open_at`, or None if it never closes."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _boxed_at(text: str, start: int, command: str) -> str | None:
    """The argument of the box command starting at `start`: `{...}` brace-matched, or `\\boxed 5`."""
    i = start + len(command)
    if i < len(text) and text[i].isalpha():
        return None  # a longer command such as \boxedsomething
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        end = _match_brace(text, i)
        return None if end is None else text[i + 1:end]
    if i > start + len(command):  # `\boxed 5`: one token up to whitespace or `$`
        token = re.match(r"[^\s$]+", text[i:])
        return token.group(0) if token else None
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{}` / `\\fbox{}` in `text` (an unclosed box is skipped)."""
    starts = sorted((m.start(), cmd) for cmd in _BOX_COMMANDS for m in re.finditer(re.escape(cmd), text))
    for start, cmd in reversed(starts):
        content = _boxed_at(text, start, cmd)
        if content is not None:
            return content.strip()
    return None


def _numeric_fallback(text: str) -> Extraction:
    """GSM8K-style answers without a box: the last `#### X` or "the answer is X" (whichever comes later),
    else the last number."""
    marked = [(m.start(), m.group(1), source) for pattern, source in ((_HASH, "hash"), (_ANSWER_IS, "answer-is"))
              for m in pattern.finditer(text)]
    for _, fragment, source in sorted(marked, reverse=True)[:1]:
        number = _NUMBER_IN_TEXT.search(fragment.replace("−", "-"))
        if number:
            return Extraction(number.group(0), source)  # type: ignore[arg-type]
    numbers = _NUMBER_IN_TEXT.findall(text.replace("−", "-"))
    if numbers:
        return Extraction(numbers[-1], "last-number")
    return Extraction(None, "none")


def extract_answer(answer_text: str | None, kind: str) -> Extraction:
    """The answer in the text after `</think>` (`None`: the reasoning never closed): the last box, and for
    `numeric` tasks the fallbacks."""
    if answer_text is None:
        return Extraction(None, "unclosed")
    boxed = last_boxed(answer_text)
    if boxed is not None:
        return Extraction(boxed, "boxed")
    if kind == "numeric":
        return _numeric_fallback(answer_text)
    return Extraction(None, "none")


def normalize(answer: str) -> str:
    """A canonical string for cheap equality and for vote keys: spacing commands, `\\left`/`\\right`, `$`,
    degrees, `%`, `\\text{}` wrappers and whitespace removed; `\\dfrac`/`\\tfrac` become `\\frac`."""
    s = answer.strip().replace("−", "-")
    for token in _SPACING:
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for token in ("^\\circ", "^{\\circ}", "\\circ", "\\%", "%", "\\$", "$"):
        s = s.replace(token, "")
    s = _TEXT_CMD.sub(r"\1", s)
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


def to_number(answer: str) -> float | None:
    """The value of an answer that is one plain number, possibly with `$`, `%`, degrees, thousands
    separators, `x =` in front or unit words behind (`18 dollars`, `5\\text{ cm}`); None for anything else."""
    s = _TEXT_CMD.sub(" ", answer.strip().replace("−", "-"))  # \text{...} next to a number is a unit
    s = _LATEX_THOUSANDS.sub(r"\1,", s)  # 11,\! 111 -> 11,111
    for token in (*_SPACING, "^\\circ", "^{\\circ}", "\\circ", "\\%", "%", "\\$", "$"):
        s = s.replace(token, " " if token == "~" else "")
    s = s.strip().rstrip(".").strip()
    simple_lhs = _SIMPLE_LHS.match(s)
    if simple_lhs:
        s = s[simple_lhs.end():].strip()
    match = _NUMBER_WITH_UNIT.match(s)
    return float(match.group(1).replace(",", "")) if match else None


def numbers_equal(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=NUMERIC_REL_TOL, abs_tol=NUMERIC_ABS_TOL)


def quick_check(gold: str, extraction: Extraction, kind: str) -> Grade | None:
    """The decision when the cheap checks settle it: no answer, equal strings, or two plain numbers (final
    for numeric tasks, within the tolerance). None means math-verify must decide."""
    pred = extraction.answer
    if pred is None or not pred.strip():
        return Grade(False, pred, extraction.source, "none")
    if normalize(pred) == normalize(gold):
        return Grade(True, pred, extraction.source, "string")
    gold_num, pred_num = to_number(gold), to_number(pred)
    if gold_num is not None and pred_num is not None:
        return Grade(numbers_equal(gold_num, pred_num), pred, extraction.source, "numeric")
    return None


def math_verify_check(gold: str, pred: str, timeout_s: int = 5) -> tuple[bool, str]:
    """math-verify's decision on two answer strings (each parsed as a boxed LaTeX answer): (equal, detail).

    Run this in a process pool worker's main thread: math-verify's timeouts are SIGALRM-based."""
    from math_verify import parse, verify

    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout_s)
    if not gold_parsed:
        return False, "math-verify could not parse the gold answer"
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout_s)
    if not pred_parsed:
        return False, "math-verify could not parse the answer"
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s)), ""


def grade_sync(gold: str, answer_text: str | None, kind: str, timeout_s: int = 5) -> Grade:
    """Grade in this process (main thread only): for scripts and single checks; runs use `GraderPool`."""
    extraction = extract_answer(answer_text, kind)
    quick = quick_check(gold, extraction, kind)
    if quick is not None:
        return quick
    correct, detail = math_verify_check(gold, str(extraction.answer), timeout_s)
    return Grade(correct, extraction.answer, extraction.source, "math-verify", detail)


def vote_key(answer: str | None) -> str | None:
    """The key majority voting groups answers by: the number's value if it is one, else `normalize`."""
    if answer is None or not answer.strip():
        return None
    value = to_number(answer)
    if value is not None:
        return repr(round(value, 6) + 0.0)
    return normalize(answer)
