"""Quantization on load (`--quantization int8|w8a8|fp8|w4a16|awq`, here on dummy weights, which are the dense
model's dummy weights quantized): each mode's logits against the dense model's, as top-1 agreement and KL
divergence within a bound that a scrambled layout fails; flag validation; the engine and the server running a
quantized model on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from r1serve import LLM, SamplingParams
from r1serve.config import EngineConfig
from r1serve.kernels.quant_reference import pack_int4, unpack_int4
from r1serve.model.loader import load_model, load_model_config
from r1serve.model.quant.formats import AWQ_ORDER
from r1serve.model.quant.layers import Int4Linear, PerChannelLinear
from r1serve.server.settings import QUANTIZATION_CHOICES, ServerSettings
from server_utils import running_server
from test_model import PagedRunner

CPU = torch.device("cpu")
# hidden and intermediate sizes multiples of the int4 group size (128)
QUANT_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 512, "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}
# mode → (KL(dense || quantized) bound, top-1 agreement floor). Measured on this model and prompt: int8 1.0e-6 /
# 1.00, w8a8 2.8e-6 / 0.97, fp8 5.2e-5 / 0.94, w4a16 4.4e-4 / 0.78, awq 2.5e-4 / 0.78 (dummy logits are nearly
# flat, std 0.23, so top-1 flips on small errors).
BOUNDS = {"int8": (1e-5, 0.9), "w8a8": (2e-5, 0.9), "fp8": (3e-4, 0.85), "w4a16": (2e-3, 0.65),
          "awq": (2e-3, 0.65)}
PROMPT = torch.randint(0, 512, (32,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("quant") / "tiny-qwen2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QUANT_CONFIG))
    return folder


def load(folder: Path, quantization: str | None):
    config = EngineConfig(model=str(folder), device="cpu", load_format="dummy", quantization=quantization)
    return load_model(config, load_model_config(config, folder), folder, CPU, torch.float32)


def logits_of(model) -> torch.Tensor:
    runner = PagedRunner(model)
    seq = runner.add_sequence()
    return runner.step({seq: PROMPT})[0]


def agreement(ours: torch.Tensor, dense: torch.Tensor) -> tuple[float, float]:
    """(KL(dense || ours) per position, top-1 agreement)."""
    kl = torch.nn.functional.kl_div(ours.log_softmax(-1), dense.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    return kl, (ours.argmax(-1) == dense.argmax(-1)).float().mean().item()


@pytest.fixture(scope="module")
def dense_logits(model_dir) -> torch.Tensor:
    return logits_of(load(model_dir, None))


def scramble(model) -> None:
    """Reads every packed weight with the wrong column order: int4 words as if AWQ-interleaved, int8/fp8 rows
    reversed. The scales stay, so only a loader that gets the layout right passes the bound."""
    for module in model.modules():
        if isinstance(module, Int4Linear):
            nibbles = unpack_int4(module.qweight).reshape(module.out_features, -1, 8)[..., list(AWQ_ORDER)]
            module.qweight.copy_(pack_int4(nibbles.reshape(module.out_features, -1)))
        elif isinstance(module, PerChannelLinear):
            module.qweight.copy_(module.qweight.float().flip(1).to(module.qweight.dtype))


@pytest.mark.parametrize("mode", list(BOUNDS))
def test_quantized_logits_agree_with_dense(model_dir, dense_logits, mode):
    model = load(model_dir, mode)
    assert model.quant is not None and model.quant.method == mode
    kl, top1 = agreement(logits_of(model), dense_logits)
    scramble(model)
    bad_kl, bad_top1 = agreement(logits_of(model), dense_logits)
    print(f"{mode}: KL {kl:.2e}, top-1 {top1:.3f}; scrambled layout: KL {bad_kl:.2e}, top-1 {bad_top1:.3f}")
    max_kl, min_top1 = BOUNDS[mode]
    assert kl < max_kl and top1 >= min_top1
    assert bad_kl > max_kl


def test_packed_buffers_replace_the_dense_weights(model_dir):
    model = load(model_dir, "w4a16")
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, Int4Linear) and down.qweight.dtype == torch.int32 and down.zeros is None
    assert tuple(down.qweight.shape) == (128, 256 // 8) and tuple(down.scales.shape) == (128, 2)
    assert model.lm_head.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.float32
    fp8 = load(model_dir, "fp8").model.layers[1].self_attn.qkv_proj
    assert fp8.qweight.dtype == torch.float8_e4m3fn and fp8.scales.dtype == torch.float32 and not fp8.act_quant


def test_fp8_and_scales_keep_their_dtype_under_model_to(model_dir):
    model = load(model_dir, "fp8").to(torch.bfloat16)
    proj = model.model.layers[0].mlp.gate_up_proj
    assert proj.qweight.dtype == torch.float8_e4m3fn and proj.scales.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(("flag", "message"), [
    ("compressed-tensors", "needs a compressed-tensors checkpoint"),
    ("gptq", "not supported"),
])
def test_flags_that_cannot_apply_are_refused(model_dir, flag, message):
    with pytest.raises(ValueError, match=message):
        load(model_dir, flag)


def test_awq_on_a_dense_checkpoint_needs_dummy_weights(model_dir):
    config = EngineConfig(model=str(model_dir), device="cpu", quantization="awq")
    with pytest.raises(ValueError, match="--quantization awq needs a awq checkpoint"):
        load_model(config, load_model_config(config, model_dir), model_dir, CPU, torch.float32)


def test_server_settings_offer_the_engines_methods():
    assert QUANTIZATION_CHOICES == ("none", "awq", "compressed-tensors", "fp8", "int8", "w8a8", "w4a16")
    assert ServerSettings(quantization="awq", load_format="dummy").engine_config().quantization == "awq"


def test_engine_generates_with_a_quantized_model(model_dir):
    llm = LLM(str(model_dir), load_format="dummy", quantization="awq", device="cpu", dtype="float32",
              max_model_len=64, num_kv_blocks=16, max_num_seqs=2)
    assert llm.engine.runner.quantization.startswith("awq (int4, group 128, zero points")
    out = llm.generate([PROMPT[:8]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5


@pytest.mark.slow
def test_server_serves_awq_dummy_weights(model_dir):
    with running_server(model_dir, "--quantization", "awq", "--max-model-len", "64", "--device", "cpu",
                        "--max-num-seqs", "2", "--no-engine-process") as server:
        version = httpx.get(f"{server.url}/version").json()
        body = {"model": str(model_dir), "prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True}
        reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
        log = server.read_log()
    assert version["quantization"] == "awq"
    assert reply.status_code == 200, reply.text
    assert "quantization: awq (int4, group 128, zero points; quantized on load); weights:" in log
