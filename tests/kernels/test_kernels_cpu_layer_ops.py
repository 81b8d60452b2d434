"""``rope_store`` (cpu_layer_ops.c) equals the torch ops it replaces, bit for bit, in
every build this CPU runs (``cpu_levels``: an FMA contraction at x86-64-v3 or
v4 would show here as a last-bit difference); the bf16 RMSNorm and SwiGLU equal
theirs but for rare one-ulp differences (another summation order, another exp)."""
from __future__ import annotations

import shutil

import pytest
import torch

from splitserve.engine.model_config import RopeConfig
from splitserve.engine.models.rotary import RotaryEmbedding, apply_rotary
from splitserve.kernels.cpu_layer_ops import CPULayerOps
from splitserve.kernels.store_kv import store_kv_reference

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")


@pytest.fixture(scope="module")
def ops(cpu_level, cpu_level_dir) -> CPULayerOps:
    built = CPULayerOps.load(cpu_level_dir, level=cpu_level)
    assert built is not None, "the CPU layer ops did not build"
    return built


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, head_dim", [((8, 4), 64), ((4, 1), 32), ((6, 2), 24)])
def test_rope_store_equals_torch(ops, dtype, heads, head_dim) -> None:
    num_heads, num_kv_heads = heads
    num_blocks, num_layers, block_size, layer = 12, 3, 8, 2
    gen = torch.Generator().manual_seed(head_dim)
    rotary = RotaryEmbedding(RopeConfig(theta=500000.0), head_dim, 256)
    tokens = 13
    qkv = (torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen) * 3).to(dtype)
    positions = torch.randint(0, 256, (tokens,), generator=gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    cache = torch.randn(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)

    expected_cache = cache.clone()
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    table = rotary.lookup(positions, dtype)
    q_ref, k_ref = apply_rotary(table, q.view(tokens, num_heads, head_dim), k.view(tokens, num_kv_heads, head_dim))
    store_kv_reference(k_ref, v.view(tokens, num_kv_heads, head_dim), expected_cache, layer, slots)

    rows = (slots // block_size) * (num_layers * 2 * block_size) + slots % block_size
    got = ops.rope_store(qkv, num_heads, num_kv_heads, rotary.cos_cache, rotary.sin_cache, positions, cache,
                         rows, layer)
    assert torch.equal(got, q_ref)
    assert torch.equal(cache, expected_cache)


def test_rope_store_refuses_bad_input(ops) -> None:
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), 16, 32)
    cache = torch.zeros(2, 1, 2, 4, 1, 16)
    qkv = torch.zeros(1, 3 * 16)
    with pytest.raises(ValueError, match="outside"):
        ops.rope_store(qkv, 1, 1, rotary.cos_cache, rotary.sin_cache, torch.tensor([40]), cache,
                       torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="outside"):
        ops.rope_store(qkv, 1, 1, rotary.cos_cache, rotary.sin_cache, torch.tensor([1]), cache,
                       torch.tensor([100]), 0)
    with pytest.raises(ValueError, match="same dtype"):
        ops.rope_store(qkv, 1, 1, rotary.cos_cache, rotary.sin_cache, torch.tensor([1]), cache.bfloat16(),
                       torch.tensor([0]), 0)


@pytest.mark.parametrize("vocab", [1, 7, 16, 33, 32000])
def test_argmax_equals_torch(ops, vocab) -> None:
    """The greedy pick equals ``torch.argmax``: first index on ties (-0.0 and
    0.0 tie), the first NaN where a row has one, infinities, strided rows."""
    gen = torch.Generator().manual_seed(vocab)
    rows = [torch.randn(vocab, generator=gen) for _ in range(6)]
    rows[1] = rows[1].round()  # many ties
    rows[2][vocab // 2] = float("nan")
    rows[2][-1] = float("nan")
    rows[3][:] = float("-inf")
    rows[4][vocab // 3] = float("inf")
    rows[4][-1] = float("inf")
    rows[5][:] = 0.0
    rows[5][-1] = -0.0
    x = torch.stack(rows)
    assert torch.equal(ops.argmax(x), x.argmax(dim=-1))
    assert torch.equal(ops.argmax(x[:1]), x[:1].argmax(dim=-1))  # one row: no thread team
    wide = torch.randn(3, 2 * vocab, generator=gen)[:, :vocab]  # rows further apart than their length
    assert torch.equal(ops.argmax(wide), wide.argmax(dim=-1))
    with pytest.raises(ValueError, match="fp32"):
        ops.argmax(x.to(torch.bfloat16))


def _bf16_ulps(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|difference| in units of the last place of bf16, per element."""
    a, b = got.view(torch.int16).int(), expected.view(torch.int16).int()
    return (a - b).abs()


@pytest.mark.parametrize("rows, hidden, stride_pad", [(1, 512, 0), (37, 512, 0), (16, 100, 12), (300, 64, 0)])
def test_rms_norm_equals_torch_within_one_ulp(ops, rows, hidden, stride_pad) -> None:
    gen = torch.Generator().manual_seed(rows + hidden)
    base = (torch.randn(rows, hidden + stride_pad, generator=gen) * 4).to(torch.bfloat16)
    x = base[:, :hidden]  # rows with a stride wider than the row, as a slice of a wider tensor
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(torch.bfloat16)
    x32 = x.float()
    expected = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    got = ops.rms_norm(x, weight, 1e-5)
    ulps = _bf16_ulps(got, expected)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    assert ulps.max().item() <= 1 and (ulps > 0).float().mean().item() < 0.01


@pytest.mark.parametrize("rows, inter", [(1, 1408), (64, 1408), (7, 100), (2048, 64)])
def test_silu_mul_equals_torch_within_an_ulp_or_two(ops, rows, inter) -> None:
    gen = torch.Generator().manual_seed(rows * inter)
    gate_up = (torch.randn(rows, 2 * inter, generator=gen) * 6).to(torch.bfloat16)
    gate, up = gate_up.split(inter, dim=-1)
    expected = torch.nn.functional.silu(gate).mul_(up)
    got = ops.silu_mul(gate_up)
    ulps = _bf16_ulps(got, expected)
    # Two ulps only where the rounded activation flipped (see splitserve_silu_mul).
    assert got.shape == (rows, inter) and ulps.max().item() <= 2 and (ulps > 0).float().mean().item() < 0.01


def test_norm_and_swiglu_refuse_what_they_do_not_take(ops) -> None:
    weight = torch.ones(8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16"):
        ops.rms_norm(torch.ones(2, 8), weight, 1e-5)
    with pytest.raises(ValueError, match="bf16"):
        ops.rms_norm(torch.ones(2, 9, dtype=torch.bfloat16), weight, 1e-5)
    with pytest.raises(ValueError, match="silu_mul"):
        ops.silu_mul(torch.ones(2, 7, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="silu_mul"):
        ops.silu_mul(torch.ones(2, 8))
