"""Which prompt blocks the router believes each pod holds in its prefix cache."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from splitserve.engine.block_hash import BlockHash


class PrefixIndex:
    """Block hashes cached on one pod, bounded, least recently used first out.

    Fed by the pod's KV events (``stored``/``evicted``) and by the router's own
    assignments (``stored`` with the prompt's hashes, before the pod reports
    them). Being a guess, it may be wrong both ways; routing stays correct,
    only less effective.
    """

    def __init__(self, max_blocks: int = 1 << 16) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[BlockHash, None] = OrderedDict()

    def stored(self, hashes: Iterable[BlockHash]) -> None:
        for h in hashes:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)

    def evicted(self, hashes: Iterable[BlockHash]) -> None:
        for h in hashes:
            self._blocks.pop(h, None)

    def clear(self) -> None:
        self._blocks.clear()

    def match_length(self, hashes: Sequence[BlockHash]) -> int:
        """Number of leading blocks of ``hashes`` present (a chain: the first
        miss ends the match). A pure query: scoring every pod must not
        reorder any pod's eviction queue."""
        matched = 0
        for h in hashes:
            if h not in self._blocks:
                break
            matched += 1
        return matched

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, h: object) -> bool:
        return h in self._blocks


class PrefixIndexMap:
    """One ``PrefixIndex`` per pod, created on first use."""

    def __init__(self, max_blocks_per_pod: int = 1 << 16) -> None:
        self.max_blocks_per_pod = max_blocks_per_pod
        self._indexes: dict[str, PrefixIndex] = {}

    def for_pod(self, pod_id: str) -> PrefixIndex:
        index = self._indexes.get(pod_id)
        if index is None:
            index = self._indexes[pod_id] = PrefixIndex(self.max_blocks_per_pod)
        return index

    def drop_pod(self, pod_id: str) -> None:
        self._indexes.pop(pod_id, None)

    def match_length(self, pod_id: str, hashes: Sequence[BlockHash]) -> int:
        index = self._indexes.get(pod_id)
        return index.match_length(hashes) if index is not None else 0
