"""Sending the samples: bounded concurrency, per-sample seeds, grading, and one saved line per finished sample.

A run is a list of work items (endpoint, task, policy, problem, sample index); one runner serves one
endpoint. A fixed number of worker coroutines take items in order, ask the server through `AsyncLLMClient`
(seed = base seed + sample index, the same at every endpoint; `max_tokens` capped to the context), grade the
answer in the process pool and append the record to `samples.jsonl` at once, so that an interruption loses
only requests in flight. A request that fails is recorded with its error and counted, and the run goes on;
a rerun retries it. The chat call is injectable for tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from r1serve.client import BadRequestError, ChatResult, ClientError
from r1serve.eval.datasets import Problem, Task
from r1serve.eval.grader_pool import GradeRequest, GraderPool
from r1serve.eval.grading import answer_region
from r1serve.eval.policies import PromptPolicy
from r1serve.eval.probe import capped_max_tokens, max_tokens_from_refusal
from r1serve.eval.records import SampleKey, SampleRecord, SampleWriter

ChatFn = Callable[..., Awaitable[Any]]  # AsyncLLMClient.chat_completion's signature


@dataclass(frozen=True)
class SamplingSettings:
    """How every request of the run is sampled (the per-sample seed is `seed + sample_index`)."""

    model: str
    temperature: float
    top_p: float
    max_tokens: int
    max_thinking_tokens: int | None
    seed: int
    max_model_len: int | None = None
    stream: bool = False

    def generation(self, policy: PromptPolicy) -> dict[str, Any]:
        """The settings a saved sample must share with this run to count as done on resume."""
        return {"model": self.model, "temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_tokens, "max_thinking_tokens": self.max_thinking_tokens,
                "seed": self.seed, "policy_fingerprint": policy.fingerprint}


@dataclass(frozen=True)
class WorkItem:
    task: Task
    problem: Problem
    policy: PromptPolicy
    sample_index: int
    endpoint: str = ""  # the endpoint's label

    @property
    def key(self) -> SampleKey:
        return (self.endpoint, self.task.name, self.policy.name, self.problem.id, self.sample_index)


@dataclass
class RunCounts:
    num_ok: int = 0
    num_errors: int = 0


def token_split(result: ChatResult) -> tuple[int | None, int | None, bool]:
    """(reasoning tokens, answer tokens, estimated): from the server's usage, or, when it does not count
    reasoning tokens, the completion tokens split in proportion to the characters of each part."""
    usage = result.usage
    if usage is None:
        return None, None, False
    if usage.reasoning_tokens is not None:
        return usage.reasoning_tokens, max(0, usage.completion_tokens - usage.reasoning_tokens), False
    num_chars = len(result.reasoning) + len(result.content)
    reasoning = round(usage.completion_tokens * len(result.reasoning) / num_chars) if num_chars else 0
    return reasoning, usage.completion_tokens - reasoning, True


class SampleRunner:
    """Runs work items against a chat function and saves each finished sample."""

    def __init__(self, chat: ChatFn, grader: GraderPool, writer: SampleWriter, settings: SamplingSettings,
                 *, concurrency: int, progress: bool = True, desc: str = "eval") -> None:
        self.chat = chat
        self.grader = grader
        self.writer = writer
        self.settings = settings
        self.concurrency = concurrency
        self.progress = progress
        self.desc = desc
        self.counts = RunCounts()

    async def run(self, items: Sequence[WorkItem]) -> RunCounts:
        """Run every item (workers pull them in order); returns how many succeeded and failed."""
        queue: Iterator[WorkItem] = iter(items)
        with tqdm(total=len(items), desc=self.desc, unit="sample", disable=None if self.progress else True,
                  dynamic_ncols=True) as bar:
            workers = [self._worker(queue, bar) for _ in range(min(self.concurrency, max(1, len(items))))]
            await asyncio.gather(*workers)
        return self.counts

    async def _worker(self, queue: Iterator[WorkItem], bar: tqdm) -> None:
        for item in queue:
            record = await self.run_one(item)
            self.writer.append(record)
            if record.error is None:
                self.counts.num_ok += 1
            else:
                self.counts.num_errors += 1
            bar.update(1)
            bar.set_postfix(errors=self.counts.num_errors, refresh=False)

    def _request_kwargs(self, item: WorkItem, messages: list[dict[str, str]]) -> dict[str, Any]:
        s = self.settings
        kwargs: dict[str, Any] = {
            "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed + item.sample_index,
            "max_tokens": capped_max_tokens(s.max_tokens, s.max_model_len, messages),
        }
        if s.max_thinking_tokens is not None:
            kwargs["max_thinking_tokens"] = s.max_thinking_tokens
        return kwargs

    async def _ask(self, messages: list[dict[str, str]], kwargs: dict[str, Any]) -> ChatResult:
        """One chat call (streamed if asked); a context-length refusal naming the limit is retried at it."""
        try:
            return await self._call(messages, kwargs)
        except BadRequestError as e:
            fits = max_tokens_from_refusal(e.message)
            if fits is None or fits < 1 or fits >= kwargs["max_tokens"]:
                raise
            kwargs["max_tokens"] = fits
            return await self._call(messages, kwargs)

    async def _call(self, messages: list[dict[str, str]], kwargs: dict[str, Any]) -> ChatResult:
        result = await self.chat(messages, stream=self.settings.stream, **kwargs)
        if not isinstance(result, ChatResult):  # a stream: read it to the end
            result = await result.result()
        return result

    async def run_one(self, item: WorkItem) -> SampleRecord:
        """Generate and grade one sample; a client error becomes the record's `error`."""
        messages = item.policy.messages(item.problem.problem)
        kwargs = self._request_kwargs(item, messages)
        record = SampleRecord(
            task=item.task.name, policy=item.policy.name, problem_id=item.problem.id,
            sample_index=item.sample_index, gold=item.problem.answer, seed=kwargs["seed"],
            endpoint=item.endpoint,
            generation=self.settings.generation(item.policy),
        )
        try:
            result = await self._ask(messages, kwargs)
        except ClientError as e:
            record.error = f"{type(e).__name__}: {e.message}"
            record.finished_at = time.time()
            return record
        record.generation["effective_max_tokens"] = kwargs["max_tokens"]
        self._fill(record, result)
        grade = await self.grader.grade(GradeRequest(item.problem.answer,
                                                     answer_region(result.content, result.reasoning),
                                                     item.task.spec.answer_kind))
        record.grade = grade.to_dict()
        return record

    @staticmethod
    def _fill(record: SampleRecord, result: ChatResult) -> None:
        record.reasoning, record.content = result.reasoning, result.content
        record.finish_reason = result.finish_reason
        record.latency_s, record.ttft_s = result.latency_s, result.ttft_s
        if result.usage is not None:
            record.prompt_tokens = result.usage.prompt_tokens
            record.completion_tokens = result.usage.completion_tokens
        record.reasoning_tokens, record.answer_tokens, record.tokens_estimated = token_split(result)
        record.finished_at = time.time()
