"""Rotary position embedding (rotate-half convention, as Hugging Face Llama)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from splitserve.engine.model_config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Per-pair inverse frequencies in fp32, with linear or llama3 scaling applied."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        if rope.original_max_position_embeddings is None:
            raise ValueError("llama3 rope scaling needs original_max_position_embeddings")
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to q and k rows given each row's absolute position.

    cos/sin are tabulated once for ``max_positions`` in fp32 (the same products
    transformers computes per call) and cast to the activations' dtype on use.
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(rope, head_dim)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", emb.cos(), persistent=False)
        self.register_buffer("sin_cache", emb.sin(), persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTable:
        """The step's rotary inputs: once per step, shared by every layer."""
        return RopeTable(positions, self.cos_cache[positions].unsqueeze(1).to(dtype),
                         self.sin_cache[positions].unsqueeze(1).to(dtype), self.cos_cache, self.sin_cache)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query [T, H, D], key [T, KVH, D], positions [T] -> rotated (query, key)."""
        return apply_rotary(self.lookup(positions, query.dtype), query, key)


@dataclass(frozen=True)
class RopeTable:
    """One step's rotary inputs: ``cos``/``sin`` [T, 1, D] of each row's
    position in the activation dtype, and the fp32 tables they came from
    (for kernels that rotate and store in one pass)."""

    positions: torch.Tensor  # [T] int64
    cos: torch.Tensor
    sin: torch.Tensor
    cos_cache: torch.Tensor  # [max_positions, D] fp32
    sin_cache: torch.Tensor


def apply_rotary(table: RopeTable, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``query``/``key`` by a ``RotaryEmbedding.lookup`` table (HF's math, op for op)."""
    cos, sin = table.cos, table.sin
    return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
