"""The KV cache's memory layout, as seen by the transfer layer."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

# Axis order of the cache tensor. A peer with a different order would need a
# gather per layer, which this protocol does not do, so it is a compat field.
BLOCK_MAJOR = "blocks,layers,kv,tokens,heads,dim"

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass(frozen=True)
class KVCacheLayout:
    """Shape of a block-major KV cache:
    ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``.

    One block is one contiguous region of ``block_bytes``, so runs of
    consecutive block ids are one transfer descriptor. ``num_blocks`` may
    differ between peers; every other field must match.
    """

    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    order: str = BLOCK_MAJOR

    def __post_init__(self) -> None:
        for name in ("num_blocks", "num_layers", "block_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KVCacheLayout.{name} must be a positive int, got {value!r}")
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(
                f"KVCacheLayout.dtype must be one of {', '.join(_DTYPE_BYTES)}, got {self.dtype!r}"
            )

    @property
    def element_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block: all layers' K and V for ``block_size`` tokens."""
        return (
            self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim
            * self.element_bytes
        )

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @classmethod
    def from_tensor(cls, kv_cache: torch.Tensor) -> KVCacheLayout:
        """Describe an engine's cache tensor; raises ``ValueError`` if it is not
        a contiguous 6-d block-major cache with a supported dtype."""
        if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
            raise ValueError(
                "KV cache must be [num_blocks, num_layers, 2, block_size, num_kv_heads, "
                f"head_dim], got shape {tuple(kv_cache.shape)}"
            )
        if not kv_cache.is_contiguous():
            raise ValueError("KV cache tensor must be contiguous (one region, registered once)")
        dtype = str(kv_cache.dtype).removeprefix("torch.")
        num_blocks, num_layers, _, block_size, num_kv_heads, head_dim = (int(s) for s in kv_cache.shape)
        return cls(num_blocks, num_layers, block_size, num_kv_heads, head_dim, dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVCacheLayout:
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"bad KV cache layout {data!r}: {exc}") from None
