"""store_kv (reshape-and-cache): scatter new K/V rows into the paged KV cache.

Cache layout (DESIGN.md section 3), block-major:
    kv_cache[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
``slot_mapping[t] = block_id * block_size + offset`` for token row ``t``;
a negative slot is padding and is skipped.
"""
from __future__ import annotations

import torch


def store_kv_reference(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    layer: int,
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    """Torch reference (and the CPU engine path): write K/V rows in place."""
    block_size = kv_cache.shape[3]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    block_ids = torch.div(slot_mapping, block_size, rounding_mode="floor")
    offsets = slot_mapping - block_ids * block_size
    kv_cache[block_ids, layer, 0, offsets] = key.to(kv_cache.dtype)
    kv_cache[block_ids, layer, 1, offsets] = value.to(kv_cache.dtype)
