"""Everything that lives on the device: the weights, the KV-cache tensors, and one step's forward and sampling.

The runner turns a `SchedulerOutput` (plain records, engine/scheduler_output.py: it never sees a `Sequence`) into
flat model inputs (the new tokens of every scheduled sequence, their positions, and the paged-attention
metadata), runs the model, computes logits only for the sequences that sample this step, and samples, all
without waiting for the device: the sampled ids come back as `SampledTokens`, read once the engine has launched
the next step. It sizes the KV cache itself: from `--kv-cache-space` GiB on
CPU, and on CUDA from the memory left after the weights and a profiling forward pass, times
`gpu_memory_utilization`. The cache is in the model's dtype, or float8 e4m3 with `--kv-cache-dtype fp8` (one
byte per element: twice the blocks in the same memory; every layer's scales are 1.0, docs/quantization.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from r1serve.config import EngineConfig, ModelConfig
from r1serve.engine.cuda_graphs import DecodeGraphs
from r1serve.engine.device import resolve_device, resolve_dtype
from r1serve.engine.input_batch import InputPacker, StepInputs
from r1serve.engine.logprobs import LogprobPlan, StepLogprobs, gather_step, plan_step
from r1serve.engine.sampler import Sampler, SamplingBatch
from r1serve.engine.scheduler_output import SchedulerOutput
from r1serve.engine.structured import LateMasks, TokenMasks
from r1serve.kernels.attention import FP8_KV_DTYPE, AttentionBackend, TorchAttention, build_metadata
from r1serve.kernels.compile_ahead import compile_ahead
from r1serve.kernels.onednn import prepack_linears
from r1serve.model.layers import REFERENCE_OPS, KernelOps, triton_kernel_ops
from r1serve.model.loader import load_model, weight_bytes

logger = logging.getLogger("r1serve")

GiB = 1 << 30
CUDA_OVERHEAD_BYTES = GiB  # CUDA context, cuBLAS workspaces, graph pools: outside the allocator's count


def select_kernel_ops(device: torch.device) -> KernelOps:
    """On CUDA with Triton: Triton element-wise kernels, skinny products for few rows with the norm, SiLU and
    bias fused in, rotary + KV store folded into decode attention (`triton_kernel_ops`); else the torch ops."""
    if device.type == "cuda":
        from r1serve.kernels import triton_ops

        if triton_ops.HAS_TRITON:
            return triton_kernel_ops()
    return REFERENCE_OPS


def select_attention_backend(device: torch.device) -> AttentionBackend:
    """Triton kernels on CUDA when they import; the torch reference everywhere else."""
    if device.type == "cuda":
        try:
            from r1serve.kernels.triton_attention import TritonAttention

            return TritonAttention()
        except ImportError as e:  # triton missing: still correct, only slower
            logger.warning("Triton attention unavailable (%s); using the torch reference", e)
    return TorchAttention()


def set_cpu_threads(num_threads: int | None) -> int:
    """Give the CPU engine's matmuls `num_threads` threads (default: every core this process may run on, which
    in the server is the engine's child process: the HTTP process keeps one); logs and returns the count."""
    count = num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(count)
    logger.info("CPU engine: %d threads (--num-cpu-threads)", count)
    return count


class Runner(Protocol):
    """What `LLMEngine` needs of the device side: its device, the KV cache's size in blocks, and a step launched."""

    device: torch.device
    num_blocks: int

    def execute(self, sched: SchedulerOutput, late_masks: LateMasks | None = None) -> SampledTokens:
        """Launches one step; its sampled tokens are one per scheduled sequence that samples, in order. With
        `late_masks`, the step's token masks come from calling it once the forward pass is launched (instead
        of `sched.token_masks`), so that the host's work for them overlaps the device's; the waiter it returns
        is called when the sampling launches, which may be deferred to the next `execute` or to the tokens'
        read (`SampledTokens.deferred`), so that the masks' fill overlaps the next step's host work too."""
        ...


class RunnerFactory(Protocol):
    """How `LLMEngine` builds its runner: `ModelRunner` itself, or a fake (engine/fake_runner.py)."""

    def __call__(self, config: EngineConfig, model_config: ModelConfig, model_path: Path | None,
                 max_model_len: int, eos_token_id: int | None) -> Runner: ...


