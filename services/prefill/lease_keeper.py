"""Prefill side of a handoff: leases on held blocks, released by the decoder's
``release:<request_id>`` notification, ``ReleaseKV``, an abort, or expiry.

Runs on the pod's event loop, which is also the only thread that touches the
transport and the lease table (neither is thread-safe). A background task
polls notifications and expiries every ``poll_interval_s`` while leases exist
(``claimed_poll_interval_s`` while one is claimed) and sleeps on an event
otherwise.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from splitserve.engine.async_engine import AsyncEngine
from splitserve.kvtransfer import KVTransport, Lease, LeaseNotFoundError, LeaseTable

logger = logging.getLogger(__name__)
_RELEASE_PREFIX = b"release:"


@dataclass
class LeaseCounters:
    expired: int = 0
    released_by_notification: int = 0


class LeaseKeeper:
    """Owns the lease table; every lease it drops unpins the blocks in the engine."""

    def __init__(self, engine: AsyncEngine, transport: KVTransport, ttl_seconds: float,
                 claim_timeout_s: float, poll_interval_s: float = 0.005,
                 claimed_poll_interval_s: float = 0.0002) -> None:
        self.engine = engine
        self.transport = transport
        self.ttl_seconds = ttl_seconds
        self.table = LeaseTable(claim_timeout_s=claim_timeout_s)
        self.counters = LeaseCounters()
        self._poll_interval_s = poll_interval_s
        # While a lease is claimed a READ may be in flight, and without NIXL's
        # progress thread UCX serves its target side only when this pod polls
        # (a READ waited up to one poll interval): poll fast until released.
        self._claimed_poll_interval_s = claimed_poll_interval_s
        self._wake = asyncio.Event()
        self._dropped = asyncio.Event()  # set whenever a lease goes (released or expired)
        self._task: asyncio.Task[None] | None = None
        self._lease_ids: set[str] = set()  # LeaseTable lists no ids

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lease-keeper")

    async def stop(self) -> None:
        """Stop the sweep and release every lease (shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for request_id in list(self._lease_ids):
            self.release(request_id)

    def reserve(self, request_id: str, block_ids: tuple[int, ...]) -> tuple[Lease, float]:
        """Lease a handed-off request's blocks; returns the lease and its wall-clock deadline."""
        lease = self.table.reserve(request_id, block_ids, self.ttl_seconds)
        self._lease_ids.add(request_id)
        self._wake.set()
        return lease, time.time() + self.ttl_seconds

    def claim(self, request_id: str) -> tuple[int, ...]:
        """Raise ``LeaseNotFoundError`` if unknown or expired."""
        block_ids = self.table.claim(request_id)
        self._wake.set()  # the READ follows at once: switch to fast polling now
        return block_ids

    def release(self, request_id: str) -> bool:
        """Drop a lease at once and unpin its blocks; False if there was none."""
        try:
            self.table.release(request_id)
        except LeaseNotFoundError:
            return False
        self._lease_ids.discard(request_id)
        self.engine.release_held_blocks(request_id)
        self._dropped.set()
        return True

    async def wait_released(self, timeout_s: float) -> bool:
        """Until no lease is held (each released by its decoder or an abort,
        or expired by the sweep); False if ``timeout_s`` passed first. The
        drain of a prefill pod calls this while it keeps serving ClaimKV."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self.table):
            self._dropped.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dropped.wait(), remaining)
        return True

    def sweep(self) -> None:
        """Apply release notifications and expire overdue leases (also called by tests)."""
        for _peer, payload in self.transport.get_notifications():
            if payload.startswith(_RELEASE_PREFIX):
                request_id = payload[len(_RELEASE_PREFIX):].decode("utf-8", "replace")
                if self.release(request_id):
                    self.counters.released_by_notification += 1
        for request_id, _blocks in self.table.expire():
            self.counters.expired += 1
            self._lease_ids.discard(request_id)
            logger.info("KV lease of %s expired; freeing its blocks", request_id)
            self.engine.release_held_blocks(request_id)
            self._dropped.set()

    async def _run(self) -> None:
        while True:
            if len(self.table) == 0:
                self._wake.clear()
                # Notifications for already-dropped leases are harmless; drain them anyway.
                self.sweep()
                await self._wake.wait()
            self.sweep()
            self._wake.clear()
            interval = self._claimed_poll_interval_s if self.table.num_claimed else self._poll_interval_s
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
