"""Counter-based randomness: uniforms that are a pure function of (seed, position, token).

The sampler's draw for output token ``i`` of a request must depend only on
``(seed, i)`` (DESIGN.md section 3), whatever else shares the batch, on any
device and any pod. So there is no generator state: each uniform is a 32-bit
integer hash (murmur3's finaliser, chained) of the seed's two halves, the
position and the vocabulary index, computed in int64 tensors. Products are
split into 16-bit halves and masked so no intermediate exceeds 2**49.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for 0 <= x < 2**32, without int64 overflow."""
    lo, hi = constant & _MASK16, constant >> 16
    return (x * lo + (((x * hi) & _MASK16) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit mix (murmur3 fmix32 after a golden-ratio offset)."""
    x = (x + _GOLDEN) & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per (seed, position) pair; both int64 [B], seeds in [0, 2**63)."""
    lo = seeds & _MASK32
    hi = (seeds >> 32) & _MASK32
    key = mix32(lo)
    key = mix32(key ^ hi)
    return mix32(key ^ (positions & _MASK32))


def uniforms(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 uniforms in the open interval (0, 1), shape [B, vocab_size].

    Entry ``[b, v]`` depends only on ``(seeds[b], positions[b], v)``.
    """
    keys = row_keys(seeds, positions)[:, None]
    tokens = mix32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) * 2 + 1)[None, :]
    bits = mix32(keys ^ tokens)
    # 24 high bits are exact in fp32; +0.5 keeps 0 and 1 out.
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise, [B, vocab_size]: argmax(logits + noise) samples softmax(logits)."""
    return -torch.log(-torch.log(uniforms(seeds, positions, vocab_size)))
