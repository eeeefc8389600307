"""The Qwen2 network (DeepSeek-R1-Distill-Qwen-1.5B/7B/14B/32B, Qwen2.5) over the paged KV cache.

The engine calls it with a flat batch: the new tokens of every sequence in this step concatenated
(`input_ids`, `positions`: [num_tokens]) and an `AttentionMetadata` that says where each sequence's tokens
go in the cache, so prefill, chunked prefill and decode are one forward. `compute_logits` is separate so
the runner projects only the rows it samples from. `load_weights` takes Hugging Face tensor names and
packs q/k/v and gate/up into the fused parameters, refusing missing, unexpected and wrongly shaped tensors.
With a `QuantScheme` the decoder layers are `QuantDecoderLayer`s, whose projections stay packed (`model.quant`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from r1serve.config import ModelConfig
from r1serve.kernels.attention import AttentionBackend, AttentionMetadata, TorchAttention
from r1serve.model.layers import (
    REFERENCE_OPS,
    KernelOps,
    Qwen2Attention,
    Qwen2MLP,
    RMSNorm,
    RotaryEmbedding,
    set_ops,
)
from r1serve.model.quant.config import QuantScheme
from r1serve.model.quant.layers import QuantAttention, quant_linear
from r1serve.model.quant.loading import route_quantized

# (k_cache, v_cache) of one layer, each [num_blocks, block_size, num_kv_heads, head_dim]
KVCache = tuple[torch.Tensor, torch.Tensor]


class Qwen2DecoderLayer(nn.Module):
    """Pre-norm block: attention then MLP, with the residual carried beside the stream (fused add + norm)."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend, ops: KernelOps) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.self_attn = Qwen2Attention(config, backend, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.mlp = Qwen2MLP(config.hidden_size, config.intermediate_size, ops)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata, kv_cache: KVCache,
                rotary_emb: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, residual [T, hidden_size] → (this layer's output, the residual before it), [T, hidden].

        Each norm runs with the projection after it (`RMSNorm.project`), and the SiLU-and-mul with the down
        projection (`Qwen2MLP.down`): one kernel each where the ops fuse them."""
        qkv, residual = self.input_layernorm.project(hidden, residual, self.self_attn.qkv_proj)
        hidden = self.self_attn.attend(positions, qkv, meta, kv_cache, rotary_emb)
        gate_up, residual = self.post_attention_layernorm.project(hidden, residual, self.mlp.gate_up_proj)
        return self.mlp.down(gate_up), residual


class QuantDecoderLayer(Qwen2DecoderLayer):
    """The decoder layer with packed projections (`quant.layers`): each norm runs, then the quantized product
    (the fused norm + projection ops read a dense weight)."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend, ops: KernelOps, quant: QuantScheme) -> None:
        super().__init__(config, backend, ops)
        self.self_attn = QuantAttention(config, backend, ops, quant)
        self.mlp.gate_up_proj = quant_linear(config.hidden_size, 2 * config.intermediate_size, False, quant, ops,
                                             shards=(config.intermediate_size, config.intermediate_size))
        self.mlp.down_proj = quant_linear(config.intermediate_size, config.hidden_size, False, quant, ops)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata, kv_cache: KVCache,
                rotary_emb: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """As `Qwen2DecoderLayer.forward`: hidden, residual [T, hidden_size] → (output, residual before it)."""
        if residual is None:
            normed, residual = self.input_layernorm(hidden), hidden
        else:
            normed, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn.attend(positions, self.self_attn.qkv_proj(normed), meta, kv_cache, rotary_emb)
        normed, residual = self.post_attention_layernorm(hidden, residual)
        act = self.mlp.ops.silu_and_mul(self.mlp.gate_up_proj(normed))  # [T, intermediate]
        return self.mlp.down_proj(act), residual


class Qwen2Model(nn.Module):
    """Embedding, the decoder layers and the final norm (HF's `model.*` names)."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend, ops: KernelOps,
                 quant: QuantScheme | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen2DecoderLayer(config, backend, ops) if quant is None else QuantDecoderLayer(config, backend, ops, quant)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                          ops)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache]) -> torch.Tensor:
        """input_ids, positions [T] int64 → final-normed hidden states [T, hidden_size]."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"kv_caches: expected one (k, v) pair per layer ({len(self.layers)}), "
                             f"got {len(kv_caches)}")
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, meta, kv_cache, self.rotary_emb)
        hidden, _ = self.norm(hidden, residual)  # ModelConfig guarantees at least one layer
        return hidden


