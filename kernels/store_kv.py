"""store_kv (reshape-and-cache): scatter new K/V rows into the paged KV cache.

Cache layout (DESIGN.md section 3), block-major:
    kv_cache[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
``slot_mapping[t] = block_id * block_size + offset`` for token row ``t``;
a negative slot is padding and is skipped.
"""
from __future__ import annotations

import torch

from splitserve.kernels._triton import (
    FLOAT_DTYPES,
    check_device,
    check_index,
    check_kv_cache,
    jit,
    next_power_of_2,
    require_triton,
    tl,
)

SUPPORTED_BLOCK_SIZES = (16, 32)


@jit
def _store_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    cache_ptr,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens]
    layer_offset,  # layer * cache.stride(1), in elements
    num_blocks,
    stride_kt, stride_kh,  # key strides (head_dim stride is 1)
    stride_vt, stride_vh,
    stride_cb, stride_ckv, stride_ct, stride_ch,  # cache: block, K/V, token, head
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    block = slot // BLOCK_SIZE
    # Out-of-pool slots are dropped rather than written past the cache: checking
    # them on the host would cost a device sync per layer.
    if (slot < 0) | (block >= num_blocks):
        return
    offset = slot % BLOCK_SIZE

    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, DIM_PAD)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    key = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    value = tl.load(value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)

    dst = cache_ptr + block * stride_cb + layer_offset + offset * stride_ct + heads[:, None] * stride_ch + dims[None, :]
    tl.store(dst, key.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, value.to(cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    layer: int,
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    """Triton ``store_kv_reference``: write row ``t`` of key/value into slot ``slot_mapping[t]``.

    Contract: ``key``/``value`` share the cache's dtype (fp16/bf16/fp32), may be
    strided over tokens and heads (e.g. slices of a fused QKV output) but must be
    contiguous in ``head_dim``; ``kv_cache`` is contiguous in ``head_dim`` and
    reached for ``layer`` through its strides; ``slot_mapping`` is int32/int64
    with negative entries for padding rows (skipped). All tensors on one GPU
    (CPU only under ``TRITON_INTERPRET=1``). Slots past the pool are dropped
    like padding instead of being checked on the host (a sync per layer).
    Raises ``ValueError``/``TypeError`` before launching on bad input.
    """
    require_triton()
    check_kv_cache(kv_cache, layer, SUPPORTED_BLOCK_SIZES)
    _, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    for name, t in (("key", key), ("value", value)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.dtype != kv_cache.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match kv_cache dtype {kv_cache.dtype}")
        if t.dim() != 3 or tuple(t.shape[1:]) != (num_kv_heads, head_dim):
            raise ValueError(
                f"{name} must be [num_tokens, {num_kv_heads}, {head_dim}] to match kv_cache, "
                f"got {tuple(t.shape)}"
            )
        if t.numel() > 0 and t.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim, got strides {t.stride()}")
    if key.shape[0] != value.shape[0]:
        raise ValueError(f"key has {key.shape[0]} rows but value has {value.shape[0]}")
    check_index("slot_mapping", slot_mapping, 1)
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {key.shape[0]} key rows")
    for name, t in (("key", key), ("value", value), ("slot_mapping", slot_mapping), ("kv_cache", kv_cache)):
        check_device(name, t, kv_cache.device)
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping,
        layer * kv_cache.stride(1),
        kv_cache.shape[0],
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        HEADS_PAD=next_power_of_2(num_kv_heads),
        DIM_PAD=next_power_of_2(head_dim),
    )


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
