"""The engine on CUDA (run on the device machine; skipped without CUDA): graphs equal eager, logits equal the CPU
reference within bf16 tolerance, greedy output equals transformers' greedy output on the same random weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r1serve import LLM, SamplingParams

pytestmark = pytest.mark.gpu

# Small, but with the 1.5B model's head layout (head_dim 128, GQA 6:1), so the real kernels run.
GPU_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 768,
    "intermediate_size": 2048, "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 1,
    "head_dim": 128, "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gpu") / "gpu-qwen2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(GPU_CONFIG))
    return path


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1000, 150000, (n,), generator=g).tolist() for n in (1, 7, 16, 17, 100, 333)]


def greedy(llm: LLM, max_tokens: int = 24) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts(), params)]


def test_graph_replay_equals_eager(model_dir: Path) -> None:
    common = dict(load_format="dummy", dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3)
    graphed = LLM(str(model_dir), **common)
    assert graphed.engine.runner.graphs is not None
    eager = LLM(str(model_dir), enforce_eager=True, **common)
    assert eager.engine.runner.graphs is None
    assert greedy(graphed) == greedy(eager)


@pytest.mark.parametrize("quantization", ["w4a16", "int8"])
def test_quantized_graphs_above_16_rows_equal_eager(model_dir: Path, quantization: str) -> None:
    """24 decode rows: a captured graph runs the dense form (the weight dequantized into the shared scratch, then
    cuBLAS) in every layer, as eager steps do; the greedy tokens are the same."""
    common = dict(load_format="dummy", dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3,
                  quantization=quantization)
    g = torch.Generator().manual_seed(1)
    many = [torch.randint(1000, 150000, (n,), generator=g).tolist() for n in range(5, 29)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = []
    for enforce_eager in (False, True):
        llm = LLM(str(model_dir), enforce_eager=enforce_eager, **common)
        assert (llm.engine.runner.graphs is None) == enforce_eager
        outs.append([o.outputs[0].token_ids for o in llm.generate(many, params)])
    assert outs[0] == outs[1]


def test_logits_match_the_cpu_reference(model_dir: Path) -> None:
    common = dict(load_format="dummy", max_model_len=1024)
    cuda = LLM(str(model_dir), dtype="bfloat16", gpu_memory_utilization=0.3, **common)
    cpu = LLM(str(model_dir), device="cpu", dtype="float32", kv_cache_space=0.5, **common)
    # dummy weights come from each device's own generator: give the CUDA model the CPU model's weights
    state = {k: v.to("cuda", torch.bfloat16) for k, v in cpu.engine.runner.model.state_dict().items()}
    cuda.engine.runner.model.load_state_dict(state)
    for engine in (cuda.engine, cpu.engine):
        engine.add_request(prompts()[4], SamplingParams(temperature=0.0, max_tokens=1))
    logits = []
    for engine in (cuda.engine, cpu.engine):
        sched = engine.scheduler.schedule()
        inputs = engine.runner.packer.pack(sched)
        with torch.inference_mode():
            hidden = engine.runner.model(inputs.input_ids, inputs.positions, inputs.meta, engine.runner.kv_caches)
            logits.append(engine.runner.model.compute_logits(hidden).float().cpu())
    err = (logits[0] - logits[1]).norm() / logits[1].norm()
    assert err < 2e-2, f"relative error {err:.2e}"


def test_greedy_matches_transformers(model_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.backends.cuda.matmul.allow_tf32 = False
    llm = LLM(str(model_dir), load_format="dummy", dtype="float32", max_model_len=1024, gpu_memory_utilization=0.3)
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("offline", Path(__file__).parents[1] / "benchmarks" / "offline.py")
    offline = importlib.util.module_from_spec(spec)
    sys.modules["offline"] = offline
    spec.loader.exec_module(offline)
    hf = offline.hf_model(llm, "cuda", torch.float32)
    ours = greedy(llm, max_tokens=12)
    for prompt, got in zip(prompts(), ours, strict=True):
        ref = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert got == ref
    assert transformers is not None


def test_pipelined_steps_equal_steps_read_one_at_a_time(model_dir: Path) -> None:
    """On CUDA the engine launches step N+1 (graphs, pending tokens filled in on the device) before reading step
    N: forcing it to read each step first must give the same tokens, seeded sampling and n included."""
    llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3)
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=11, n=2, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=20, seed=5, max_tokens=1),
              SamplingParams(temperature=0.6, top_p=0.95, seed=9, max_tokens=33, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)]

    def run() -> list[list[list[int]]]:
        return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts(), params)]

    pipelined = run()
    llm.engine.num_sync_requests += 1
    try:
        one_at_a_time = run()
    finally:
        llm.engine.num_sync_requests -= 1
    assert pipelined == one_at_a_time
    assert [len(o[0]) for o in pipelined] == [20, 20, 1, 33, 7, 40]
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_fp8_kv_cache_graphs_equal_eager_and_stay_close_to_bf16(model_dir: Path) -> None:
    """`kv_cache_dtype="fp8"`: twice the blocks of a bf16 cache in the same memory, CUDA-graph decode equal to
    eager decode, and last-position logits close to a bf16 cache's (the same weights and prompt)."""
    common = dict(load_format="dummy", dtype="bfloat16", max_model_len=1024, num_kv_blocks=256)
    graphed = LLM(str(model_dir), kv_cache_dtype="fp8", **common)
    runner = graphed.engine.runner
    assert runner.graphs is not None and runner.kv_cache.dtype == torch.float8_e4m3fn
    eager = LLM(str(model_dir), kv_cache_dtype="fp8", enforce_eager=True, **common)
    assert greedy(graphed) == greedy(eager)
    bf16 = LLM(str(model_dir), **common)
    assert runner.block_bytes * 2 == bf16.engine.runner.block_bytes
    logits = []
    for llm in (graphed, bf16):
        engine = llm.engine
        engine.add_request(prompts()[4], SamplingParams(temperature=0.0, max_tokens=1))
        with torch.inference_mode():  # the packer's staging buffer is an inference tensor
            inputs = engine.runner.packer.pack(engine.scheduler.schedule())
            hidden = engine.runner.model(inputs.input_ids, inputs.positions, inputs.meta, engine.runner.kv_caches)
            logits.append(engine.runner.model.compute_logits(hidden[-1:]).float().cpu())
    err = (logits[0] - logits[1]).norm() / logits[1].norm()
    assert err < 5e-2, f"relative error {err:.2e}"


