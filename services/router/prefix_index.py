"""Which prompt blocks the router believes each pod holds in its prefix cache."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import takewhile

from splitserve.engine.block_hash import BlockHash


class PrefixIndex:
    """Block hashes cached on one pod, bounded, least recently used first out.

    Fed by the pod's KV events (``stored``/``evicted``) and by the router's own
    assignments (``stored`` with the prompt's hashes, before the pod reports
    them). Being a guess, it may be wrong both ways; routing stays correct,
    only less effective. Inside a ``PrefixIndexMap`` it also keeps the map's
    block -> pods table current (``pod_id``, ``holders``).
    """

    def __init__(self, max_blocks: int = 1 << 16, pod_id: str = "",
                 holders: dict[BlockHash, tuple[str, ...]] | None = None) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        self.max_blocks = max_blocks
        self.pod_id = pod_id
        self._holders = holders
        self._blocks: OrderedDict[BlockHash, None] = OrderedDict()

    def stored(self, hashes: Iterable[BlockHash]) -> None:
        blocks, holders = self._blocks, self._holders
        move_to_end = blocks.move_to_end
        if holders is None:
            for h in hashes:
                if h in blocks:
                    move_to_end(h)
                else:
                    blocks[h] = None
        else:
            # Hot at fleet size (every request's blocks, twice: the router's
            # assignment and the pod's event), hence the inlined lookups.
            get, mine = holders.get, (self.pod_id,)
            for h in hashes:
                if h in blocks:
                    move_to_end(h)
                    continue
                blocks[h] = None
                pods = get(h)
                holders[h] = mine if pods is None else pods + mine
        if len(blocks) > self.max_blocks:
            popitem, forget = blocks.popitem, self._forget
            while len(blocks) > self.max_blocks:
                forget(popitem(last=False)[0])

    def evicted(self, hashes: Iterable[BlockHash]) -> None:
        pop, holders = self._blocks.pop, self._holders
        if holders is None:
            for h in hashes:
                pop(h, None)
            return
        get, mine, forget = holders.get, (self.pod_id,), self._forget
        for h in hashes:
            if pop(h, _MISSING) is _MISSING:
                continue
            pods = get(h)
            if pods == mine:  # the usual case: this pod was the only holder
                del holders[h]
            elif pods is not None and len(pods) > 1:
                forget(h)

    def clear(self) -> None:
        for h in self._blocks:
            self._forget(h)
        self._blocks.clear()

    def _forget(self, h: BlockHash) -> None:
        holders = self._holders
        if holders is None:
            return
        pods = holders.get(h)
        if pods is None:
            return
        if len(pods) == 1:  # the usual case: this pod was the only holder
            if pods[0] == self.pod_id:
                del holders[h]
            return
        rest = tuple(p for p in pods if p != self.pod_id)
        if rest:
            holders[h] = rest
        else:
            del holders[h]

    def match_length(self, hashes: Sequence[BlockHash]) -> int:
        """Number of leading blocks of ``hashes`` present (a chain: the first
        miss ends the match). A pure query: scoring every pod must not
        reorder any pod's eviction queue."""
        return len(list(takewhile(self._blocks.__contains__, hashes)))

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, h: object) -> bool:
        return h in self._blocks


_MISSING = object()


class PrefixIndexMap:
    """One ``PrefixIndex`` per pod, created on first use, and which pods hold
    each block, so that scoring N pods walks the chain only on the few pods
    that hold its first block (at 256 pods, ~50k lookups per request
    otherwise)."""

    def __init__(self, max_blocks_per_pod: int = 1 << 16) -> None:
        self.max_blocks_per_pod = max_blocks_per_pod
        self._indexes: dict[str, PrefixIndex] = {}
        # Tuples, not sets: most blocks have one or two holders, and a
        # 1-tuple is a quarter of an empty set's memory.
        self._holders: dict[BlockHash, tuple[str, ...]] = {}

    def for_pod(self, pod_id: str) -> PrefixIndex:
        index = self._indexes.get(pod_id)
        if index is None:
            index = self._indexes[pod_id] = PrefixIndex(self.max_blocks_per_pod, pod_id, self._holders)
        return index

    def drop_pod(self, pod_id: str) -> None:
        index = self._indexes.pop(pod_id, None)
        if index is not None:
            index.clear()

    def match_length(self, pod_id: str, hashes: Sequence[BlockHash]) -> int:
        index = self._indexes.get(pod_id)
        return index.match_length(hashes) if index is not None else 0

    def match_lengths(self, pod_ids: Iterable[str], hashes: Sequence[BlockHash]) -> dict[str, int]:
        """``match_length`` of every pod in ``pod_ids``; only the pods holding
        the chain's first block are walked (most pods hold none of a prompt)."""
        matches = dict.fromkeys(pod_ids, 0)
        for pod_id, matched in self.holder_matches(hashes).items():
            if pod_id in matches:
                matches[pod_id] = matched
        return matches

    def holder_matches(self, hashes: Sequence[BlockHash]) -> dict[str, int]:
        """``match_length`` (>= 1) of each pod holding the chain's first block,
        whatever its state; every other pod matches 0 blocks."""
        if not hashes:
            return {}
        indexes = self._indexes
        return {pod_id: indexes[pod_id].match_length(hashes) for pod_id in self._holders.get(hashes[0], ())}
