"""Finding the final answer of a math solution: the content of the last `\\boxed{...}` (or `\\fbox{...}`).

The R1 math prompt asks the model to put its final answer "within \\boxed{}", so the answer of a solution is
the last boxed expression. Its content can hold nested braces (`\\boxed{\\frac{1}{2}}`), so a regular
expression will not do; this walks the braces. Grading the extracted answer against a reference (numbers,
fractions, LaTeX) is the eval's job, not this module's.
"""

from __future__ import annotations

from r1serve.client.types import ChatResult, MathResult
from r1serve.r1_rules import THINK_END

_COMMANDS = ("\\boxed", "\\fbox")


def _last_command(text: str) -> tuple[int, int]:
    """(start, end) of the last `\\boxed` / `\\fbox` in `text`, or (-1, -1)."""
    best = (-1, -1)
    for command in _COMMANDS:
        at = text.rfind(command)
        if at > best[0]:
            best = (at, at + len(command))
    return best


def _braced(text: str, start: int) -> str | None:
    """The content of the balanced `{...}` that opens at `text[start]`, or None if it never closes."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def last_boxed(text: str) -> str | None:
    """The stripped content of the last `\\boxed{...}` in `text`; `\\boxed 5` (no braces) gives "5".

    Empty boxes (the prompt's own "within \\boxed{}", quoted back) are passed over. None when there is no
    boxed answer, or the last one is cut off (unbalanced braces).
    """
    start, end = _last_command(text)
    while start >= 0:
        rest = text[end:]
        if rest.startswith("{"):
            content = _braced(text, end)
            if content is None or content.strip():
                return content.strip() if content is not None else None
        if rest[:1] == " " and rest.strip():
            return rest.split()[0].rstrip("$.,;") or None
        # an empty or bare "\\boxed" (e.g. the model quoting the prompt): look further back
        start, end = _last_command(text[:start])
    return None


def math_result(result: ChatResult) -> MathResult:
    """A `MathResult` from the chat result of a math prompt: the boxed answer of the full text."""
    reasoning, content = result.reasoning, result.content
    text = f"{reasoning.rstrip()}\n{THINK_END}\n\n{content}" if content else reasoning
    return MathResult(answer=last_boxed(text), reasoning=reasoning, text=text, result=result)
