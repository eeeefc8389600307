"""Structured output in the engine: one grammar matcher per constrained sequence, and each step's token masks.

A constrained sequence (its request has `SamplingParams.structured_output`) reasons freely. Its `Guide` starts
once the reasoning is closed (`</think>` sampled, or forced by the thinking budget), or from the first token when
the prompt opens no reasoning (a text completion without `<think>`, chat without forced thinking). From then on
each token it samples is drawn under the mask of the tokens its grammar allows next, then accepted by its
matcher; once the grammar has terminated (a complete answer, then the EOS, which the mask alone allows), the
sequence ends with finish_reason "stop".

Costs. A batch in which no guide has started pays nothing: no mask, no per-row work, the usual pipelined steps
(the engine checks one counter per step). While some guide runs, a step's mask needs the token before it: the
engine launches the step's forward pass first, then reads the step before while the device computes
(`LateMasks`). The grammar thread accepts that step's guided tokens (one batch) while the engine appends them,
then fills this step's masks, queued right behind; the verdicts (terminated, refused) are applied after the
appends. The runner defers the step's sampling until its next launch (or the step's read), so that the fill
runs while the engine returns the outputs, schedules and packs the next step. xgrammar releases the GIL while it
accepts and fills, and the engine's switch interval is shortened from the first fill on, so that the grammar
thread gets the GIL back at once between its calls. The masks are filled into pinned memory on CUDA and applied
on the logits' device to the constrained rows only, before the sampler (penalties, temperature, top-p act on
what the mask leaves). A sequence whose reasoning closes while its next sample is already in flight has that
sample dropped (`Scheduler.void_pending`) and drawn again under the mask (one more decode row, once).
Grammars compile on `GrammarCompiler`'s threads; a request waits for its grammar before it is scheduled.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from r1serve.outputs import FinishReason

if TYPE_CHECKING:
    from r1serve.engine.grammar import GrammarCompiler
    from r1serve.engine.sequence import Request, Sequence
    from r1serve.tokenizer import Tokenizer

logger = logging.getLogger("r1serve")

GIL_SWITCH_INTERVAL_S = 0.0002  # from the first fill on: Python's 5 ms would hold the grammar thread up at each return


class Guide:
    """The grammar of one sequence; its matcher exists from the start of the answer on."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled  # xgrammar.CompiledGrammar
        self.matcher: Any = None  # xgrammar.GrammarMatcher, once started
        self.done = False  # terminated, or its sequence finished

    @property
    def running(self) -> bool:
        return self.matcher is not None and not self.done

    def start(self) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(self.compiled)


