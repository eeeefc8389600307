"""`FakeRunner`: the engine's device side without a model, for tests and host-side benchmarks.

`LLMEngine(config, runner_factory=FakeRunner)` runs the real scheduler, block manager, token rules,
detokenizers and outputs, and no forward pass: no weights are loaded. Each sampled token is a pure function of
the sequence (its prompt's last token, its sample index and the position sampled: all read from the step's
records, as a runner must), so that runs repeat, a
sequence gets the same tokens in any batch, and no token is a special one (they stay in [1000, vocab - 1000)).
A row under a structured-output mask takes the first allowed token at or after its computed one (cyclically).
`host_work=True` also does the host's share of a real step, packing the inputs and the sampling batch as
`ModelRunner` does, so that benchmarks/host_overhead.py measures the Python around the device.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from r1serve.config import EngineConfig, ModelConfig
from r1serve.engine.device import resolve_dtype
from r1serve.engine.input_batch import InputPacker
from r1serve.engine.model_runner import GiB, SampledTokens, check_kv_capacity
from r1serve.engine.sampler import Sampler
from r1serve.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from r1serve.engine.structured import LateMasks, TokenMasks

CPU = torch.device("cpu")
FIRST_TOKEN = 1000  # below: the byte-level and other low ids; the special tokens sit at the top of the vocabulary


class FakeRunner:
    """A `Runner` (engine/model_runner.py) whose tokens are computed, not sampled; the KV cache is sized as
    `ModelRunner` sizes it on CPU and never allocated."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, model_path: Path | None,
                 max_model_len: int, eos_token_id: int | None, host_work: bool = False) -> None:
        self.config = config
        self.model_config = model_config
        itemsize = 1 if config.fp8_kv_cache else resolve_dtype(config.dtype, CPU).itemsize
        block_bytes = config.block_size * model_config.kv_cache_bytes_per_token(itemsize)
        num_blocks = config.num_kv_blocks or int(config.kv_cache_space * GiB) // block_bytes
        self.num_blocks = check_kv_capacity(num_blocks, config.block_size, max_model_len)
        self.num_token_ids = model_config.vocab_size - 2 * FIRST_TOKEN
        self.host_work = host_work
        self.mask_pick_s = 0.0  # time spent choosing tokens under masks (the device's work on a real runner)
        self._deferred: SampledTokens | None = None
        self.device = CPU
        self.packer = InputPacker(config.block_size, CPU) if host_work else None
        self.sampler = Sampler(eos_token_id, seed=config.seed) if host_work else None

    def execute(self, sched: SchedulerOutput, late_masks: LateMasks | None = None) -> SampledTokens:
        sampling = sched.sampling
        if self.packer is not None and self.sampler is not None:
            self.packer.pack(sched)
        if self._deferred is not None:  # as `ModelRunner`: the step before samples first
            deferred, self._deferred = self._deferred, None
            deferred.resolve()
        if self.sampler is not None and sampling:
            self.sampler.batch(sampling, self.model_config.vocab_size, CPU)
        if not sampling:
            return SampledTokens(None, None)
        tokens = [self.token_for(seq) for seq in sampling]  # (the forward pass: before the late masks)
        if late_masks is None:
            return self._sample(tokens, sched.token_masks)
        wait_masks = late_masks()
        self._deferred = SampledTokens.deferred(lambda: self._sample(tokens, wait_masks()))
        return self._deferred

    def _sample(self, tokens: list[int], masks: TokenMasks | None) -> SampledTokens:
        """A row under a mask takes the first allowed id at or after its own (a real runner's device work: the
        time is counted apart, in `mask_pick_s`)."""
        start = time.perf_counter()
        for row in masks.rows if masks is not None else ():
            tokens[row] = masks.first_allowed(row, tokens[row], self.model_config.vocab_size)
        self.mask_pick_s += time.perf_counter() - start
        return SampledTokens(torch.tensor(tokens), None)

    def token_for(self, item: ScheduledSeq) -> int:
        """The token a record samples, keyed by the position it takes (`item.end`, just after the chunk)."""
        key = item.spec.prompt_token_ids[-1] * 7919 + item.spec.index * 104_729 + item.end * 31
        return FIRST_TOKEN + key % self.num_token_ids
