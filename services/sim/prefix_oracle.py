"""An exact view of every simulated pod's prefix cache, and the routing oracle.

Each sim pod's KV event hub is a ``MirroredKVEventHub``: besides fanning the
block pool's events out to routers it applies them to a ``CacheMirror``, a
set of the block hashes the pool holds (stored minus evicted), on the engine
thread right after each step. So the mirror equals the pool's cache as of
its last step.

When a prompt reaches a pod to be computed (Prefill, or Decode without a KV
handle), ``PrefixOracle.observe`` records, for that request:

- ``own_tokens``: the cached prefix the chosen pod held on arrival;
- ``oracle_tokens``: the longest cached prefix held on arrival by any serving
  pod of the same role (the best pick given the caches as they were);
- ``hit_tokens``: what the engine really served from its cache (filled in by
  ``complete`` from the RPC's result).

Prefixes are whole blocks, at most ``len(prompt) - 1`` tokens, as the
engine's own lookup. See ``bench/fleet.py`` for how the bench aggregates.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

from splitserve.engine.block_hash import BlockHash, hash_prompt_blocks
from splitserve.engine.block_pool import KVCacheEvents
from splitserve.pod.kv_event_hub import KVEventHub


class CacheMirror:
    """Block hashes one pod's pool holds; written on its engine thread,
    read on the event loop."""

    def __init__(self) -> None:
        self._hashes: set[BlockHash] = set()
        self._lock = threading.Lock()

    def apply(self, events: KVCacheEvents) -> None:
        with self._lock:
            if events.all_cleared:
                self._hashes.clear()
            self._hashes.difference_update(events.removed_block_hashes)
            self._hashes.update(events.stored_block_hashes)

    def clear(self) -> None:
        with self._lock:
            self._hashes.clear()

    def match_blocks(self, hashes: Sequence[BlockHash]) -> int:
        """Leading blocks of ``hashes`` held (a chain: the first miss ends it)."""
        n = 0
        with self._lock:
            for h in hashes:
                if h not in self._hashes:
                    break
                n += 1
        return n

    def __len__(self) -> int:
        return len(self._hashes)


class MirroredKVEventHub(KVEventHub):
    """``KVEventHub`` that also keeps a ``CacheMirror`` of the pool."""

    def __init__(self, mirror: CacheMirror) -> None:
        super().__init__()
        self.mirror = mirror

    def publish(self, events: KVCacheEvents) -> None:
        self.mirror.apply(events)
        super().publish(events)


@dataclass
class OracleRecord:
    """One prompt computation on one pod (see the module docstring)."""

    request_id: str
    role: str
    pod: str
    arrival_unix: float
    prompt_tokens: int
    own_tokens: int
    oracle_tokens: int
    hit_tokens: int = -1  # -1 until the RPC answered (a failed RPC stays -1)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


Peers = Callable[[str], Iterable[CacheMirror]]
"""The mirrors of the serving pods of a role."""


class PrefixOracle:
    """Records of one fleet; event-loop only."""

    def __init__(self, block_size: int, peers: Peers, max_records: int = 1_000_000) -> None:
        self.block_size = block_size
        self._peers = peers
        self._records: dict[tuple[str, str], OracleRecord] = {}
        self._max_records = max_records

    def observe(self, request_id: str, role: str, pod: str, mirror: CacheMirror,
                token_ids: Sequence[int], cache_salt: str | None) -> None:
        max_blocks = max(len(token_ids) - 1, 0) // self.block_size
        if max_blocks:
            hashes = hash_prompt_blocks(token_ids[: max_blocks * self.block_size], self.block_size,
                                        salt=cache_salt)
        else:
            hashes = []
        own = mirror.match_blocks(hashes)
        best = own
        for other in self._peers(role):
            if best == len(hashes):
                break
            best = max(best, other.match_blocks(hashes))
        if len(self._records) >= self._max_records:
            self._records.pop(next(iter(self._records)))
        self._records[(request_id, pod)] = OracleRecord(
            request_id, role, pod, time.time(), len(token_ids), own * self.block_size,
            best * self.block_size)

    def complete(self, request_id: str, pod: str, hit_tokens: int) -> None:
        record = self._records.get((request_id, pod))
        if record is not None:
            record.hit_tokens = hit_tokens

    def records(self) -> list[OracleRecord]:
        return list(self._records.values())

    def reset(self) -> None:
        self._records.clear()
