"""r1serve: serve DeepSeek-R1-Distill-Qwen models the right way.

`from r1serve import LLM, SamplingParams` for offline generation. Heavy modules (torch) are imported on first
use, so that the client, `r1serve chat`, `check`, `eval` and `bench` start fast without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": "r1serve.llm",
    "SamplingParams": "r1serve.sampling_params",
    "StructuredOutput": "r1serve.sampling_params",
    "RequestOutput": "r1serve.outputs",
    "CompletionOutput": "r1serve.outputs",
    "EngineConfig": "r1serve.config",
    "ModelConfig": "r1serve.config",
    "AsyncEngine": "r1serve.engine.async_engine",
}

__all__ = ["AsyncEngine", "CompletionOutput", "EngineConfig", "LLM", "ModelConfig", "RequestOutput",
           "SamplingParams", "StructuredOutput", "__version__"]

if TYPE_CHECKING:
    from r1serve.config import EngineConfig, ModelConfig
    from r1serve.engine.async_engine import AsyncEngine
    from r1serve.llm import LLM
    from r1serve.outputs import CompletionOutput, RequestOutput
    from r1serve.sampling_params import SamplingParams, StructuredOutput


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'r1serve' has no attribute {name!r}")