@dataclass
class TokenMasks:
    """One step's masks: `bitmask` row i (xgrammar's packed bits, 1 = allowed) is for logits row `rows[i]`."""

    bitmask: torch.Tensor  # [len(rows), ceil(vocab / 32)] int32, on the host
    rows: list[int]  # the constrained rows of the step's logits
    num_rows: int  # rows of the step's logits
    pin_memory: bool = False  # the host tensors are pinned (their copies do not wait for the device)

    def apply(self, logits: torch.Tensor) -> None:
        """Sets the disallowed logits of the constrained rows to -inf, in place, on the logits' device."""
        import xgrammar as xgr

        bitmask = self.bitmask.to(logits.device, non_blocking=True)
        if len(self.rows) == self.num_rows:
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            return
        index = torch.tensor(self.rows, dtype=torch.int64)
        index = (index.pin_memory() if self.pin_memory else index).to(logits.device, non_blocking=True)
        constrained = logits.index_select(0, index)  # [len(rows), vocab]
        xgr.apply_token_bitmask_inplace(constrained, bitmask)
        logits.index_copy_(0, index, constrained)

    def first_allowed(self, row: int, token: int, vocab_size: int) -> int:
        """The first token id at or after `token` (cyclically) that logits row `row` may take: `token` itself when
        the row is free. Reads the row's packed words, not every id."""
        if row not in self.rows:
            return token
        words = self.bitmask[self.rows.index(row)].numpy().view(np.uint32)[: -(-vocab_size // 32)]
        start = token // 32
        first = words[start] & (np.uint32(0xFFFFFFFF) << np.uint32(token % 32))
        if first:
            return start * 32 + _lowest_bit(int(first))
        for part, offset in ((words[start + 1:], start + 1), (words[: start + 1], 0)):
            nonzero = np.flatnonzero(part)
            if len(nonzero):
                index = int(nonzero[0]) + offset
                return index * 32 + _lowest_bit(int(words[index]))
        raise ValueError(f"row {row}: its mask allows no token")

    def allowed(self, row: int, vocab_size: int) -> torch.Tensor:
        """The token ids logits row `row` may take (all of them when the row is free), ascending."""
        if row not in self.rows:
            return torch.arange(vocab_size)
        words = self.bitmask[self.rows.index(row)].to(torch.int64) & 0xFFFFFFFF  # [ceil(vocab / 32)]
        bits = (words[:, None] >> torch.arange(32)) & 1  # [ceil(vocab / 32), 32]
        return bits.flatten()[:vocab_size].nonzero().flatten()


def _lowest_bit(word: int) -> int:
    return (word & -word).bit_length() - 1


MasksWaiter = Callable[[], "TokenMasks | None"]  # blocks until a step's masks are filled, and returns them
LateMasks = Callable[[], MasksWaiter]  # asked for once a step's forward pass is launched


class StructuredOutputs:
    """The engine's structured-output state: requests whose grammar is compiling, and the running guides."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, pin_memory: bool = False) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.pin_memory = pin_memory  # CUDA: a copy from pageable memory would wait for the device's queue
        self.compiling: dict[str, tuple[Request, Future[Any]]] = {}
        self.num_running = 0  # guides started and not done: while > 0, steps synchronise and carry masks
        self._compiler: GrammarCompiler | None = None
        self._batch: Any = None  # xgrammar.BatchGrammarMatcher, filling a step's masks on several threads
        self._thread: ThreadPoolExecutor | None = None  # the grammar thread (`accept_later`, `fill_later`)

    def submit(self, request: Request) -> None:
        """Starts compiling the request's grammar; `take_ready` hands the request back once it is done."""
        assert request.params.structured_output is not None
        if self._compiler is None:
            from r1serve.engine.grammar import GrammarCompiler

            self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size)
        self.compiling[request.request_id] = (request, self._compiler.submit(request.params.structured_output))

    def wait(self, timeout_s: float) -> None:
        """Blocks until some compile is done or `timeout_s` passed (for an engine with nothing else to run)."""
        wait([future for _, future in self.compiling.values()], timeout=timeout_s, return_when=FIRST_COMPLETED)

    def take_ready(self) -> list[tuple[Request, Any]]:
        """The requests whose compile is done, each with its compiled grammar or the exception it raised."""
        ready = [(rid, request, future) for rid, (request, future) in self.compiling.items() if future.done()]
        for rid, _, _ in ready:
            del self.compiling[rid]
        return [(request, future.exception() or future.result()) for _, request, future in ready]

    def drop(self, request_id: str) -> None:
        self.compiling.pop(request_id, None)

    def start(self, seq: Sequence) -> bool:
        """The answer of `seq` begins: its guide runs from the next sample on. False (a no-op) if it has none or
        it has started already; True tells the engine that a sample in flight was drawn without the mask."""
        guide = seq.guide
        if guide is None or guide.matcher is not None or seq.is_finished:
            return False
        guide.start()
        self.num_running += 1
        return True

    def accept_later(self, seqs: list[Sequence], tokens: list[int]) -> Callable[[], list[FinishReason | None]]:
        """Queues a step's sampled tokens for their sequences' running guides on the grammar thread (one batch,
        the GIL released), ahead of any fill queued after; the call returned waits for them and gives each
        sequence its verdict: "stop" once its grammar has terminated, "abort" for a token the grammar refuses (a
        mask not applied), else None. The engine appends the tokens meanwhile."""
        import xgrammar as xgr

        matchers = [seq.guide.matcher for seq in seqs]  # type: ignore[union-attr]
        accepted = self._grammar_thread().submit(xgr.BatchGrammarMatcher.batch_accept_token, matchers, tokens)

        def verdicts() -> list[FinishReason | None]:
            try:
                oks = accepted.result()
            except Exception:
                logger.exception("accepting the tokens of %d guided rows failed", len(seqs))
                oks = [False] * len(seqs)
            return [self._verdict(seq, token, ok) for seq, token, ok in zip(seqs, tokens, oks, strict=True)]

        return verdicts

    def _verdict(self, seq: Sequence, token: int, accepted: bool) -> FinishReason | None:
        if not accepted:
            logger.error("request %s: token %d is outside its grammar; aborting it", seq.request.request_id, token)
            self.release(seq)
            return "abort"
        if seq.guide.matcher.is_terminated():  # type: ignore[union-attr]
            self.release(seq)
            return "stop"
        return None

    def release(self, seq: Sequence) -> None:
        """The guide of `seq` is done (its grammar terminated, or the sequence finished)."""
        guide = seq.guide
        if guide is not None and guide.running:
            guide.done = True
            self.num_running -= 1

    def masks(self, guides: list[Guide | None]) -> TokenMasks | None:
        """The masks of a step's sampling rows (`guides`: each row's, None for a free row) whose guide runs;
        None when none does."""
        plan = self._mask_plan(guides)
        if plan is None:
            return None
        rows, matchers, bitmask = plan
        self._fill(matchers, bitmask)
        return TokenMasks(bitmask, rows, len(guides), self.pin_memory)

    def fill_later(self, guides: list[Guide | None]) -> MasksWaiter:
        """`masks(guides)`, filled on the grammar thread from the matchers' states now; the waiter returned
        blocks until they are. A fill that fails is logged and gives no masks: the constrained rows then sample
        freely, their tokens are refused by their grammars, and only those requests are aborted."""
        plan = self._mask_plan(guides)
        if plan is None:
            return _no_masks
        rows, matchers, bitmask = plan
        filled = self._grammar_thread().submit(self._fill, matchers, bitmask)
        masks = TokenMasks(bitmask, rows, len(guides), self.pin_memory)

        def wait_masks() -> TokenMasks | None:
            try:
                filled.result()
            except Exception:
                logger.exception("filling the token masks of %d rows failed", len(rows))
                return None
            return masks

        return wait_masks

    def _grammar_thread(self) -> ThreadPoolExecutor:
        """The one thread that accepts and fills while the engine goes on (in the order asked)."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="r1serve-grammar")
            sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        return self._thread

    def _mask_plan(self, guides: list[Guide | None]) -> tuple[list[int], list[Any], torch.Tensor] | None:
        """The rows whose guide runs, their matchers and a bitmask buffer for them; None when no guide runs."""
        import xgrammar as xgr

        rows = [row for row, guide in enumerate(guides) if guide is not None and guide.running]
        if not rows:
            return None
        matchers = [guides[row].matcher for row in rows]  # type: ignore[union-attr]
        # fresh each step (a copy may still read the last; pinned blocks are reused only once their copy is done);
        # not initialised: xgrammar writes every word of the rows it fills
        bitmask = torch.empty((len(rows), xgr.get_bitmask_shape(1, self.vocab_size)[1]), dtype=torch.int32,
                              pin_memory=self.pin_memory)
        return rows, matchers, bitmask

    def _fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        """On xgrammar's threads (half the cores), the GIL released. A matcher that has terminated since the fill
        was planned (its sequence is done: the sample is dropped) has no next mask; its row allows every token."""
        import xgrammar as xgr

        if self._batch is None:
            self._batch = xgr.BatchGrammarMatcher(max_threads="auto")
        live = [row for row, matcher in enumerate(matchers) if not matcher.is_terminated()]
        if len(live) == len(matchers):
            self._batch.batch_fill_next_token_bitmask(matchers, bitmask)
            return
        with torch.inference_mode():  # the buffer may be an inference tensor (made in the runner's step)
            bitmask.fill_(-1)
        if live:
            self._batch.batch_fill_next_token_bitmask([matchers[row] for row in live], bitmask, live)

    def shutdown(self) -> None:
        if self._compiler is not None:
            self._compiler.shutdown()
        if self._thread is not None:
            self._thread.shutdown(wait=True)


def _no_masks() -> None:
    return None
