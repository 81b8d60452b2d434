"""Attention backends agree with the kernels' torch reference on one paged cache."""
from __future__ import annotations

import pytest
import torch

from splitserve.engine.attention import (AttentionMetadata, CPUAttentionBackend, TorchAttentionBackend,
                                        sdpa_prefill_is_faster, select_backend)
from splitserve.kernels.paged_attention import paged_attention_reference

BS, LAYERS, KVH, H, D = 8, 2, 2, 4, 16


def _case(q_lens: list[int], seq_lens: list[int], seed: int = 0, bs: int = BS, d: int = D):
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(40, LAYERS, 2, bs, KVH, d, generator=gen)
    perm = torch.randperm(40, generator=gen).tolist()
    width = max(-(-n // bs) for n in seq_lens)
    tables, used = [], 0
    for n in seq_lens:
        nb = -(-n // bs)
        tables.append(perm[used:used + nb] + [0] * (width - nb))
        used += nb
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64), block_tables=torch.tensor(tables, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), query_start_loc=qsl, max_query_len=max(q_lens),
        max_seq_len=max(seq_lens), decode_only=all(q == 1 for q in q_lens))
    query = torch.randn(sum(q_lens), H, d, generator=gen)
    return query, cache, meta


@pytest.mark.parametrize("q_lens, seq_lens", [
    ([1, 1, 1], [1, 17, 40]),  # decode, vectorised path
    ([5, 1, 24, 3], [5, 9, 30, 19]),  # mixed: prefill from scratch, decode, chunk after a cached prefix
])
def test_torch_backend_matches_reference(q_lens: list[int], seq_lens: list[int]) -> None:
    query, cache, meta = _case(q_lens, seq_lens)
    for layer in range(LAYERS):
        expected = paged_attention_reference(query, cache, layer, meta.block_tables, meta.seq_lens,
                                             meta.query_start_loc, 0.25)
        got = TorchAttentionBackend().forward(query, cache, layer, meta, 0.25)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_lens, seq_lens", [
    ([1, 1, 1], [1, 17, 40]),
    ([5, 1, 24, 3], [5, 9, 30, 19]),  # the 24-row chunk goes to SDPA, the rest to the kernel
    ([20, 17, 1], [40, 17, 2]),
    ([40, 1], [90, 3]),  # head_dim 16: the tiled path (or SDPA where the build cannot tile)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fresh_sdpa", [False, True])
def test_cpu_backend_matches_reference(q_lens: list[int], seq_lens: list[int], dtype: torch.dtype,
                                       fresh_sdpa: bool) -> None:
    backend = select_backend("cpu", torch.device("cpu"), D, BS, dtype)
    assert isinstance(backend, CPUAttentionBackend)
    # Both prefill paths on any CPU (the machine's own choice is sdpa_prefill_is_faster's):
    # a chunk that is its whole context (the 17-row one of 17 tokens) goes to SDPA when set.
    backend.fresh_prefill_sdpa = fresh_sdpa
    query, cache, meta = _case(q_lens, seq_lens, seed=3)
    query, cache = query.to(dtype), cache.to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for layer in range(LAYERS):
        expected = paged_attention_reference(query, cache, layer, meta.block_tables, meta.seq_lens,
                                             meta.query_start_loc, 0.25)
        torch.testing.assert_close(backend.forward(query, cache, layer, meta, 0.25), expected, atol=tol, rtol=tol)


def test_sdpa_takes_fresh_prefill_only_in_bf16_with_amx() -> None:
    amx = frozenset({"avx512f", "amx_tile", "amx_bf16"})
    assert sdpa_prefill_is_faster(torch.bfloat16, amx)
    assert not sdpa_prefill_is_faster(torch.float32, amx)
    assert not sdpa_prefill_is_faster(torch.bfloat16, frozenset({"avx512f", "avx512_bf16"}))


def test_backend_selection() -> None:
    cpu = torch.device("cpu")
    assert select_backend("auto", cpu, 64, 16).name == "cpu"
    assert select_backend("auto", cpu, 64, 16, torch.float16).name == "torch"  # the C kernel: fp32/bf16
    assert select_backend("torch", cpu, 16, 8).name == "torch"
    with pytest.raises(ValueError, match="float16"):
        select_backend("cpu", cpu, 64, 16, torch.float16)
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_backend("flash", cpu, 64, 16)
    with pytest.raises(ValueError, match="head_dim"):
        select_backend("triton", cpu, 16, 16)
    with pytest.raises(ValueError, match="block-size"):
        select_backend("triton", cpu, 64, 8)


def test_triton_backend_matches_torch_under_interpreter() -> None:
    pytest.importorskip("triton")
    try:
        backend = select_backend("triton", torch.device("cpu"), 64, 16)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    query, cache, meta = _case([3, 1, 6], [3, 12, 40], seed=1, bs=16, d=64)  # shapes the kernels take
    expected = TorchAttentionBackend().forward(query, cache, 1, meta, 0.25)
    torch.testing.assert_close(backend.forward(query, cache, 1, meta, 0.25), expected, atol=1e-4, rtol=1e-4)
    key = torch.randn(2, 5, KVH, 64)
    slots = torch.tensor([0, 9, 17, 33, 70])
    a, b = cache.clone(), cache.clone()
    step = AttentionMetadata(slots, meta.block_tables, meta.seq_lens, meta.query_start_loc, 1, 40, False)
    backend.store_kv(key[0], key[1], a, 1, step)
    TorchAttentionBackend().store_kv(key[0], key[1], b, 1, step)
    assert torch.equal(a, b)


def test_without_a_compiler_auto_falls_back_to_torch(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CC", "splitserve-no-such-compiler")
    monkeypatch.setenv("SPLITSERVE_CACHE_DIR", str(tmp_path))  # no build cached there
    cpu = torch.device("cpu")
    assert select_backend("auto", cpu, 64, 16).name == "torch"
    with pytest.raises(ValueError, match="C compiler"):
        select_backend("cpu", cpu, 64, 16)
