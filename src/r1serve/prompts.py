"""The math instruction the R1 authors use, in English and Chinese, and the prompt built from it.

DeepSeek's usage recommendations for the R1 models ask math problems to carry the instruction "Please reason
step by step, and put your final answer within \\boxed{}." so that the answer can be graded from the last
`\\boxed{...}`. The client, the evaluation harness and the server's docs all need the same words, so they live
here once. The paper's form is the problem first, then a newline, then the instruction.
"""

from __future__ import annotations

MATH_PROMPT_EN = "Please reason step by step, and put your final answer within \\boxed{}."
MATH_PROMPT_ZH = "请逐步推理，并将最终答案放在\\boxed{}内。"

MATH_PROMPTS: dict[str, str] = {"en": MATH_PROMPT_EN, "zh": MATH_PROMPT_ZH}


def math_prompt(problem: str, language: str = "en") -> str:
    """The user message for a math problem: `problem`, a newline, then the instruction in `language`.

    `language` is "en" or "zh"; anything else raises a ValueError naming the languages there are.
    """
    if language not in MATH_PROMPTS:
        raise ValueError(f"language must be one of {sorted(MATH_PROMPTS)}, got {language!r}")
    if not isinstance(problem, str):
        raise ValueError(f"problem must be a string, got {type(problem).__name__}")
    return f"{problem}\n{MATH_PROMPTS[language]}"
