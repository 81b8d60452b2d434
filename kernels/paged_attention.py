"""Paged attention over the block-major KV cache: varlen prefill and decode.

One call serves a flattened batch of sequences. Sequence ``s`` owns query rows
``query_start_loc[s]:query_start_loc[s+1]`` (``q_len`` rows, the newest tokens)
and has ``seq_lens[s]`` tokens of context in total, *including* those rows,
whose KV has already been stored. Query row ``i`` sits at absolute position
``seq_lens[s] - q_len + i`` and attends causally to keys ``0..that position``:
decode is ``q_len == 1``; prefill with a cached prefix is ``q_len < seq_len``.
GQA/MQA: query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``.

Kernels (Triton): one tile step shared by two drivers.
- prefill (any batch, causal, cached prefix included): a program owns a tile of
  query rows of one sequence for all query heads of one KV head, so each K/V
  tile is loaded once per GQA group; KV tiles wholly below the diagonal skip the
  causal mask.
- decode (every sequence has one query row): a program owns one sequence, one
  KV head (its query heads stacked as tile rows) and one split of the context;
  with several splits each writes a partial (max, sum, acc) and a reduce kernel
  merges them. Softmax runs in base 2 in fp32 throughout.
"""
from __future__ import annotations

import torch

from splitserve.kernels._triton import (
    FLOAT_DTYPES,
    cdiv,
    check_device,
    check_index,
    check_kv_cache,
    interpreting,
    jit,
    next_power_of_2,
    require_triton,
    tl,
)

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128)
SUPPORTED_BLOCK_SIZES = (16, 32)
_LOG2E = 1.4426950408889634
# Fewer tokens than this per decode split and the reduce costs more than it saves.
_MIN_TOKENS_PER_SPLIT = 256
_MAX_SPLITS = 32


@jit
def _attend_tile(
    acc, m_i, l_i,  # running [ROWS, DIM_PAD] output, [ROWS] max (log2 units), [ROWS] sum; fp32
    q,  # [ROWS, DIM_PAD]
    kv_ptr,  # cache pointer already at (layer, K, kv head)
    block_table_ptr,  # this sequence's block table row
    start, kv_end,  # key positions start..start+BLOCK_N, bounded by kv_end
    q_pos,  # [ROWS] absolute query positions (used when CAUSAL)
    dims, dim_mask,  # [DIM_PAD]
    scale_log2,
    stride_cb, stride_ckv, stride_ct,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    k_pos = start + tl.arange(0, BLOCK_N)
    k_mask = k_pos < kv_end
    block_ids = tl.load(block_table_ptr + k_pos // BLOCK_SIZE, mask=k_mask, other=0).to(tl.int64)
    kv_off = block_ids * stride_cb + (k_pos % BLOCK_SIZE).to(tl.int64) * stride_ct
    k = tl.load(kv_ptr + kv_off[None, :] + dims[:, None], mask=dim_mask[:, None] & k_mask[None, :], other=0.0)
    v = tl.load(
        kv_ptr + stride_ckv + kv_off[:, None] + dims[None, :], mask=k_mask[:, None] & dim_mask[None, :], other=0.0
    )
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, k, input_precision=PRECISION) * scale_log2  # [ROWS, BLOCK_N]
    if CAUSAL:
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_mask[None, :]
    else:
        visible = k_mask[None, :]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows that have seen no visible key yet keep m = -inf; subtracting 0 keeps exp2 at 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@jit
def _paged_prefill_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    query_ptr,  # [num_tokens, num_heads, head_dim]
    cache_ptr,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq]
    seq_lens_ptr,  # [num_seqs]
    query_start_loc_ptr,  # [num_seqs + 1]
    scale_log2,  # softmax scale * log2(e)
    layer_offset,  # layer * cache.stride(1), in elements
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_bts,
    stride_cb, stride_ckv, stride_ct, stride_ch,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # tile rows: BLOCK_Q query tokens x GROUP heads
    BLOCK_N: tl.constexpr,  # keys per tile
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2)
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_block * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_mask = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = context_len + q_idx
    dims = tl.arange(0, DIM_PAD)
    dim_mask = dims < HEAD_DIM
    io_mask = row_mask[:, None] & dim_mask[None, :]
    token = (q_start + q_idx).to(tl.int64)
    q_ptrs = query_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptrs, mask=io_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    acc = tl.zeros([BLOCK_M, DIM_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    kv_ptr = cache_ptr + layer_offset + kv_head.to(tl.int64) * stride_ch
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bts
    # Keys up to the tile's first query position are visible to every row: no causal mask there.
    first_pos = context_len + q_block * BLOCK_Q
    full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, kv_ptr, table_ptr, start, kv_end, q_pos, dims, dim_mask, scale_log2,
            stride_cb, stride_ckv, stride_ct, BLOCK_SIZE, BLOCK_N, False, UPCAST, PRECISION,
        )
    for start in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, kv_ptr, table_ptr, start, kv_end, q_pos, dims, dim_mask, scale_log2,
            stride_cb, stride_ckv, stride_ct, BLOCK_SIZE, BLOCK_N, True, UPCAST, PRECISION,
        )
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=io_mask,
    )


