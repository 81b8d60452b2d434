"""Prefill-side leases: blocks pinned for a decoder between prefill and its READ.

One lease per handoff, a small transaction:

    reserve   prefill finished; blocks pinned until ``ttl_seconds`` pass
    claim     the decoder says its READ is about to start (``ClaimKV``)
    release   the decoder's ``release:<request_id>`` notification, or an abort:
              the blocks go back at once
    expire    the engine's periodic sweep frees what nobody pulled in time

A claimed lease is not freed at its TTL, because a READ may be copying out of
its blocks: it expires only ``claim_timeout_s`` after the claim. Contract: the
decoder's transfer timeout is shorter than ``claim_timeout_s``, so by the time
a claimed lease expires the decoder has abandoned its READ and will recompute.

Pure bookkeeping: the caller frees the returned block ids in its block pool.
Not thread-safe; the engine calls it from its step loop.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import LeaseNotFoundError


@dataclass(frozen=True)
class Lease:
    """A pinned set of blocks; ``claimed_until`` is ``None`` until claimed."""

    request_id: str
    block_ids: tuple[int, ...]
    deadline: float
    claimed_until: float | None = None

    def expired(self, now: float) -> bool:
        limit = self.deadline if self.claimed_until is None else self.claimed_until
        return now >= limit


class LeaseTable:
    """Leases by request id; ``clock`` is injectable (monotonic seconds)."""

    def __init__(self, claim_timeout_s: float = 120.0, clock: Callable[[], float] = time.monotonic) -> None:
        if claim_timeout_s <= 0:
            raise ValueError(f"claim_timeout_s must be > 0, got {claim_timeout_s}")
        self.claim_timeout_s = claim_timeout_s
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._num_blocks = 0
        self.leases_reserved = 0
        self.leases_released = 0
        self.leases_expired = 0
        self.claimed_leases_expired = 0

    def reserve(self, request_id: str, block_ids: Sequence[int], ttl_seconds: float) -> Lease:
        """Pin ``block_ids`` for ``request_id`` (called when its prefill finishes).

        Raises ``ValueError`` for a duplicate request id, no blocks, or a
        non-positive TTL.
        """
        if request_id in self._leases:
            raise ValueError(f"request {request_id!r} already holds a KV lease")
        if not block_ids:
            raise ValueError(f"lease for {request_id!r} needs at least one block")
        if ttl_seconds <= 0:
            raise ValueError(f"kv lease TTL must be > 0 seconds, got {ttl_seconds}")
        lease = Lease(request_id, tuple(block_ids), self._clock() + ttl_seconds)
        self._leases[request_id] = lease
        self._num_blocks += len(lease.block_ids)
        self.leases_reserved += 1
        return lease

    def claim(self, request_id: str) -> tuple[int, ...]:
        """Mark the lease as being read and return its block ids.

        Idempotent for a retried claim (the claim timeout is not extended).
        Raises ``LeaseNotFoundError`` if there is no lease or it has expired
        (even before ``expire`` swept it): the decoder then recomputes.
        """
        lease = self._leases.get(request_id)
        now = self._clock()
        if lease is None or lease.expired(now):
            raise LeaseNotFoundError(
                f"no live KV lease for request {request_id!r} (released, expired or unknown)"
            )
        if lease.claimed_until is None:
            lease = Lease(lease.request_id, lease.block_ids, lease.deadline, now + self.claim_timeout_s)
            self._leases[request_id] = lease
        return lease.block_ids

    def release(self, request_id: str) -> tuple[int, ...]:
        """Drop the lease at once (decoder's release or an abort) and return its
        blocks for the caller to free. Raises ``LeaseNotFoundError`` if none."""
        lease = self._leases.pop(request_id, None)
        if lease is None:
            raise LeaseNotFoundError(f"no KV lease for request {request_id!r} to release")
        self._num_blocks -= len(lease.block_ids)
        self.leases_released += 1
        return lease.block_ids

    def expire(self, now: float | None = None) -> list[tuple[str, tuple[int, ...]]]:
        """Remove every lease past its limit (the TTL if unclaimed, the claim
        timeout if claimed) and return them for the caller to free."""
        now = self._clock() if now is None else now
        gone = [lease for lease in self._leases.values() if lease.expired(now)]
        for lease in gone:
            del self._leases[lease.request_id]
            self._num_blocks -= len(lease.block_ids)
            self.leases_expired += 1
            self.claimed_leases_expired += int(lease.claimed_until is not None)
        return [(lease.request_id, lease.block_ids) for lease in gone]

    def get(self, request_id: str) -> Lease | None:
        return self._leases.get(request_id)

    @property
    def num_leased_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_claimed(self) -> int:
        """Leases a decoder has claimed: a READ out of them may be in flight."""
        return sum(lease.claimed_until is not None for lease in self._leases.values())

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._leases
