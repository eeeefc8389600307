"""The inference engine: scheduler, block manager, model runner, sampler, detokenizer, and the loops that drive them."""

from r1serve.engine.llm_engine import EngineStats, LLMEngine

__all__ = ["EngineStats", "LLMEngine"]