@jit
def _paged_decode_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]; written when NUM_SPLITS == 1
    part_acc_ptr,  # [num_seqs, num_heads, NUM_SPLITS, DIM_PAD] fp32, unnormalised
    part_ml_ptr,  # [num_seqs, num_heads, NUM_SPLITS, 2] fp32: running max (log2 units), sum
    query_ptr,  # [num_tokens, num_heads, head_dim]
    cache_ptr,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq]
    seq_lens_ptr,  # [num_seqs]
    query_start_loc_ptr,  # [num_seqs + 1]
    scale_log2,
    layer_offset,
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_bts,
    stride_cb, stride_ckv, stride_ct, stride_ch,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,  # tile rows: the GROUP query heads, padded for tl.dot
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    token = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - token != 1:  # an idle sequence (no query row)
        return
    token = token.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    # Splits cover whole tiles so no tile straddles two programs.
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    kv_start = split * split_len
    kv_end = tl.minimum(kv_start + split_len, seq_len)

    rows = tl.arange(0, BLOCK_H)
    head = kv_head * GROUP + rows
    row_mask = rows < GROUP
    dims = tl.arange(0, DIM_PAD)
    dim_mask = dims < HEAD_DIM
    q = tl.load(
        query_ptr + token * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_H, DIM_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    kv_ptr = cache_ptr + layer_offset + kv_head.to(tl.int64) * stride_ch
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bts
    for start in range(kv_start, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, kv_ptr, table_ptr, start, kv_end, rows, dims, dim_mask, scale_log2,
            stride_cb, stride_ckv, stride_ct, BLOCK_SIZE, BLOCK_N, False, UPCAST, PRECISION,
        )
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + token * stride_ot + head[:, None] * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_mask[:, None] & dim_mask[None, :],
        )
    else:
        part = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + split  # [BLOCK_H]
        tl.store(part_acc_ptr + part[:, None] * DIM_PAD + dims[None, :], acc, mask=row_mask[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_mask)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_mask)


@jit
def _paged_decode_reduce_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    part_acc_ptr,  # [num_seqs, num_heads, NUM_SPLITS, DIM_PAD] fp32
    part_ml_ptr,  # [num_seqs, num_heads, NUM_SPLITS, 2] fp32
    query_start_loc_ptr,  # [num_seqs + 1]
    stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - token != 1:
        return
    token = token.to(tl.int64)
    splits = tl.arange(0, SPLITS_PAD)
    split_mask = splits < NUM_SPLITS
    dims = tl.arange(0, DIM_PAD)
    part = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + splits
    m = tl.load(part_ml_ptr + part * 2, mask=split_mask, other=float("-inf"))
    l = tl.load(part_ml_ptr + part * 2 + 1, mask=split_mask, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * DIM_PAD + dims[None, :], mask=split_mask[:, None], other=0.0)
    # Split 0 always holds the first key, so m_max is finite; empty splits weigh exp2(-inf) = 0.
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - m_max)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    out_ptrs = out_ptr + token * stride_ot + head * stride_oh + dims
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def _check_batch(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
) -> tuple[int, int, int]:
    """Validate the batch's contents with one host sync; return (max_query_len, max_seq_len)."""
    num_blocks, block_size = kv_cache.shape[0], kv_cache.shape[3]
    max_blocks_per_seq = block_tables.shape[1]
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    needed = torch.div(seq_lens + block_size - 1, block_size, rounding_mode="floor")
    used = torch.arange(max_blocks_per_seq, device=block_tables.device)[None, :] < needed[:, None]
    stats = torch.stack(
        [
            q_lens.max(), q_lens.min(), seq_lens.max(), (seq_lens - q_lens).min(),
            query_start_loc[0], query_start_loc[-1],
            torch.where(used, block_tables, -1).max().to(seq_lens.dtype),
            torch.where(used, block_tables, 0).min().to(seq_lens.dtype),
        ]
    ).tolist()
    max_q, min_q, max_seq, min_ctx, first_loc, last_loc, max_block, min_block = (int(x) for x in stats)
    if first_loc < 0 or last_loc > query.shape[0] or min_q < 0:
        raise ValueError(
            f"query_start_loc must be non-decreasing within [0, {query.shape[0]}] (the query rows), "
            f"got first {first_loc}, last {last_loc}, smallest step {min_q}"
        )
    if min_ctx < 0:
        raise ValueError("a sequence has more query rows than seq_lens tokens (q_len must be <= seq_len)")
    if max_seq > max_blocks_per_seq * block_size:
        raise ValueError(
            f"seq_len {max_seq} needs more than the block table's {max_blocks_per_seq} blocks of {block_size}"
        )
    if max_block >= num_blocks or min_block < 0:
        raise ValueError(
            f"block_tables entries in use must lie in [0, {num_blocks}) (the cache's blocks), "
            f"got range [{min_block}, {max_block}]"
        )
    return max_q, max_seq


