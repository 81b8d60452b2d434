"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) over a flattened varlen batch.

All sequences of a step are concatenated into one row dimension; ``positions``
gives each row's absolute position, and attention goes through the paged KV
cache via an ``AttentionBackend``. Parameter names match Hugging Face's, so
``weights.load_weights`` maps checkpoints one to one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.attention import AttentionBackend, AttentionMetadata
from splitserve.engine.model_config import ModelConfig
from splitserve.engine.models.rotary import RotaryEmbedding


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, weight applied in the input dtype (as HF Llama)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.scale = self.head_dim ** -0.5
        self.sizes = [q_size, kv_size, kv_size]
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def fuse(self) -> None:
        """One matmul for q, k and v: their weights move into one tensor and
        the three Linears keep views of it (same names and values)."""
        self.qkv = _fuse_linears([self.q_proj, self.k_proj, self.v_proj])

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_cache: torch.Tensor, metadata: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        t = hidden.shape[0]
        if self.qkv is not None:
            q, k, v = F.linear(hidden, *self.qkv).split(self.sizes, dim=-1)
        else:
            q, k, v = self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        backend.store_kv(k, v, kv_cache, self.layer, metadata)
        out = backend.forward(q, kv_cache, self.layer, metadata, self.scale)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.intermediate_size = config.intermediate_size
        self.gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def fuse(self) -> None:
        """One matmul for gate and up (see ``LlamaAttention.fuse``)."""
        self.gate_up = _fuse_linears([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = F.linear(x, *self.gate_up).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))


def _fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the Linears' weights (and biases) along the output dim and
    point each Linear's parameters at its slice, so memory is not doubled and
    later in-place weight updates reach the fused matmul."""
    with torch.no_grad():
        weight = torch.cat([m.weight for m in linears])
        has_bias = linears[0].bias is not None
        bias = torch.cat([m.bias for m in linears]) if has_bias else None
        start = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
            if bias is not None:
                m.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
            start += n
    return weight, bias


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_cache: torch.Tensor, metadata: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), positions, rotary,
                                         kv_cache, metadata, backend)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The decoder plus LM head. ``forward`` returns final hidden states for
    every row; ``compute_logits`` projects only the rows that sample."""

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, max_positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        """input_ids, positions [T] -> hidden [T, hidden_size]; K/V of all rows stored."""
        hidden = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            hidden = layer(hidden, positions, self.rotary, kv_cache, metadata, backend)
        return self.model.norm(hidden)

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up into one matmul each; call after loading weights."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
