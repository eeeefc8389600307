"""The CPU's bf16 projections on weights reordered for oneDNN: the same products as `F.linear`, the same logits
and greedy tokens as the model on plain weights, and the weights that must stay plain left alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from r1serve import LLM, SamplingParams
from r1serve.config import ModelConfig
from r1serve.engine import model_runner
from r1serve.kernels import onednn, reference
from r1serve.kernels.attention import build_metadata
from r1serve.model.loader import weight_bytes
from r1serve.model.qwen2 import Qwen2ForCausalLM

pytestmark = pytest.mark.skipif(not onednn.available(),
                                reason="no oneDNN bf16 products here (no mkldnn in torch, or no AVX-512)")

CONFIG = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}


def bf16_model(tied: bool = False) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(ModelConfig.from_hf_dict({**CONFIG, "tie_word_embeddings": tied}))
    for param in model.parameters():
        param.data.uniform_(-0.1, 0.1)
    return model.to(torch.bfloat16).eval()


def prefill_logits(model: Qwen2ForCausalLM, num_tokens: int) -> torch.Tensor:
    """The logits of every position of one prompt of `num_tokens` random ids (a fresh KV cache)."""
    config = model.config
    caches = [(torch.zeros(4, 64, config.num_key_value_heads, config.head_dim, dtype=torch.bfloat16),
               torch.zeros(4, 64, config.num_key_value_heads, config.head_dim, dtype=torch.bfloat16))
              for _ in range(config.num_hidden_layers)]
    ids = torch.randint(0, config.vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(1))
    meta = build_metadata([num_tokens], [num_tokens], [[0, 1, 2, 3]], 64)
    with torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(num_tokens), meta, caches))


@pytest.mark.parametrize("rows", [1, 3, 8, 130])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_equals_f_linear(rows: int, with_bias: bool) -> None:
    torch.manual_seed(rows)
    weight = torch.randn(96, 64, dtype=torch.bfloat16)
    bias = torch.randn(96, dtype=torch.bfloat16) if with_bias else None
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    assert packed.is_mkldnn
    got, expected = reference.linear(x, packed, bias), F.linear(x, weight, bias)
    # bitwise equal on AVX-512 CPUs; oneDNN may pick other kernels (another summation order) elsewhere
    torch.testing.assert_close(got, expected, atol=0.1, rtol=1.6e-2)
    assert (got != expected).float().mean() < 0.05


def test_prepacked_model_gives_the_plain_models_logits() -> None:
    plain, packed = bf16_model(), bf16_model()
    size = weight_bytes(packed)
    count = onednn.prepack_linears(packed)
    # every layer's qkv, o, gate_up and down, and lm_head
    assert count == 4 * CONFIG["num_hidden_layers"] + 1
    assert packed.lm_head.weight.is_mkldnn and packed.model.layers[0].mlp.down_proj.weight.is_mkldnn
    assert not packed.model.embed_tokens.weight.is_mkldnn
    assert weight_bytes(packed) == size
    expected, got = prefill_logits(plain, 20), prefill_logits(packed, 20)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)  # bf16 products (bitwise equal here)
    assert torch.equal(got.argmax(dim=-1), expected.argmax(dim=-1))


def test_prepack_leaves_fp32_and_shared_weights_plain() -> None:
    assert onednn.prepack_linears(bf16_model().float()) == 0
    tied = bf16_model(tied=True)
    assert onednn.prepack_linears(tied) == 4 * CONFIG["num_hidden_layers"]  # all but the tied lm_head
    assert tied.lm_head.weight is tied.model.embed_tokens.weight and not tied.lm_head.weight.is_mkldnn
    assert onednn.prepack_linears(tied) == 0  # reordered weights are not reordered again
    assert onednn.prepack_linears(nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16).to("meta"))) == 0


def test_bf16_engine_greedy_tokens_equal_with_and_without_prepacking(tiny_model_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [[1000 + 7 * i for i in range(n)] for n in (5, 17, 40)]

    def tokens(expect_packed: bool) -> list[list[int]]:
        llm = LLM(str(tiny_model_dir), load_format="dummy", dtype="bfloat16", kv_cache_space=0.05)
        assert llm.engine.runner.model.lm_head.weight.is_mkldnn == expect_packed
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    packed = tokens(expect_packed=True)
    monkeypatch.setattr(model_runner, "prepack_linears", lambda model: 0)
    assert tokens(expect_packed=False) == packed
