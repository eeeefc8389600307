"""`LLM`: offline generation in a few lines, the engine driven synchronously in this thread.

    llm = LLM(model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", load_format="dummy")
    outputs = llm.generate(["What is 1+1?"], SamplingParams(max_tokens=64))

`chat()` applies the model's chat template (with the forced `<think>\\n`), and `stream()` yields the deltas
of one request as they are produced.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from r1serve.config import DEFAULT_MODEL, EngineConfig
from r1serve.engine.llm_engine import LLMEngine
from r1serve.outputs import RequestOutput
from r1serve.sampling_params import SamplingParams
from r1serve.tokenizer import Tokenizer

Prompt = str | list[int]
Messages = list[dict[str, str]]


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generates for every prompt (text or token ids) and returns the final outputs in prompt order."""
        prompt_list = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompt_list))
        ids = [self.engine.add_request(p, sp, stream=False) for p, sp in zip(prompt_list, params, strict=True)]
        final: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    _merge(final, out)
        except BaseException:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return [final[i] for i in ids]

    def chat(self, messages: Messages | Sequence[Messages], sampling_params: SamplingParams | None = None,
             force_thinking: bool = True) -> list[RequestOutput]:
        """Applies the chat template to each conversation, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.encode_chat(c, force_thinking=force_thinking) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yields the request's outputs step by step (`delta_text` holds what is new); aborts if left early."""
        request_id = self.engine.add_request(prompt, sampling_params)
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort_request(request_id)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # type: ignore[list-item]
    return prompts  # type: ignore[return-value]


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    if len(params) != n:
        raise ValueError(f"sampling_params: got {len(params)} for {n} prompts")
    return list(params)


def _merge(final: dict[str, RequestOutput], out: RequestOutput) -> None:
    """Keeps the latest output of each sample (steps report only the samples that progressed)."""
    previous = final.get(out.request_id)
    if previous is None:
        final[out.request_id] = out
        return
    by_index = {c.index: c for c in previous.outputs}
    by_index.update({c.index: c for c in out.outputs})
    out.outputs = [by_index[i] for i in sorted(by_index)]
    if out.prompt_logprobs is None:  # reported once, in an earlier output
        out.prompt_logprobs = previous.prompt_logprobs
    final[out.request_id] = out
