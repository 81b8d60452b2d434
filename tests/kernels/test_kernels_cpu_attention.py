"""The C paged-attention kernel (splitserve.kernels.cpu_attention) against the torch reference.

Every test runs once per build this CPU runs (``cpu_levels``: native,
x86-64-v4 with AVX-512, x86-64-v3 with AVX2 + FMA, x86-64-v2 generic C), each
build loaded by forcing its level. Covers each build's vector path (head_dim a
multiple of its width) and the generic loops (other head dims), fp32 and bf16
caches, GQA groups, decode rows and prefill chunks after a cached prefix, the
tiled prefill path where the build must have it, and the refusals.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from cpu_levels import expected_can_tile, expected_simd
from paged_batch import TOLERANCE, make_batch
from splitserve.kernels.cpu_attention import CPUPagedAttention
from splitserve.kernels.cpu_library import build_library
from splitserve.kernels.paged_attention import paged_attention_reference

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")


@pytest.fixture(scope="module")
def kernel(cpu_level, cpu_level_dir) -> CPUPagedAttention:
    built = CPUPagedAttention.load(cpu_level_dir, level=cpu_level)
    assert built is not None, "the CPU attention kernel did not build"
    return built


def test_each_build_has_its_vector_path(kernel, cpu_level) -> None:
    """A build that lost its intrinsics (wrong -march, a broken #if) fails here, not silently slower."""
    assert kernel.level == cpu_level
    assert kernel.simd == expected_simd(cpu_level)
    assert kernel.can_tile(64, 16) is (kernel.simd != "generic")
    assert kernel.can_tile(24, 16) is (kernel.simd == "avx2")  # a multiple of 8, not of 16


def _run(kernel: CPUPagedAttention, batch, max_rows_per_seq: int | None = None,
         fill: float = 0.0) -> torch.Tensor:
    out = torch.full(batch.query.shape, fill, dtype=batch.query.dtype)
    return kernel.forward(batch.query.cpu(), batch.kv_cache.cpu(), batch.layer, batch.block_tables.cpu(),
                          batch.seq_lens.cpu(), batch.query_start_loc.cpu(), batch.scale,
                          int(batch.seq_lens.max()), out, max_rows_per_seq=max_rows_per_seq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 32, 24])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("block_size", [8, 16])
def test_matches_reference(kernel, dtype, head_dim, heads, block_size) -> None:
    num_heads, num_kv_heads = heads
    # Decode rows at block edges, a prefill from scratch, a chunk after a cached prefix.
    q_lens, seq_lens = [1, 1, 1, 9, 5], [1, block_size, 3 * block_size + 1, 9, 40]
    batch = make_batch(q_lens, seq_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       block_size=block_size, dtype=dtype, seed=head_dim + block_size)
    got = _run(kernel, batch)
    expected = paged_attention_reference(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in batch.args()))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_long_sequences_are_left_to_the_caller(kernel) -> None:
    batch = make_batch([1, 20, 1], [30, 20, 7], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32)
    got = _run(kernel, batch, max_rows_per_seq=16, fill=7.0)
    expected = paged_attention_reference(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in batch.args()))
    assert torch.all(got[1:21] == 7.0)  # the 20-row chunk: untouched
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[21], expected[21], atol=1e-5, rtol=1e-5)


def test_refusals(kernel) -> None:
    batch = make_batch([1, 1], [5, 20], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32)
    batch.block_tables[1, 1] = 10_000  # a block past the cache
    with pytest.raises(ValueError, match="block table"):
        _run(kernel, batch)
    half = batch.query.half()
    with pytest.raises(ValueError, match="supports"):
        kernel.forward(half, batch.kv_cache, 1, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                       0.1, 20, torch.empty_like(half))
    with pytest.raises(ValueError, match="int32"):
        kernel.forward(batch.query, batch.kv_cache, 1, batch.block_tables.long(), batch.seq_lens,
                       batch.query_start_loc, 0.1, 20, torch.empty_like(batch.query))
    with pytest.raises(ValueError, match="max_seq_len"):  # a context longer than the bound given
        kernel.forward(batch.query, batch.kv_cache, 1, batch.block_tables, batch.seq_lens,
                       batch.query_start_loc, 0.1, 10, torch.empty_like(batch.query))


