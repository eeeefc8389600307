"""`r1serve.eval`: accuracy of any OpenAI-compatible server on GSM8K / MATH-500 / AIME 2024, graded the way
the R1 authors grade, with repeated sampling and honest statistics (`r1serve eval`, docs/eval.md).

The package talks to servers over HTTP only and never imports torch or the engine, so it runs on any machine
that can reach a server. Names are imported on first use, so that `import r1serve.eval` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EvalConfig": "r1serve.eval.config",
    "run_eval": "r1serve.eval.evaluate",
    "load_task": "r1serve.eval.datasets",
    "parse_policy": "r1serve.eval.policies",
    "grade_sync": "r1serve.eval.grading",
    "split_output": "r1serve.eval.grading",
    "last_boxed": "r1serve.eval.grading",
    "GraderPool": "r1serve.eval.grader_pool",
    "pass_at_k": "r1serve.eval.stats",
    "majority_vote": "r1serve.eval.stats",
    "bootstrap_ci": "r1serve.eval.stats",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'r1serve.eval' has no attribute {name!r}")