def test_logprobs_on_cuda_match_the_cpu_reference_and_leave_other_rows_alone(model_dir: Path) -> None:
    """Logprobs gathered on the device (prompt positions, and decode steps under CUDA graphs) equal a float32 CPU
    engine's on the same weights within bf16 tolerance; a row that does not ask draws what it draws alone."""
    common = dict(load_format="dummy", max_model_len=1024)
    cuda = LLM(str(model_dir), dtype="bfloat16", gpu_memory_utilization=0.3, **common)
    cpu = LLM(str(model_dir), device="cpu", dtype="float32", kv_cache_space=0.5, **common)
    state = {k: v.to("cuda", torch.bfloat16) for k, v in cpu.engine.runner.model.state_dict().items()}
    cuda.engine.runner.model.load_state_dict(state)
    prompt = prompts()[4]
    free = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    alone = cuda.generate([prompts()[3]], free)[0].outputs[0].token_ids
    asks = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    got, neighbour = cuda.generate([prompt, prompts()[3]], [asks, free])
    assert neighbour.outputs[0].token_ids == alone and neighbour.outputs[0].logprobs is None
    ref = cpu.generate([prompt], asks)[0]
    for ours, theirs in zip(got.prompt_logprobs[1:], ref.prompt_logprobs[1:], strict=True):
        assert ours[0] == pytest.approx(theirs[0], abs=0.05)
    sample = got.outputs[0]
    assert len(sample.logprobs) == len(sample.token_ids) == 8
    for token, (logprob, top_ids, top_values, rank) in zip(sample.token_ids, sample.logprobs, strict=True):
        assert rank == 1  # greedy
        assert top_ids[0] == token and top_values[0] == pytest.approx(logprob)  # greedy: the sample is the top
        assert list(top_values) == sorted(top_values, reverse=True) and -30 < logprob <= 0
    first = ref.outputs[0].logprobs[0]  # the first output token comes from the same prompt on both
    assert sample.logprobs[0][0] == pytest.approx(first[0], abs=0.05)
