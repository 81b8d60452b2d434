"""The paged KV cache: one contiguous, block-major tensor.

Layout (DESIGN.md section 3):
``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``, so one
block of all layers' K and V is one contiguous region -- one transfer
descriptor per block for KV transfer.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from splitserve.engine.engine_args import DEFAULT_CPU_KV_CACHE_MEMORY, EngineArgs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of one block and the cache dtype."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def block_bytes(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)


def kv_cache_budget_bytes(engine_args: EngineArgs, device: torch.device, activation_bytes: int) -> int:
    """Bytes the cache may take: ``kv_cache_memory`` on CPU; on CUDA the
    ``gpu_memory_utilization`` share of the device minus what is in use now
    (weights) and ``activation_bytes`` reserved for a step's activations."""
    if device.type != "cuda":
        return engine_args.kv_cache_memory or DEFAULT_CPU_KV_CACHE_MEMORY
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    return int(engine_args.gpu_memory_utilization * total) - used - activation_bytes


def determine_num_blocks(engine_args: EngineArgs, spec: KVCacheSpec, device: torch.device,
                         max_model_len: int, activation_bytes: int = 0) -> int:
    """Number of KV blocks: ``num_gpu_blocks_override`` if set, else the memory
    budget divided by the block size. Raises ``ValueError`` when the cache
    cannot hold one ``max_model_len`` sequence."""
    if engine_args.num_gpu_blocks_override is not None:
        num_blocks = engine_args.num_gpu_blocks_override
        source = "--num-gpu-blocks-override"
    else:
        budget = kv_cache_budget_bytes(engine_args, device, activation_bytes)
        num_blocks = max(budget, 0) // spec.block_bytes
        knob = "--kv-cache-memory" if device.type != "cuda" else "--gpu-memory-utilization"
        source = f"{knob} ({max(budget, 0) / 2**20:.1f} MiB for the cache)"
    needed = -(-max_model_len // spec.block_size)
    if num_blocks < needed:
        raise ValueError(
            f"the KV cache has room for {num_blocks} blocks of {spec.block_size} tokens "
            f"(from {source}), but one sequence of --max-model-len {max_model_len} needs {needed}; "
            "raise the cache budget or lower --max-model-len"
        )
    logger.info("KV cache: %d blocks x %d tokens (%.1f MiB, %s), from %s", num_blocks, spec.block_size,
                num_blocks * spec.block_bytes / 2**20, str(spec.dtype).removeprefix("torch."), source)
    return num_blocks


def allocate_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> torch.Tensor:
    """The cache, zero-filled: padded key positions then hold finite values,
    which attention masks out (garbage NaNs would leak through 0 * NaN)."""
    return torch.zeros(spec.shape(num_blocks), dtype=spec.dtype, device=device)