class Qwen2ForCausalLM(nn.Module):
    """The causal LM: `forward` gives final hidden states, `compute_logits` projects rows to the vocab."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend | None = None,
                 ops: KernelOps = REFERENCE_OPS, quant: QuantScheme | None = None) -> None:
        super().__init__()
        self.config = config
        self.quant = quant  # packed decoder projections (embeddings and lm_head stay dense), or None
        self.model = Qwen2Model(config, backend or TorchAttention(), ops, quant)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.ops = ops  # the logits projection's product
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head's weight with the embedding when the config says so (re-run after `to_empty`)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_ops(self, ops: KernelOps) -> None:
        """Run every layer's element-wise ops through `ops` (e.g. Triton kernels on CUDA)."""
        set_ops(self, ops)

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        for layer in self.model.layers:
            layer.self_attn.backend = backend

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache]) -> torch.Tensor:
        """input_ids, positions [T] int64 → hidden states [T, hidden_size] (final norm applied)."""
        return self.model(input_ids, positions, meta, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] → logits [N, vocab_size] float32."""
        return self.ops.linear(hidden, self.lm_head.weight, None).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the model (cast to its dtype and device).

        A quantized model takes its projections' tensors in its scheme's format (`quant.loading`). Raises
        ValueError naming missing and unexpected tensors, or a tensor whose shape does not fit."""
        if self.quant is not None:
            weights = route_quantized(self, weights, self.config.num_hidden_layers)
        expected = set(self.hf_parameter_names())
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            tied_head = name == "lm_head.weight" and self.config.tie_word_embeddings
            if tied_head or name.endswith("rotary_emb.inv_freq"):
                continue
            if name not in expected:
                unexpected.append(name)
                continue
            target = self._target_view(name, params)  # the slice of a (fused) parameter
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(target.shape)}")
            target.copy_(tensor)
            loaded.add(name)
        missing = sorted(expected - loaded)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the {self.config.architecture} config: "
                             f"missing tensors {_names(missing)}; unexpected tensors {_names(unexpected)}")

    def hf_parameter_names(self) -> list[str]:
        """The Hugging Face tensor names a checkpoint of this model holds (tied lm_head excluded)."""
        names: list[str] = []
        for name, _ in self.named_parameters():  # deduplicated, so a tied lm_head.weight is not listed
            fused = next((f for f in FUSED_SHARDS if f".{f}." in name), None)
            if fused is None:
                names.append(name)
            else:
                names += [name.replace(f".{fused}.", f".{part}.") for part in FUSED_SHARDS[fused]]
        return names

    def _target_view(self, hf_name: str, params: dict[str, nn.Parameter]) -> torch.Tensor:
        for fused, parts in FUSED_SHARDS.items():
            for part in parts:
                if f".{part}." in hf_name:
                    param = params[hf_name.replace(f".{part}.", f".{fused}.")]
                    start, size = self.shard_range(part)
                    return param.data.narrow(0, start, size)
        return params[hf_name].data

    def shard_range(self, part: str) -> tuple[int, int]:
        """(first row, rows) of one Hugging Face projection inside its fused parameter."""
        q, kv, inter = self.config.q_size, self.config.kv_size, self.config.intermediate_size
        ranges = {"q_proj": (0, q), "k_proj": (q, kv), "v_proj": (q + kv, kv),
                  "gate_proj": (0, inter), "up_proj": (inter, inter)}
        return ranges[part]


# fused parameter → the Hugging Face projections stacked in it, in row order
FUSED_SHARDS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def _names(names: list[str], limit: int = 12) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")