def _num_splits(device: torch.device, num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
    """Enough decode splits to give every SM about two programs, none shorter than a few hundred keys."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = cdiv(2 * sms, num_seqs * num_kv_heads)
    return max(1, min(wanted, cdiv(max_seq_len, _MIN_TOKENS_PER_SPLIT), _MAX_SPLITS))


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    layer: int,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    *,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    num_splits: int | None = None,
    validate: bool = True,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Triton ``paged_attention_reference`` (same arguments, same maths; see the module docstring).

    Contract: ``query`` (fp16/bf16/fp32, the cache's dtype) may be strided over
    tokens and heads but is contiguous in ``head_dim``; ``head_dim`` in
    ``SUPPORTED_HEAD_DIMS``, ``block_size`` in ``SUPPORTED_BLOCK_SIZES``;
    ``num_heads`` a multiple of ``num_kv_heads``; the index tensors int32/int64
    and contiguous in their last dim; every block-table entry covering
    ``seq_lens[s]`` tokens inside the pool. When every sequence has exactly one
    query row (or none) the split-KV decode kernels run (``num_splits``
    partitions per sequence, chosen from the SM count when ``None``), otherwise
    the prefill kernel. The result goes to ``out`` when given (rows no
    sequence owns are left untouched) and is returned. Inputs live on one GPU,
    or on the CPU under ``TRITON_INTERPRET=1``. Bad input raises
    ``ValueError``/``TypeError`` before any kernel runs.

    The checks of the index tensors' contents cost one host sync. A caller
    that builds the batch itself (the engine, once per step for every layer)
    may pass ``validate=False`` with ``max_query_len`` and ``max_seq_len``
    (upper bounds over the batch, known on the host) to launch with no sync;
    shapes, dtypes and devices are still checked.
    """
    require_triton()
    check_kv_cache(kv_cache, layer, SUPPORTED_BLOCK_SIZES)
    _, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    if query.dtype not in FLOAT_DTYPES:
        raise TypeError(f"query must be float16, bfloat16 or float32, got {query.dtype}")
    if query.dtype != kv_cache.dtype:
        raise TypeError(f"query dtype {query.dtype} does not match kv_cache dtype {kv_cache.dtype}")
    if query.dim() != 3 or query.shape[2] != head_dim:
        raise ValueError(f"query must be [num_tokens, num_heads, {head_dim}], got {tuple(query.shape)}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} unsupported; supported: {SUPPORTED_HEAD_DIMS}")
    num_tokens, num_heads = query.shape[0], query.shape[1]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if query.stride(2) != 1:
        raise ValueError(f"query must be contiguous in head_dim, got strides {query.stride()}")
    check_index("block_tables", block_tables, 2)
    check_index("seq_lens", seq_lens, 1)
    check_index("query_start_loc", query_start_loc, 1)
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(
            f"query_start_loc needs len(seq_lens) + 1 = {num_seqs + 1} entries, got {query_start_loc.shape[0]}"
        )
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences")
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.dtype != query.dtype or out.stride(2) != 1:
        raise ValueError(
            f"out must match query ({tuple(query.shape)}, {query.dtype}) and be contiguous in head_dim, "
            f"got {tuple(out.shape)}, {out.dtype}, strides {out.stride()}"
        )
    if num_splits is not None and not 1 <= num_splits <= 256:
        raise ValueError(f"num_splits must be in [1, 256], got {num_splits}")
    for name, t in (
        ("query", query), ("kv_cache", kv_cache), ("block_tables", block_tables),
        ("seq_lens", seq_lens), ("query_start_loc", query_start_loc), ("out", out),
    ):
        check_device(name, t, query.device)
    if num_seqs == 0 or num_tokens == 0:
        return out
    if validate:
        max_query_len, max_seq_len = _check_batch(query, kv_cache, block_tables, seq_lens, query_start_loc)
    elif max_query_len is None or max_seq_len is None:
        q_lens = query_start_loc[1:] - query_start_loc[:-1]
        max_query_len, max_seq_len = (int(x) for x in torch.stack([q_lens.max(), seq_lens.max()]).tolist())
    if max_query_len <= 0:
        return out

    group = num_heads // num_kv_heads
    dim_pad = next_power_of_2(head_dim)
    # The interpreter's tl.dot mishandles bf16 operands; it upcasts them to fp32 instead.
    upcast = interpreting() and query.dtype == torch.bfloat16
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    common = (
        scale * _LOG2E, layer * kv_cache.stride(1),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
    )
    small = query.dtype == torch.float32 or head_dim > 64
    if max_query_len == 1:
        splits = num_splits or _num_splits(query.device, num_seqs, num_kv_heads, max_seq_len)
        block_n = 32 if small else 64
        part_acc = part_ml = out  # unused placeholders when there is a single split
        if splits > 1:
            part_acc = torch.empty((num_seqs, num_heads, splits, dim_pad), dtype=torch.float32, device=query.device)
            part_ml = torch.empty((num_seqs, num_heads, splits, 2), dtype=torch.float32, device=query.device)
        _paged_decode_kernel[(num_seqs, num_kv_heads, splits)](
            out, part_acc, part_ml, query, kv_cache, block_tables, seq_lens, query_start_loc, *common,
            NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, DIM_PAD=dim_pad, BLOCK_SIZE=block_size,
            BLOCK_H=max(16, next_power_of_2(group)), BLOCK_N=block_n, NUM_SPLITS=splits,
            UPCAST=upcast, PRECISION=precision, num_warps=4,
        )
        if splits > 1:
            _paged_decode_reduce_kernel[(num_seqs, num_heads)](
                out, part_acc, part_ml, query_start_loc, out.stride(0), out.stride(1),
                NUM_HEADS=num_heads, HEAD_DIM=head_dim, DIM_PAD=dim_pad,
                NUM_SPLITS=splits, SPLITS_PAD=next_power_of_2(splits), num_warps=4,
            )
        return out

    # Tile rows fit the longest query so decode rows in a mixed batch don't pay for 128-row tiles.
    block_m = min(max(16, next_power_of_2(max_query_len * group)), 64 if small else 128)
    block_m = max(block_m, next_power_of_2(group))
    block_q = block_m // group
    _paged_prefill_kernel[(num_seqs, cdiv(max_query_len, block_q), num_kv_heads)](
        out, query, kv_cache, block_tables, seq_lens, query_start_loc, *common,
        GROUP=group, HEAD_DIM=head_dim, DIM_PAD=dim_pad, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=32 if small else 64, UPCAST=upcast, PRECISION=precision,
        num_warps=8 if block_m >= 128 else 4,
    )
    return out


def paged_attention_reference(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    layer: int,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Torch reference of the math, computed in fp32, one sequence at a time."""
    num_heads = query.shape[1]
    block_size, num_kv_heads = kv_cache.shape[3], kv_cache.shape[4]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for s, seq_len in enumerate(lens):
        q_start, q_end = starts[s], starts[s + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = block_tables[s, :num_blocks].long()
        k = kv_cache[blocks, layer, 0].reshape(-1, num_kv_heads, kv_cache.shape[5])[:seq_len]
        v = kv_cache[blocks, layer, 1].reshape(-1, num_kv_heads, kv_cache.shape[5])[:seq_len]
        q = query[q_start:q_end].float().transpose(0, 1)  # [H, q_len, d]
        k = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, seq_len, d]
        v = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [H, q_len, seq_len]
        q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
        k_pos = torch.arange(seq_len).unsqueeze(0)
        scores.masked_fill_(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.matmul(probs, v).transpose(0, 1).to(query.dtype)
    return out
