"""The plain-torch reference ops against straightforward formulas (and transformers' own rotary and RMSNorm),
the fused references against their compositions, and the layers' swappable op table and rotary cache."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from r1serve.config import ModelConfig
from r1serve.kernels import reference
from r1serve.model.layers import REFERENCE_OPS, KernelOps, Qwen2MLP, RMSNorm, RotaryEmbedding
from r1serve.model.qwen2 import Qwen2ForCausalLM


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_formula(dtype):
    x = torch.randn(7, 48, generator=gen()).to(dtype)
    weight = torch.rand(48, generator=gen(1)).to(dtype) + 0.5
    out = reference.rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    rows = x.double()
    expected = rows / torch.sqrt((rows ** 2).sum(-1, keepdim=True) / 48 + 1e-6) * weight.double()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_rms_norm_equals_transformers():
    qwen2 = pytest.importorskip("transformers.models.qwen2.modeling_qwen2")
    hf_norm = qwen2.Qwen2RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        hf_norm.weight.copy_(torch.randn(32, generator=gen(2)))
    x = torch.randn(5, 32, generator=gen(3)).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(reference.rms_norm(x, hf_norm.weight.to(torch.bfloat16), 1e-6),
                                   hf_norm.to(torch.bfloat16)(x), atol=0, rtol=0)


def test_fused_add_rms_norm_returns_sum_and_its_norm():
    x, residual = torch.randn(4, 16, generator=gen(4)), torch.randn(4, 16, generator=gen(5))
    weight = torch.randn(16, generator=gen(6))
    normed, new_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(normed, reference.rms_norm(x + residual, weight, 1e-5))


def test_silu_and_mul_formula():
    x = torch.randn(3, 10, generator=gen(7))
    gate, up = x[:, :5], x[:, 5:]
    expected = gate / (1 + torch.exp(-gate)) * up
    torch.testing.assert_close(reference.silu_and_mul(x), expected)
    assert reference.silu_and_mul(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="even"):
        reference.silu_and_mul(torch.zeros(2, 5))


def test_rotary_cache_layout():
    cache = reference.rotary_cos_sin_cache(head_dim=8, max_position=20, theta=10000.0)
    assert cache.shape == (20, 8) and cache.dtype == torch.float32
    pos, i = 13, 2
    angle = pos / 10000.0 ** (2 * i / 8)
    assert math.isclose(float(cache[pos, i]), math.cos(angle), abs_tol=1e-6)
    assert math.isclose(float(cache[pos, 4 + i]), math.sin(angle), abs_tol=1e-6)


def rotate_by_formula(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox rotary written out: pair (i, i + d/2) of each head turns by position * theta^(-2i/d)."""
    out = x.clone().double()
    half = x.shape[-1] // 2
    for t, pos in enumerate(positions.tolist()):
        for i in range(half):
            angle = pos * theta ** (-2 * i / x.shape[-1])
            a, b = x[t, :, i].double(), x[t, :, i + half].double()
            out[t, :, i] = a * math.cos(angle) - b * math.sin(angle)
            out[t, :, i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def test_apply_rotary_formula():
    q, k = torch.randn(5, 4, 8, generator=gen(8)), torch.randn(5, 2, 8, generator=gen(9))
    positions = torch.tensor([0, 1, 7, 30, 63])
    cache = reference.rotary_cos_sin_cache(8, 64, 500.0)
    q_rot, k_rot = reference.apply_rotary(q, k, positions, cache)
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    torch.testing.assert_close(q_rot.double(), rotate_by_formula(q, positions, 500.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(k_rot.double(), rotate_by_formula(k, positions, 500.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(q_rot[0], q[0])  # position 0 is the identity


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_equals_transformers(dtype):
    qwen2 = pytest.importorskip("transformers.models.qwen2.modeling_qwen2")
    num_tokens, head_dim = 6, 16
    q = torch.randn(num_tokens, 4, head_dim, generator=gen(10)).to(dtype)
    k = torch.randn(num_tokens, 2, head_dim, generator=gen(11)).to(dtype)
    positions = torch.tensor([3, 0, 9, 100, 2, 55])
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = positions[:, None].float() * inv_freq  # [T, head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)[None]  # [1, T, head_dim]
    hf_q, hf_k = qwen2.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                            emb.cos().to(dtype), emb.sin().to(dtype))
    cache = reference.rotary_cos_sin_cache(head_dim, 128, 10000.0)
    q_rot, k_rot = reference.apply_rotary(q, k, positions, cache)
    assert q_rot.dtype == dtype and k_rot.dtype == dtype
    torch.testing.assert_close(q_rot, hf_q[0].transpose(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(k_rot, hf_k[0].transpose(0, 1), atol=1e-6, rtol=0)


def test_rotary_cache_stays_float32_and_valid_after_cast_and_meta():
    rotary = RotaryEmbedding(8, 32, 10000.0).to(torch.bfloat16)
    expected = reference.rotary_cos_sin_cache(8, 32, 10000.0)
    assert rotary.cos_sin_cache.dtype == torch.float32
    torch.testing.assert_close(rotary.cos_sin_cache, expected)
    with torch.device("meta"):
        meta_rotary = RotaryEmbedding(8, 32, 10000.0)
    torch.testing.assert_close(meta_rotary.to_empty(device="cpu").cos_sin_cache, expected)


BASIC_OPS = ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "apply_rotary", "linear")
FUSED_OPS = {"fused_norm_linear": reference.rms_norm_linear, "fused_silu_linear": reference.silu_linear,
             "fused_rotary_store_kv": reference.rotary_store_kv,
             "fused_rotary_store_attend": REFERENCE_OPS.rotary_store_attend}


def counting_ops(calls: list[str], fused: bool) -> KernelOps:
    """REFERENCE_OPS with every op wrapped to log its name; with `fused`, the fused entries set too."""
    def counting(name: str, target):
        def wrapped(*args):
            calls.append(name)
            return target(*args)
        return wrapped

    ops = {name: counting(name, getattr(reference, name)) for name in BASIC_OPS}
    if fused:
        ops |= {name: counting(name, target) for name, target in FUSED_OPS.items()}
    return dataclasses.replace(REFERENCE_OPS, **ops)


def tiny_model() -> Qwen2ForCausalLM:
    config = ModelConfig.from_hf_dict({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 32, "hidden_size": 16,
                                       "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
                                       "num_key_value_heads": 1, "max_position_embeddings": 64})
    return Qwen2ForCausalLM(config)


def test_layers_call_ops_through_the_table():
    calls: list[str] = []
    ops = counting_ops(calls, fused=False)
    norm = RMSNorm(8, 1e-6, ops)
    norm(torch.randn(2, 8))
    norm(torch.randn(2, 8), torch.randn(2, 8))
    Qwen2MLP(8, 12, ops)(torch.randn(2, 8))
    assert calls == ["rms_norm", "fused_add_rms_norm", "linear", "silu_and_mul", "linear"]
    model = tiny_model()
    model.set_ops(ops)
    swapped = [m for m in model.modules() if hasattr(m, "ops")]
    assert len(swapped) == 2 * 4 + 1 + 1 + 1  # per layer: 2 norms, attention, MLP; final norm; rotary; lm_head
    assert all(m.ops is ops for m in swapped)


def run_decode_step(model: Qwen2ForCausalLM) -> torch.Tensor:
    """Two sequences, a prefill of 5 and 3 tokens then one decode step each; returns the decode's hidden rows."""
    from r1serve.kernels.attention import build_metadata

    cfg = model.config
    shape = (8, 4, cfg.num_key_value_heads, cfg.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_hidden_layers)]
    tables = [[3, 5], [1]]
    with torch.no_grad():
        model(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]),
              build_metadata([5, 3], [5, 3], tables, 4), caches)
        return model(torch.tensor([9, 10]), torch.tensor([5, 3]), build_metadata([1, 1], [6, 4], tables, 4), caches)


def test_decoder_layer_runs_the_fused_entries_and_they_equal_the_composition():
    """A table with the fused entries set calls them (and nothing they replace); the model's output is the
    same as with the entries left empty, which composes the element-wise ops."""
    model = tiny_model()
    unfused_calls: list[str] = []
    model.set_ops(counting_ops(unfused_calls, fused=False))
    unfused = run_decode_step(model)
    fused_calls: list[str] = []
    model.set_ops(counting_ops(fused_calls, fused=True))
    fused = run_decode_step(model)
    torch.testing.assert_close(fused, unfused, atol=0, rtol=0)
    assert set(unfused_calls) == set(BASIC_OPS)
    per_layer = ["fused_norm_linear", "fused_rotary_store_attend", "linear", "fused_norm_linear", "fused_silu_linear"]
    assert fused_calls == 2 * (per_layer * 2 + ["fused_add_rms_norm"])  # 2 steps of 2 layers and the final norm


def test_fused_references_equal_their_compositions():
    g = gen(12)
    x, residual = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    norm_w, weight, bias = torch.rand(16, generator=g) + 0.5, torch.randn(10, 16, generator=g), torch.randn(10)
    out, new_residual = reference.rms_norm_linear(x, residual, norm_w, 1e-6, weight, bias)
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(out, reference.rms_norm(x + residual, norm_w, 1e-6) @ weight.T + bias)
    out, same = reference.rms_norm_linear(x, None, norm_w, 1e-6, weight, None)
    assert same is x
    torch.testing.assert_close(out, reference.rms_norm(x, norm_w, 1e-6) @ weight.T)
    gate_up, down_w = torch.randn(3, 20, generator=g), torch.randn(16, 10, generator=g)
    expected = (torch.nn.functional.silu(gate_up[:, :10]) * gate_up[:, 10:]) @ down_w.T
    torch.testing.assert_close(reference.silu_linear(gate_up, down_w), expected)


def test_rotary_store_reference_rotates_stores_and_skips_padding():
    g = gen(13)
    q, k, v = (torch.randn(3, h, 8, generator=g) for h in (4, 2, 2))
    positions, slots = torch.tensor([4, 0, 9]), torch.tensor([5, -1, 12])
    cache = reference.rotary_cos_sin_cache(8, 16, 10000.0)
    k_cache, v_cache = torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8)
    q_rot = reference.rotary_store_kv(q, k, v, positions, cache, k_cache, v_cache, slots)
    ref_q, ref_k = reference.apply_rotary(q, k, positions, cache)
    torch.testing.assert_close(q_rot, ref_q)
    flat_k, flat_v = k_cache.view(16, 2, 8), v_cache.view(16, 2, 8)
    torch.testing.assert_close(flat_k[[5, 12]], ref_k[[0, 2]])
    torch.testing.assert_close(flat_v[[5, 12]], v[[0, 2]])
    assert flat_k.count_nonzero() == ref_k[[0, 2]].count_nonzero()  # the padding row wrote nothing
