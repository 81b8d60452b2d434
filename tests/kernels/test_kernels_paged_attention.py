"""Triton paged attention against the torch reference (under TRITON_INTERPRET=1 on CPU).

The interpreter runs the kernels' maths, masking and indexing, not the GPU's
codegen: bf16 tl.dot operands are upcast to fp32 there (its dot mishandles
bf16), and fp32 dots run in IEEE, not TF32. Speed is bench/attention_kernels.py's job.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from paged_batch import TOLERANCE, make_batch, kernel_device  # noqa: E402

from splitserve.kernels.paged_attention import paged_attention, paged_attention_reference  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (num_heads, num_kv_heads, head_dim, block_size): MHA, GQA 2 and 4, MQA; head dims 64/128 and padded 80/96.
SHAPES = [
    pytest.param(4, 4, 64, 16, id="mha-d64-bs16"),
    pytest.param(4, 2, 128, 32, id="gqa2-d128-bs32"),
    pytest.param(8, 2, 80, 16, id="gqa4-d80-bs16"),
    pytest.param(4, 1, 96, 32, id="mqa-d96-bs32"),
]


def _assert_matches(batch, out: torch.Tensor) -> None:
    expected = paged_attention_reference(*batch.args())
    assert out.dtype == batch.query.dtype
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[out.dtype], rtol=TOLERANCE[out.dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size", SHAPES)
def test_prefill_ragged_with_prefix_hits(dtype, num_heads, num_kv_heads, head_dim, block_size) -> None:
    # Fresh prefill, prefix hits mid-block and on a block edge, a one-row chunk and an idle sequence.
    batch = make_batch(
        [37, 9, 16, 1, 0], [37, 50, 16 + block_size, 70, 12],
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype,
    )
    _assert_matches(batch, paged_attention(*batch.args()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size", SHAPES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_split_kv(dtype, num_heads, num_kv_heads, head_dim, block_size, num_splits) -> None:
    # Short sequences leave some splits empty; the long one spans every split.
    batch = make_batch(
        [1, 1, 1, 1], [1, 17, 200, 64],
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype,
    )
    _assert_matches(batch, paged_attention(*batch.args(), num_splits=num_splits))


@pytest.mark.parametrize("num_splits", [None, 2, 7])
def test_decode_long_context_many_splits(num_splits) -> None:
    batch = make_batch(
        [1, 1], [700, 129], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16, seed=3
    )
    _assert_matches(batch, paged_attention(*batch.args(), num_splits=num_splits))


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_with_an_idle_sequence_and_no_sync(num_splits) -> None:
    batch = make_batch(
        [1, 0, 1], [40, 12, 75], num_heads=4, num_kv_heads=1, head_dim=64, block_size=16, dtype=torch.float32
    )
    out = torch.zeros_like(batch.query)
    paged_attention(*batch.args(), out=out, num_splits=num_splits, validate=False, max_query_len=1, max_seq_len=75)
    _assert_matches(batch, out)


def test_mixed_batch_runs_the_prefill_path() -> None:
    batch = make_batch(
        [1, 40, 1], [90, 40, 33], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32
    )
    _assert_matches(batch, paged_attention(*batch.args()))


def test_writes_into_out_and_reads_a_strided_query() -> None:
    batch = make_batch(
        [5, 1], [20, 30], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16, seed=1
    )
    # The query as a slice of a fused QKV projection: strided over tokens.
    fused = torch.zeros(batch.query.shape[0], 8, 64, dtype=batch.query.dtype, device=batch.query.device)
    fused[:, :4] = batch.query
    batch.query = fused[:, :4]
    out = torch.full_like(batch.query, float("nan"))
    assert paged_attention(*batch.args(), out=out) is out
    _assert_matches(batch, out)


def test_layer_is_selected_through_strides() -> None:
    batch = make_batch(
        [3, 1], [10, 25], num_heads=2, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32, layer=0
    )
    first = paged_attention(*batch.args())
    batch.kv_cache[:, 1] = 0.0  # another layer's data must not matter
    torch.testing.assert_close(paged_attention(*batch.args()), first)
    _assert_matches(batch, first)


def _good(**overrides):
    batch = make_batch(
        [3, 1], [10, 25], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32
    )
    for name, value in overrides.items():
        setattr(batch, name, value(batch) if callable(value) else value)
    return batch


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"query": lambda b: b.query.half()}, TypeError, "does not match kv_cache dtype"),
        ({"query": lambda b: b.query.long(), "kv_cache": lambda b: b.kv_cache.long()}, TypeError, "kv_cache must be"),
        ({"query": lambda b: b.query.transpose(0, 2).contiguous().transpose(0, 2)}, ValueError, "query must be contiguous in head_dim"),
        ({"query": lambda b: b.query[:, :3]}, ValueError, "not a multiple of num_kv_heads"),
        ({"query": lambda b: b.query[..., :32]}, ValueError, r"query must be \[num_tokens"),
        ({"kv_cache": lambda b: b.kv_cache[..., :32].contiguous(), "query": lambda b: b.query[..., :32].contiguous()}, ValueError, "head_dim 32 unsupported"),
        ({"kv_cache": lambda b: b.kv_cache[:, :, :, :8].contiguous()}, ValueError, "block_size 8 unsupported"),
        ({"kv_cache": lambda b: b.kv_cache[0]}, ValueError, "kv_cache must be"),
        ({"layer": 2}, ValueError, "layer 2 out of range"),
        ({"query_start_loc": lambda b: b.query_start_loc[:2]}, ValueError, r"len\(seq_lens\) \+ 1"),
        ({"block_tables": lambda b: b.block_tables[:1]}, ValueError, "block_tables has 1 rows"),
        ({"block_tables": lambda b: b.block_tables.float()}, TypeError, "block_tables must be int32"),
        ({"block_tables": lambda b: b.block_tables.t().contiguous().t()}, ValueError, "block_tables must be contiguous"),
        ({"block_tables": lambda b: b.block_tables.index_fill(1, torch.tensor([0]), b.kv_cache.shape[0])}, ValueError, "block_tables entries in use"),
        ({"block_tables": lambda b: b.block_tables.index_fill(1, torch.tensor([0]), -1)}, ValueError, "block_tables entries in use"),
        ({"seq_lens": lambda b: torch.tensor([2, 25], dtype=torch.int32)}, ValueError, "more query rows than seq_lens"),
        ({"seq_lens": lambda b: torch.tensor([10, 999], dtype=torch.int32)}, ValueError, "needs more than the block table"),
        ({"query_start_loc": lambda b: torch.tensor([0, 3, 9], dtype=torch.int32)}, ValueError, "query_start_loc must be non-decreasing"),
    ],
)
def test_bad_input_raises_before_launch(overrides, error, match) -> None:
    batch = _good(**overrides)
    with pytest.raises(error, match=match):
        paged_attention(*batch.args())


def test_bad_out_raises() -> None:
    batch = _good()
    with pytest.raises(ValueError, match="out must match query"):
        paged_attention(*batch.args(), out=batch.query.half())


@pytest.mark.skipif(kernel_device().type != "cpu", reason="checks the CPU refusal outside the interpreter")
def test_cpu_tensors_refused_outside_the_interpreter(monkeypatch) -> None:
    batch = _good()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CPU tensor"):
        paged_attention(*batch.args())
