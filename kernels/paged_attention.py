"""Paged attention over the block-major KV cache: varlen prefill and decode.

One call serves a flattened batch of sequences. Sequence ``s`` owns query rows
``query_start_loc[s]:query_start_loc[s+1]`` (``q_len`` rows, the newest tokens)
and has ``seq_lens[s]`` tokens of context in total, *including* those rows,
whose KV has already been stored. Query row ``i`` sits at absolute position
``seq_lens[s] - q_len + i`` and attends causally to keys ``0..that position``:
decode is ``q_len == 1``; prefill with a cached prefix is ``q_len < seq_len``.
GQA/MQA: query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``.
"""
from __future__ import annotations

import torch


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
