"""The Qwen2 model against transformers' Qwen2ForCausalLM on the same random weights: paged prefill of a
batch, batched decode, chunked prefill, greedy generation, tied embeddings, and load_weights' refusals."""

from __future__ import annotations

import inspect
import random

import pytest
import torch

from r1serve.config import ModelConfig
from r1serve.kernels.attention import build_metadata
from r1serve.model.qwen2 import Qwen2ForCausalLM

transformers = pytest.importorskip("transformers")

HF_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": None, "eos_token_id": None, "torch_dtype": "float32",
}
BLOCK_SIZE = 4
ATOL = 1e-4


def make_hf_model(tied: bool = False, seed: int = 0) -> torch.nn.Module:
    """A tiny HF Qwen2 whose every parameter (biases and norms too) is random, so none goes untested."""
    cfg = transformers.Qwen2Config(**{**HF_CONFIG, "tie_word_embeddings": tied})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = transformers.Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return hf


def make_model(hf: torch.nn.Module, tied: bool = False) -> Qwen2ForCausalLM:
    model = Qwen2ForCausalLM(ModelConfig.from_hf_dict({**HF_CONFIG, "tie_word_embeddings": tied}))
    model.load_weights(hf.state_dict().items())
    return model.eval()


class PagedRunner:
    """Drives the model step by step over a paged KV cache, handing out blocks in a shuffled order."""

    def __init__(self, model: Qwen2ForCausalLM, num_blocks: int = 64) -> None:
        cfg = model.config
        shape = (num_blocks, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim)
        self.model = model
        self.kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_hidden_layers)]
        self.free = list(range(num_blocks))
        random.Random(0).shuffle(self.free)
        self.tables: list[list[int]] = []
        self.lens: list[int] = []

    def add_sequence(self) -> int:
        self.tables.append([])
        self.lens.append(0)
        return len(self.tables) - 1

    @torch.no_grad()
    def step(self, chunks: dict[int, list[int]]) -> list[torch.Tensor]:
        """Feed each sequence's new tokens; returns each sequence's logits [len(chunk), vocab]."""
        ids, positions, query_lens, seq_lens, tables = [], [], [], [], []
        for seq, tokens in chunks.items():
            start, end = self.lens[seq], self.lens[seq] + len(tokens)
            while len(self.tables[seq]) * BLOCK_SIZE < end:
                self.tables[seq].append(self.free.pop())
            ids += tokens
            positions += range(start, end)
            query_lens.append(len(tokens))
            seq_lens.append(end)
            tables.append(self.tables[seq])
            self.lens[seq] = end
        meta = build_metadata(query_lens, seq_lens, tables, BLOCK_SIZE)
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), meta, self.kv_caches)
        logits = self.model.compute_logits(hidden)
        return list(logits.split(query_lens))


PROMPTS = [[5, 17, 300, 2, 9, 44, 101], [7, 7, 8], [400, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [33]]


@pytest.fixture(scope="module")
def hf_and_model() -> tuple[torch.nn.Module, Qwen2ForCausalLM]:
    hf = make_hf_model()
    return hf, make_model(hf)


def test_batched_prefill_and_decode_match_transformers(hf_and_model):
    hf, model = hf_and_model
    runner = PagedRunner(model)
    seqs = [runner.add_sequence() for _ in PROMPTS]
    ours = runner.step(dict(zip(seqs, PROMPTS, strict=True)))
    hf_caches = []
    for prompt, got in zip(PROMPTS, ours, strict=True):
        ref, cache = hf_step(hf, prompt, None)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
        hf_caches.append(cache)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        new = torch.randint(0, HF_CONFIG["vocab_size"], (len(PROMPTS),), generator=gen).tolist()
        ours = runner.step({s: [t] for s, t in zip(seqs, new, strict=True)})
        for i, token in enumerate(new):
            ref, hf_caches[i] = hf_step(hf, [token], hf_caches[i])
            torch.testing.assert_close(ours[i], ref, atol=ATOL, rtol=0)


@torch.no_grad()
def hf_step(hf: torch.nn.Module, tokens: list[int], cache: object) -> tuple[torch.Tensor, object]:
    """transformers with its own KV cache (`cache` in transformers 5.2x, `past_key_values` before)."""
    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    out = hf(torch.tensor([tokens]), use_cache=True, **{key: cache})
    return out.logits[0], getattr(out, key)


def test_chunked_prefill_equals_one_shot(hf_and_model):
    _, model = hf_and_model
    prompt = PROMPTS[2]
    one_shot = PagedRunner(model)
    seq = one_shot.add_sequence()
    whole = one_shot.step({seq: prompt})[0]
    chunked = PagedRunner(model)
    a, b = chunked.add_sequence(), chunked.add_sequence()
    parts = [chunked.step({a: prompt[:5], b: PROMPTS[0]})[0]]
    parts.append(chunked.step({a: prompt[5:9], b: [3]})[0])  # a chunk beside another sequence's decode
    parts.append(chunked.step({a: prompt[9:]})[0])
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-5, rtol=0)


