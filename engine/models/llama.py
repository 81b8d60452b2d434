"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) over a flattened varlen batch.

All sequences of a step are concatenated into one row dimension; ``positions``
gives each row's absolute position, and attention goes through the paged KV
cache via an ``AttentionBackend``. Parameter names match Hugging Face's, so
``weights.load_weights`` maps checkpoints one to one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.attention import AttentionBackend, AttentionMetadata
from splitserve.engine.model_config import ModelConfig
from splitserve.engine.models.rotary import RopeTable, RotaryEmbedding, apply_rotary
from splitserve.engine.projection import Projection

if TYPE_CHECKING:
    from splitserve.kernels.cpu_layer_ops import CPULayerOps


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, weight applied in the input dtype (as HF Llama).

    ``ops``: the CPU layer ops (``LlamaForCausalLM.use_layer_ops``), which
    take bf16 rows in one pass instead of seven torch ops."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops: CPULayerOps | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # torch's fused op, the same math (equal bit for bit in our checks)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        if self.ops is not None and dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16:
            return self.ops.rms_norm(x, self.weight, self.eps)
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
        self.qkv: Projection | None = None
        self.out: Projection | None = None

    def prepare(self, packed: bool, batch_size_hint: int) -> None:
        """One matmul for q, k and v (see ``Projection``)."""
        self.qkv = Projection([self.q_proj, self.k_proj, self.v_proj], packed=packed,
                              batch_size_hint=batch_size_hint)
        self.out = Projection([self.o_proj], packed=packed, batch_size_hint=batch_size_hint)

    def forward(self, hidden: torch.Tensor, rope: RopeTable,
                kv_cache: torch.Tensor, metadata: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        """``rope``: this step's ``RotaryEmbedding.lookup`` table."""
        q = self._rotated_query_with_kv_stored(hidden, rope, kv_cache, metadata, backend)
        out = backend.forward(q, kv_cache, self.layer, metadata, self.scale)
        out = out.reshape(hidden.shape[0], self.num_heads * self.head_dim)
        return self.o_proj(out) if self.out is None else self.out(out)

    def _rotated_query_with_kv_stored(self, hidden: torch.Tensor, rope: RopeTable, kv_cache: torch.Tensor,
                                      metadata: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        """Project q/k/v, rotate q and k, store k and v; returns q [T, H, D]."""
        t = hidden.shape[0]
        if self.qkv is not None:
            qkv = self.qkv(hidden)
            if backend.can_rope_store and not self.qk_norm:
                return backend.rope_store(qkv, rope, self.num_heads, kv_cache, self.layer, metadata)
            q, k, v = qkv.split(self.sizes, dim=-1)
        else:
            q, k, v = self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(rope, q, k)
        backend.store_kv(k, v, kv_cache, self.layer, metadata)
        return q


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.intermediate_size = config.intermediate_size
        self.gate_up: Projection | None = None
        self.down: Projection | None = None
        self.ops: CPULayerOps | None = None  # bf16 SwiGLU in one pass (see RMSNorm)

    def prepare(self, packed: bool, batch_size_hint: int) -> None:
        """One matmul for gate and up (see ``Projection``)."""
        self.gate_up = Projection([self.gate_proj, self.up_proj], packed=packed, batch_size_hint=batch_size_hint)
        self.down = Projection([self.down_proj], packed=packed, batch_size_hint=batch_size_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None or self.down is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate_up = self.gate_up(x)
        if self.ops is not None and gate_up.dtype == torch.bfloat16 and gate_up.dim() == 2:
            return self.down(self.ops.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down(F.silu(gate).mul_(up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, rope: RopeTable,
                kv_cache: torch.Tensor, metadata: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rope, kv_cache, metadata, backend)
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
        self.logits: Projection | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        """input_ids, positions [T] -> hidden [T, hidden_size]; K/V of all rows stored."""
        hidden = self.model.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions, hidden.dtype)
        for layer in self.model.layers:
            hidden = layer(hidden, rope, kv_cache, metadata, backend)
        return self.model.norm(hidden)

    def prepare_projections(self, packed: bool, batch_size_hint: int = 64) -> None:
        """Fuse q/k/v and gate/up into one matmul each and, with ``packed``,
        reorder every projection's weight for oneDNN (``Projection``); call
        once, after loading weights."""
        for layer in self.model.layers:
            layer.self_attn.prepare(packed, batch_size_hint)
            layer.mlp.prepare(packed, batch_size_hint)
        self.logits = Projection([self.lm_head], packed=packed, batch_size_hint=batch_size_hint,
                                 keep_dense=self.config.tie_word_embeddings)

    def use_layer_ops(self, ops: CPULayerOps | None) -> None:
        """Route the norms and the SwiGLU of bf16 activations through ``ops``
        (the CPU attention backend's layer ops; None: torch's ops)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, LlamaMLP)):
                module.ops = ops

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden) if self.logits is None else self.logits(hidden)