def test_build_is_cached_per_source(tmp_path) -> None:
    first = build_library(tmp_path)
    assert first.exists() and build_library(tmp_path) == first
    assert len(list((tmp_path / "cpu-kernels").iterdir())) == 1  # no temp files left


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 32, 24])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_tiled_matches_reference(kernel, dtype, head_dim, heads, block_size) -> None:
    tiles = expected_can_tile(kernel.simd, head_dim, block_size)
    assert kernel.can_tile(head_dim, block_size) is tiles
    num_heads, num_kv_heads = heads
    # Prefill from scratch (more than one 64-row tile), a chunk after a cached
    # prefix that starts mid-block, a short chunk, and a decode row left alone.
    q_lens, seq_lens = [70, 21, 5, 1], [70, 3 * block_size + 30, 5, 9]
    batch = make_batch(q_lens, seq_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       block_size=block_size, dtype=dtype, seed=head_dim * block_size)
    out = torch.full(batch.query.shape, 7.0, dtype=dtype)
    if not tiles:
        with pytest.raises(ValueError, match="cannot tile"):
            kernel.forward_tiled(batch.query, batch.kv_cache, batch.layer, batch.block_tables, batch.seq_lens,
                                 batch.query_start_loc, batch.scale, out, min_rows=2)
        return
    got = kernel.forward_tiled(batch.query, batch.kv_cache, batch.layer, batch.block_tables, batch.seq_lens,
                               batch.query_start_loc, batch.scale, out, min_rows=2)
    expected = paged_attention_reference(*batch.args())
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got[:-1], expected[:-1], atol=tol, rtol=tol)
    assert torch.all(got[-1] == 7.0)  # one row: below min_rows, untouched


def test_tiled_refuses_shapes_it_cannot_take(kernel) -> None:
    batch = make_batch([20], [20], num_heads=4, num_kv_heads=2, head_dim=20, block_size=16, dtype=torch.float32)
    assert not kernel.can_tile(20, 16) and not kernel.can_tile(64, 12) and not kernel.can_tile(272, 16)
    with pytest.raises(ValueError, match="cannot tile"):
        kernel.forward_tiled(batch.query, batch.kv_cache, batch.layer, batch.block_tables, batch.seq_lens,
                             batch.query_start_loc, batch.scale, torch.empty_like(batch.query))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spread", [30.0, 300.0])
def test_large_logit_ranges(kernel, dtype, spread) -> None:
    """Scores hundreds apart: exp's arguments reach far below -87.3, where the
    vector exp clamps (its 2^n would wrap) and gives ~1e-38 for what must be
    ~0; the causal mask's lanes must still add nothing. Decode rows and tiled
    prefill chunks, against the reference."""
    head_dim, block_size = 64, 16
    batch = make_batch([1, 1, 40, 70], [9, 3 * block_size + 1, 3 * block_size + 40, 70], num_heads=8,
                       num_kv_heads=2, head_dim=head_dim, block_size=block_size, dtype=torch.float32, seed=5)
    batch.query = (batch.query * spread).to(dtype)
    batch.kv_cache = batch.kv_cache.to(dtype)
    expected = paged_attention_reference(*batch.args())
    tol = TOLERANCE[dtype]
    got = _run(kernel, batch, max_rows_per_seq=1)  # the decode rows; the chunks left at 0
    torch.testing.assert_close(got[:2], expected[:2], atol=tol, rtol=tol)
    if kernel.can_tile(head_dim, block_size):
        out = torch.zeros(batch.query.shape, dtype=dtype)
        got = kernel.forward_tiled(batch.query, batch.kv_cache, batch.layer, batch.block_tables, batch.seq_lens,
                                   batch.query_start_loc, batch.scale, out, min_rows=2)
        assert torch.isfinite(got[2:].float()).all()
        torch.testing.assert_close(got[2:], expected[2:], atol=tol, rtol=tol)
