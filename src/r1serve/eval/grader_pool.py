"""The process pool that runs math-verify, so that grading neither blocks the event loop nor loses its timeout.

math-verify guards its parsing and comparison with SIGALRM, which only works in a process's main thread; run
in an asyncio executor thread it would either fail or hang without a bound. Each pool worker runs its jobs in
its own main thread, so the timeouts hold; a job that still outlives its bound is recorded as a grader error
(`method: "error"`) instead of stalling the run. Workers ignore SIGINT so that Ctrl-C reaches only the parent,
which stops the pool. Cheap decisions (`grading.quick_check`) never leave the parent process.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from r1serve.eval.grading import Extraction, Grade, extract_answer, math_verify_check, quick_check


@dataclass(frozen=True)
class GradeRequest:
    """One thing to grade: the gold answer, the text after `</think>` (None: never closed), the answer kind."""

    gold: str
    answer_text: str | None
    kind: str


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _verify_job(gold: str, pred: str, timeout_s: int) -> tuple[bool, str, bool]:
    """Runs in a worker: (correct, detail, failed). Exceptions become a failed decision with their message."""
    try:
        correct, detail = math_verify_check(gold, pred, timeout_s)
        return correct, detail, False
    except Exception as e:  # noqa: BLE001 - any grader failure is recorded, never fatal to the run
        return False, f"math-verify raised {type(e).__name__}: {e}", True


class GraderPool:
    """Grades samples: cheap checks here, math-verify in `num_workers` worker processes."""

    def __init__(self, num_workers: int = 2, timeout_s: int = 5) -> None:
        if num_workers < 1:
            raise ValueError(f"grader workers must be at least 1, got {num_workers}")
        if timeout_s < 1:
            raise ValueError(f"grader timeout must be at least 1 s, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")  # no fork of a process that has threads running
        return ProcessPoolExecutor(self.num_workers, mp_context=context, initializer=_ignore_sigint)

    @property
    def job_timeout_s(self) -> float:
        """The bound on one math-verify job: two parses and a comparison, plus worker start-up."""
        return 3.0 * self.timeout_s + 30.0

    def _submit(self, gold: str, pred: str) -> Future[tuple[bool, str, bool]]:
        try:
            return self._pool.submit(_verify_job, gold, pred, self.timeout_s)
        except BrokenProcessPool:
            self._pool = self._new_pool()
            return self._pool.submit(_verify_job, gold, pred, self.timeout_s)

    @staticmethod
    def _finish(extraction: Extraction, outcome: tuple[bool, str, bool] | BaseException) -> Grade:
        if isinstance(outcome, BaseException):
            why = "timed out" if isinstance(outcome, (FutureTimeout, asyncio.TimeoutError)) else repr(outcome)
            return Grade(False, extraction.answer, extraction.source, "error", f"math-verify {why}")
        correct, detail, failed = outcome
        return Grade(correct, extraction.answer, extraction.source, "error" if failed else "math-verify", detail)

    def grade_many(self, requests: Sequence[GradeRequest]) -> list[Grade]:
        """Grade in order, math-verify jobs running in parallel; for tests, re-grading and scripts."""
        grades: list[Grade | None] = []
        pending: list[tuple[int, Extraction, Future[tuple[bool, str, bool]]]] = []
        for i, req in enumerate(requests):
            extraction = extract_answer(req.answer_text, req.kind)
            quick = quick_check(req.gold, extraction, req.kind)
            grades.append(quick)
            if quick is None:
                pending.append((i, extraction, self._submit(req.gold, str(extraction.answer))))
        for i, extraction, future in pending:
            try:
                grades[i] = self._finish(extraction, future.result(timeout=self.job_timeout_s))
            except (FutureTimeout, BrokenProcessPool) as e:
                grades[i] = self._finish(extraction, e)
        return [g for g in grades if g is not None]

    async def grade(self, request: GradeRequest) -> Grade:
        """Grade one sample from a coroutine: the event loop waits on the worker, never runs math-verify."""
        extraction = extract_answer(request.answer_text, request.kind)
        quick = quick_check(request.gold, extraction, request.kind)
        if quick is not None:
            return quick
        future = self._submit(request.gold, str(extraction.answer))
        try:
            outcome = await asyncio.wait_for(asyncio.wrap_future(future), self.job_timeout_s)
        except (asyncio.TimeoutError, BrokenProcessPool) as e:
            return self._finish(extraction, e)
        return self._finish(extraction, outcome)

    def close(self, cancel: bool = False) -> None:
        """Stop the workers; `cancel` drops queued jobs (Ctrl-C) instead of finishing them."""
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)

    def __enter__(self) -> GraderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(cancel=exc[0] is not None)