def check_kv_capacity(num_blocks: int, block_size: int, max_model_len: int) -> int:
    """`num_blocks`, once it is certain that one sequence of `max_model_len` tokens fits in them."""
    if num_blocks * block_size < max_model_len:
        raise ValueError(
            f"the KV cache holds {num_blocks * block_size} tokens, fewer than max_model_len="
            f"{max_model_len}: raise --kv-cache-space (CPU) / --gpu-memory-utilization (CUDA) "
            "or lower --max-model-len"
        )
    return num_blocks


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model_path: Path | None,
                 max_model_len: int, eos_token_id: int | None) -> None:
        self.config = config
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            set_cpu_threads(config.num_cpu_threads)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.kv_dtype = FP8_KV_DTYPE if config.fp8_kv_cache else self.dtype
        self.backend = select_attention_backend(self.device)
        self._baseline_bytes = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        torch.manual_seed(config.seed)
        self.model = load_model(config, model_config, model_path, self.device, self.dtype, self.backend)
        self.kernel_ops = select_kernel_ops(self.device)
        self.model.set_ops(self.kernel_ops)
        if self.device.type == "cpu":  # bf16 projections on weights in oneDNN's layout: read faster, same results
            logger.info("CPU engine: %d projections reordered for oneDNN", prepack_linears(self.model))
        self.num_blocks = self._num_kv_blocks()
        self.kv_cache = self._allocate_kv_cache(self.num_blocks)
        self.kv_caches = [(self.kv_cache[0, i], self.kv_cache[1, i]) for i in range(model_config.num_hidden_layers)]
        self.sampler = Sampler(eos_token_id, seed=config.seed)
        self.packer = InputPacker(config.block_size, self.device)
        self.graphs = self._decode_graphs()
        if self.device.type == "cuda" and self.backend.name != "torch":
            compile_ahead(self._warm_ups)  # the kernel variants below, compiled in parallel first
        if self.graphs is not None:
            self.graphs.capture()
        self.sampler.warm_up(model_config.vocab_size, config.max_num_seqs, self.device)
        self.last_sampled = torch.zeros(1, dtype=torch.int64, device=self.device)  # the last step's samples
        self._host_ids = [torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)]
        self._turn = 0
        self._deferred: SampledTokens | None = None  # a structured step's sampling, waiting for its masks
        logger.info("model on %s (%s, attention: %s); quantization: %s; weights: %.2f GiB; "
                    "KV cache: %s, %d blocks of %d tokens (%.2f GiB)",
                    self.device, str(self.dtype).removeprefix("torch."), self.backend.name, self.quantization,
                    weight_bytes(self.model) / GiB, str(self.kv_dtype).removeprefix("torch."), self.num_blocks,
                    config.block_size,
                    self.kv_cache.numel() * self.kv_cache.element_size() / GiB)

    def describe(self) -> dict[str, str]:
        """How the model runs, for `/version` and `r1serve check`: device, dtype, attention backend, element-wise
        kernels (triton or torch), quantization and KV-cache dtype."""
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "attention": self.backend.name, "kernels": "torch" if self.kernel_ops is REFERENCE_OPS else "triton",
                "quantization": self.quantization, "kv_cache_dtype": str(self.kv_dtype).removeprefix("torch.")}

    @property
    def quantization(self) -> str:
        """The model's quantization as one phrase ('none' when dense)."""
        return "none" if self.model.quant is None else self.model.quant.describe()

    @property
    def block_bytes(self) -> int:
        return self.config.block_size * self.model_config.kv_cache_bytes_per_token(self.kv_dtype.itemsize)

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            num = self.config.num_kv_blocks
        elif self.device.type == "cuda":
            num = self._profile_cuda_blocks()
        else:
            num = int(self.config.kv_cache_space * GiB) // self.block_bytes
        return check_kv_capacity(num, self.config.block_size, self.max_model_len)

    def _profile_cuda_blocks(self) -> int:
        """Runs the largest prefill chunk once, then gives the KV cache what is left of the memory budget."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        blocks = -(-num_tokens // self.config.block_size)
        kv = self._allocate_kv_cache(blocks)
        caches = [(kv[0, i], kv[1, i]) for i in range(self.model_config.num_hidden_layers)]
        meta = build_metadata([num_tokens], [num_tokens], [list(range(blocks))], self.config.block_size, self.device)
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, torch.arange(num_tokens, device=self.device), meta, caches)
        self.model.compute_logits(hidden[-min(num_tokens, self.config.max_num_seqs):])
        torch.cuda.synchronize(self.device)
        # this runner's weights + activation peak (not what other engines in the process hold)
        peak = torch.cuda.max_memory_allocated(self.device) - kv.numel() * kv.element_size() - self._baseline_bytes
        del kv, caches, hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = min(total * self.config.gpu_memory_utilization - peak - CUDA_OVERHEAD_BYTES,
                     free - CUDA_OVERHEAD_BYTES)
        return max(0, int(budget) // self.block_bytes)

    def _allocate_kv_cache(self, num_blocks: int) -> torch.Tensor:
        mc = self.model_config
        shape = (2, mc.num_hidden_layers, num_blocks, self.config.block_size, mc.num_key_value_heads, mc.head_dim)
        return torch.zeros(shape, dtype=self.kv_dtype, device=self.device)

    def _decode_graphs(self) -> DecodeGraphs | None:
        """The decode graphs' buffers (captured later), or None where steps run eagerly."""
        if self.device.type != "cuda" or self.config.enforce_eager or self.backend.name == "torch":
            return None
        return DecodeGraphs(self.model, self.kv_caches, min(self.config.max_num_seqs, 512), self.max_model_len,
                            self.config.block_size, self.model_config.hidden_size, self.device)

    @torch.inference_mode()
    def _warm_ups(self) -> None:
        """What start-up launches, with results thrown away: every decode bucket's forward and logits, a short and
        a full prefill (the prefill kernel's two tile sizes) and the sampler's variants."""
        for batch in self.graphs.buckets if self.graphs is not None else ():
            self.model.compute_logits(self.graphs.forward(batch))
        budget = min(self.config.max_num_batched_tokens, self.num_blocks * self.config.block_size)
        prompt = min(512, self.max_model_len, budget)
        for lens in ([min(64, prompt)], [prompt] * max(1, budget // prompt)):
            blocks = list(range(-(-max(lens) // self.config.block_size)))  # every sequence writes the same blocks
            meta = build_metadata(lens, lens, [blocks] * len(lens), self.config.block_size, self.device)
            positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
            hidden = self.model(torch.zeros_like(positions), positions, meta, self.kv_caches)
            self.model.compute_logits(hidden[:len(lens)])
        self.sampler.warm_up(self.model_config.vocab_size, self.config.max_num_seqs, self.device)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, late_masks: LateMasks | None = None) -> SampledTokens:
        """Launches one step; returns its sampled tokens (one per scheduled sequence that samples, in order),
        which reach the host when the device is done: the caller reads them after launching the next step.
        `late_masks` (structured output) is called once the logits are launched; the sampling then waits for
        its masks until the next launch or the tokens' read (`SampledTokens.deferred`)."""
        inputs = self.packer.pack(sched)
        if self._deferred is not None:  # the step before samples first: this one reads its tokens
            deferred, self._deferred = self._deferred, None
            deferred.resolve()
        if len(inputs.pending_dst):  # decodes of tokens the previous step sampled: fill them in on the device
            inputs.input_ids.index_copy_(0, inputs.pending_dst, self.last_sampled.index_select(0, inputs.pending_src))
        all_hidden = hidden = self._forward(inputs)
        sampling = sched.sampling
        plan = plan_step(sched) if sched.logprobs else None
        if not sampling:
            if plan is None:
                return SampledTokens(None, None)
            return self._to_host(None, gather_step(plan, hidden[:0], hidden.new_empty(0, dtype=torch.int64),
                                                   hidden, self.model.compute_logits))
        if len(sampling) < hidden.shape[0]:  # else every row samples, in order (decodes): no gather
            hidden = hidden[inputs.logits_indices]
        logits = self.model.compute_logits(hidden)  # [num_sampling, vocab] float32
        batch = self.sampler.batch(sampling, logits.shape[-1], self.device)
        if late_masks is None:
            return self._sample(logits, batch, sched.token_masks, plan, all_hidden)
        wait_masks = late_masks()
        self._deferred = SampledTokens.deferred(lambda: self._sample(logits, batch, wait_masks(), plan, all_hidden))
        return self._deferred

    @torch.inference_mode()  # a deferred sampling may run from `SampledTokens.tolist`, outside `execute`
    def _sample(self, logits: torch.Tensor, batch: SamplingBatch, masks: TokenMasks | None,
                plan: LogprobPlan | None, all_hidden: torch.Tensor) -> SampledTokens:
        if masks is not None:  # structured output: constrained rows keep only allowed tokens
            masks.apply(logits)
        self.last_sampled = self.sampler(logits, batch)  # (the sampler leaves `logits` as they are: raw)
        logprobs = None if plan is None else gather_step(plan, logits, self.last_sampled, all_hidden,
                                                          self.model.compute_logits)
        return self._to_host(self.last_sampled, logprobs)

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        meta = inputs.meta
        if self.graphs is not None and meta.is_decode_only and meta.num_seqs <= self.graphs.max_batch:
            return self.graphs.run(inputs.input_ids, inputs.positions, meta.slot_mapping, meta.seq_lens,
                                   meta.block_tables)
        return self.model(inputs.input_ids, inputs.positions, meta, self.kv_caches)  # [num_tokens, hidden]

    def _to_host(self, sampled: torch.Tensor | None, logprobs: StepLogprobs | None = None) -> SampledTokens:
        """Starts the copy of the sampled ids (and of the logprobs some rows asked for) to the host (pinned,
        non-blocking on CUDA; two buffers in turn, since a step's tokens are read only after the next step has
        launched). One event covers both copies."""
        if self.device.type != "cuda":
            return SampledTokens(sampled, None, logprobs)
        if logprobs is not None:
            logprobs.start_copy()
        if sampled is None:
            done = torch.cuda.Event()
            done.record()
            return SampledTokens(None, done, logprobs)
        self._turn ^= 1
        if self._host_ids[self._turn].numel() < sampled.numel():
            self._host_ids[self._turn] = torch.empty(max(sampled.numel(), self.config.max_num_seqs),
                                                     dtype=torch.int64, pin_memory=True)
        host = self._host_ids[self._turn][: sampled.numel()]
        host.copy_(sampled, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return SampledTokens(host, done, logprobs)


class SampledTokens:
    """One step's sampled token ids, on their way to the host; `tolist()` waits for them. `logprobs`, when some
    row asked, come with them (read after `tolist()`, same event). A step whose sampling waits for its masks
    holds it as `later` (`deferred`): it runs at the runner's next launch, or here when the tokens are read."""

    def __init__(self, ids: torch.Tensor | None, ready: torch.cuda.Event | None,
                 logprobs: StepLogprobs | None = None) -> None:
        self._ids = ids
        self._ready = ready
        self.logprobs = logprobs
        self._later: Callable[[], SampledTokens] | None = None
        self._error: Exception | None = None

    @classmethod
    def deferred(cls, later: Callable[[], SampledTokens]) -> SampledTokens:
        tokens = cls(None, None)
        tokens._later = later
        return tokens

    def resolve(self) -> None:
        """Launches a deferred sampling (once; nothing for a step already sampled). If it fails, the error is
        raised here and again by `tolist`, so that the step's read fails as a failed step does."""
        if self._error is not None:
            raise self._error
        if self._later is not None:
            later, self._later = self._later, None
            try:
                done = later()
            except Exception as error:
                self._error = error
                raise
            self._ids, self._ready, self.logprobs = done._ids, done._ready, done.logprobs

    def tolist(self) -> list[int]:
        self.resolve()
        if self._ready is not None:
            self._ready.synchronize()
        if self._ids is None:
            return []
        return self._ids.tolist()
