"""Block ids to transfer descriptors.

With a block-major cache each block is one contiguous region, so a stretch of
block ids that is consecutive on *both* sides is a single (addr, len, dev)
descriptor. Fewer descriptors mean fewer work requests on the wire.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Descriptor = tuple[int, int, int]  # (address, length in bytes, device id)


@dataclass(frozen=True)
class BlockRun:
    """``length`` blocks copied from ``remote_start..`` to ``local_start..``."""

    remote_start: int
    local_start: int
    length: int


def coalesce_runs(remote_block_ids: Sequence[int], local_block_ids: Sequence[int]) -> list[BlockRun]:
    """Pair remote and local block ids (position by position) into maximal runs
    in which both ids increase by one per step; order is preserved.

    Raises ``ValueError`` for different lengths, negative ids, or a local id
    named twice (two sources for one destination block).
    """
    if len(remote_block_ids) != len(local_block_ids):
        raise ValueError(
            f"got {len(remote_block_ids)} remote and {len(local_block_ids)} local block ids; "
            "each remote block needs exactly one local destination"
        )
    if len(set(local_block_ids)) != len(local_block_ids):
        raise ValueError("local block ids must be distinct (one destination per pulled block)")
    runs: list[BlockRun] = []
    start = 0
    for i, (remote, local) in enumerate(zip(remote_block_ids, local_block_ids)):
        if remote < 0 or local < 0:
            raise ValueError(f"block ids must be >= 0, got remote={remote} local={local}")
        if i > start and not (
            remote == remote_block_ids[i - 1] + 1 and local == local_block_ids[i - 1] + 1
        ):
            runs.append(BlockRun(remote_block_ids[start], local_block_ids[start], i - start))
            start = i
    if remote_block_ids:
        n = len(remote_block_ids)
        runs.append(BlockRun(remote_block_ids[start], local_block_ids[start], n - start))
    return runs


def run_descriptors(
    runs: Sequence[BlockRun],
    *,
    base_address: int,
    block_bytes: int,
    device_id: int,
    remote: bool,
) -> list[Descriptor]:
    """Descriptors of one side (``remote=True``: the runs' remote starts) of ``runs``
    in a region starting at ``base_address``."""
    return [
        (
            base_address + (r.remote_start if remote else r.local_start) * block_bytes,
            r.length * block_bytes,
            device_id,
        )
        for r in runs
    ]


def check_block_range(block_ids: Sequence[int], num_blocks: int, side: str) -> None:
    """Raise ``ValueError`` if an id is outside ``[0, num_blocks)`` of ``side``'s cache."""
    bad = [b for b in block_ids if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(
            f"{side} block id(s) {bad[:8]} out of range: the {side} cache has {num_blocks} blocks"
        )
