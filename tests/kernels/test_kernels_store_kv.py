"""Triton store_kv against the torch reference (under TRITON_INTERPRET=1 on CPU)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from paged_batch import TOLERANCE, kernel_device, make_batch  # noqa: E402

from splitserve.kernels.paged_attention import paged_attention, paged_attention_reference  # noqa: E402
from splitserve.kernels.store_kv import store_kv, store_kv_reference  # noqa: E402


def _inputs(dtype: torch.dtype, num_kv_heads: int, head_dim: int, block_size: int, num_tokens: int = 24):
    gen = torch.Generator().manual_seed(0)
    device = kernel_device()
    cache = torch.randn(7, 3, 2, block_size, num_kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    slots = torch.randperm(7 * block_size, generator=gen)[:num_tokens]
    slots[::5] = -1  # padding rows
    return key, value, cache, slots.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads, head_dim, block_size", [(2, 64, 16), (1, 128, 32), (3, 80, 16)])
def test_matches_reference_and_skips_padding(dtype, num_kv_heads, head_dim, block_size) -> None:
    key, value, cache, slots = _inputs(dtype, num_kv_heads, head_dim, block_size)
    expected = cache.clone()
    store_kv_reference(key, value, expected, 1, slots)
    store_kv(key, value, cache, 1, slots)
    assert torch.equal(cache, expected)  # other layers and padding slots untouched, written rows exact


def test_strided_key_value_from_a_fused_projection() -> None:
    key, value, cache, slots = _inputs(torch.float16, 2, 64, 16)
    fused = torch.cat([key, value], dim=1)  # [tokens, 2 * kv_heads, head_dim]
    expected = cache.clone()
    store_kv_reference(key, value, expected, 2, slots.to(torch.int32))
    store_kv(fused[:, :2], fused[:, 2:], cache, 2, slots.to(torch.int32))
    assert torch.equal(cache, expected)


def test_slots_past_the_pool_are_dropped() -> None:
    key, value, cache, slots = _inputs(torch.float32, 2, 64, 16, num_tokens=4)
    before = cache.clone()
    store_kv(key, value, cache, 0, torch.full_like(slots, 7 * 16))
    assert torch.equal(cache, before)


def test_store_then_attend_round_trip() -> None:
    batch = make_batch([6, 1], [6, 21], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16)
    # Overwrite each sequence's newest tokens through store_kv, then attend over them.
    slots = []
    for s, (q_len, seq_len) in enumerate([(6, 6), (1, 21)]):
        for pos in range(seq_len - q_len, seq_len):
            slots.append(int(batch.block_tables[s, pos // 16]) * 16 + pos % 16)
    slots_t = torch.tensor(slots, device=batch.query.device)
    key = torch.randn(len(slots), 2, 64).to(batch.query)
    value = torch.randn(len(slots), 2, 64).to(batch.query)
    store_kv(key, value, batch.kv_cache, batch.layer, slots_t)
    expected = paged_attention_reference(*batch.args())
    torch.testing.assert_close(paged_attention(*batch.args()), expected, atol=TOLERANCE[torch.float16], rtol=TOLERANCE[torch.float16])
    assert torch.equal(batch.kv_cache[slots_t // 16, batch.layer, 0, slots_t % 16], key)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda k, v, c, s: (k.half(), v, c, s), TypeError, "key dtype"),
        (lambda k, v, c, s: (k, v.long(), c, s), TypeError, "value must be float16"),
        (lambda k, v, c, s: (k[:, :1], v[:, :1], c, s), ValueError, "key must be"),
        (lambda k, v, c, s: (k, v[:3], c, s), ValueError, "but value has 3"),
        (lambda k, v, c, s: (k.transpose(1, 2).contiguous().transpose(1, 2), v, c, s), ValueError, "key must be contiguous in head_dim"),
        (lambda k, v, c, s: (k, v, c, s[:3]), ValueError, "slot_mapping has 3 entries"),
        (lambda k, v, c, s: (k, v, c, s.float()), TypeError, "slot_mapping must be int32"),
        (lambda k, v, c, s: (k, v, c[:, :, :, :8], s), ValueError, "block_size 8 unsupported"),
        (lambda k, v, c, s: (k, v, c.transpose(3, 5), s), ValueError, "kv_cache must be contiguous in head_dim"),
    ],
)
def test_bad_input_raises(change, error, match) -> None:
    key, value, cache, slots = change(*_inputs(torch.float32, 2, 64, 16))
    with pytest.raises(error, match=match):
        store_kv(key, value, cache, 0, slots)


def test_layer_out_of_range_raises() -> None:
    key, value, cache, slots = _inputs(torch.float32, 2, 64, 16)
    with pytest.raises(ValueError, match="layer 3 out of range"):
        store_kv(key, value, cache, 3, slots)