def greedy_paged(model: Qwen2ForCausalLM, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    runner = PagedRunner(model)
    seqs = [runner.add_sequence() for _ in prompts]
    logits = runner.step(dict(zip(seqs, prompts, strict=True)))
    outputs: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        next_tokens = [int(seq_logits[-1].argmax()) for seq_logits in logits]
        for out, token in zip(outputs, next_tokens, strict=True):
            out.append(token)
        logits = runner.step({s: [t] for s, t in zip(seqs, next_tokens, strict=True)})
    return outputs


def test_greedy_tokens_match_transformers_generate(hf_and_model):
    hf, model = hf_and_model
    ours = greedy_paged(model, PROMPTS, max_new_tokens=10)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        with torch.no_grad():
            mask = torch.ones(1, len(prompt), dtype=torch.long)
            ref = hf.generate(torch.tensor([prompt]), attention_mask=mask, do_sample=False, max_new_tokens=10,
                              min_new_tokens=10, pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist()


def test_tied_embeddings_match_transformers():
    hf = make_hf_model(tied=True, seed=3)
    assert "lm_head.weight" not in dict(hf.named_parameters())
    model = make_model(hf, tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    runner = PagedRunner(model)
    got = runner.step({runner.add_sequence(): PROMPTS[0]})[0]
    with torch.no_grad():
        torch.testing.assert_close(got, hf(torch.tensor([PROMPTS[0]])).logits[0], atol=ATOL, rtol=0)
    # a tied checkpoint without lm_head.weight loads too
    without_head = [(n, t) for n, t in hf.state_dict().items() if n != "lm_head.weight"]
    reloaded = make_model_from(without_head, tied=True)
    assert torch.equal(reloaded.lm_head.weight, hf.model.embed_tokens.weight)


def make_model_from(weights: list[tuple[str, torch.Tensor]], tied: bool = False) -> Qwen2ForCausalLM:
    model = Qwen2ForCausalLM(ModelConfig.from_hf_dict({**HF_CONFIG, "tie_word_embeddings": tied}))
    model.load_weights(weights)
    return model


def test_load_weights_packs_fused_projections(hf_and_model):
    hf, model = hf_and_model
    attn, mlp = hf.model.layers[1].self_attn, hf.model.layers[1].mlp
    qkv = model.model.layers[1].self_attn.qkv_proj
    qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    torch.testing.assert_close(qkv.weight, qkv_weight)
    torch.testing.assert_close(qkv.bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
    gate_up = model.model.layers[1].mlp.gate_up_proj.weight
    torch.testing.assert_close(gate_up, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))


def test_load_weights_ignores_inv_freq(hf_and_model):
    hf, _ = hf_and_model
    inv_freq = ("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8))
    model = make_model_from([*hf.state_dict().items(), inv_freq])
    torch.testing.assert_close(model.model.norm.weight, hf.model.norm.weight)


def test_load_weights_names_missing_and_unexpected(hf_and_model):
    hf, _ = hf_and_model
    weights = [(n, t) for n, t in hf.state_dict().items() if n != "model.layers.1.self_attn.k_proj.bias"]
    weights.append(("model.layers.0.mlp.extra_proj.weight", torch.zeros(3)))
    with pytest.raises(ValueError) as err:
        make_model_from(weights)
    message = str(err.value)
    assert "model.layers.1.self_attn.k_proj.bias" in message
    assert "model.layers.0.mlp.extra_proj.weight" in message
    untied = [(n, t) for n, t in hf.state_dict().items() if n != "lm_head.weight"]
    with pytest.raises(ValueError, match="missing tensors lm_head.weight"):
        make_model_from(untied)


def test_load_weights_rejects_wrong_shape(hf_and_model):
    hf, _ = hf_and_model
    weights = dict(hf.state_dict())
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\(95, 64\).*\(96, 64\)"):
        make_model_from(list(weights.items()))


def test_kv_caches_must_match_layers(hf_and_model):
    _, model = hf_and_model
    meta = build_metadata([1], [1], [[0]], BLOCK_SIZE)
    with pytest.raises(ValueError, match="kv_caches"):
        model(torch.tensor([1]), torch.tensor([0]), meta, [])
