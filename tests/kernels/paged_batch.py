"""Random paged batches shared by the kernel tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.kernels._triton import interpreting


def kernel_device() -> torch.device:
    """The GPU when one is usable, else the CPU (kernels then run under TRITON_INTERPRET=1)."""
    if torch.cuda.is_available() and not interpreting():
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class PagedBatch:
    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    layer: int
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    scale: float

    def args(self) -> tuple:
        return (
            self.query, self.kv_cache, self.layer, self.block_tables,
            self.seq_lens, self.query_start_loc, self.scale,
        )


def make_batch(
    q_lens: list[int],
    seq_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    num_layers: int = 2,
    layer: int = 1,
) -> PagedBatch:
    """Sequences on shuffled, non-contiguous blocks of a pool with spare blocks; table padding is garbage."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = 2 * sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(blocks_per_seq) + 2
    # Unused table entries point past the pool: the kernels must never read them.
    block_tables = torch.full((len(seq_lens), width), 10 * num_blocks, dtype=torch.int32)
    used = 0
    for s, n in enumerate(blocks_per_seq):
        block_tables[s, :n] = perm[used : used + n]
        used += n
    cache = torch.randn(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, generator=gen)
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    device = kernel_device()
    return PagedBatch(
        query=query.to(device=device, dtype=dtype),
        kv_cache=cache.to(device=device, dtype=dtype),
        layer=layer,
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        scale=head_dim**-0.5,
    )


TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
