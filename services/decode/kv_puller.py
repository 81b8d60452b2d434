"""Decode side of a handoff: pull a request's missing KV blocks from its
prefill pod, or fall back to recomputing the prompt.

One ``pull`` per request that arrived with a KV handle, after the engine
named the local blocks to fill (``RemoteKVLoad``). Runs on the pod's event
loop (the transport's only thread) and polls the READ with short sleeps, so
neither the loop nor the engine's step loop ever blocks on the wire.

Invariant: the engine frees a request's blocks at once when it is aborted, so
a READ that is writing into them is always driven to a terminal state
(DONE, FAILED or its deadline) *before* ``pull`` returns or re-raises a
cancellation; the caller aborts the engine request only afterwards.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from splitserve.decode.peer_client import PeerClient, PeerUnreachableError
from splitserve.decode.peer_directory import PeerDirectory, StaleHandleError
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.step_io import RemoteKVLoad
from splitserve.kvtransfer import (
    InvalidMetadataError, KVTransferError, KVTransport, LeaseNotFoundError, TransferHandle, TransferState,
)
from splitserve.pod.messages import KVHandle, KVSource

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PullOutcome:
    """How the prompt's KV was obtained; ``aborted`` when an abort arrived mid-READ."""

    source: KVSource
    num_blocks: int = 0
    num_bytes: int = 0
    aborted: bool = False


@dataclass
class PullCounters:
    pulls: int = 0
    failures: int = 0         # READ failed or timed out, or the peer was unreachable / stale
    leases_missing: int = 0   # ClaimKV said NOT_FOUND (expired or released): recomputed
    local_hits_only: int = 0  # every block was already cached here: nothing pulled


@dataclass
class KVPuller:
    engine: AsyncEngine
    transport: KVTransport
    peers: PeerDirectory
    client: PeerClient
    timeout_s: float
    observe_seconds: Callable[[float], None] = lambda _s: None
    poll_interval_s: float = 0.001
    # A READ of a few MB ends well under a millisecond on one host, and with
    # no NIXL progress thread it only completes when polled: poll back to
    # back (yielding to the loop) this long before settling into sleeps.
    spin_s: float = 0.002
    counters: PullCounters = field(default_factory=PullCounters)
    _background: set[asyncio.Task[bool]] = field(default_factory=set)

    async def pull(self, handle: KVHandle, load: RemoteKVLoad, abort: asyncio.Event) -> PullOutcome:
        """Fill ``load.block_ids`` from ``handle``'s peer and tell the engine
        (``finish_remote_kv``). Returns RECOMPUTED after any failure (the
        engine then recomputes the prompt). Raises ``IncompatiblePeerError``
        for a peer this pod can never pull from; the caller aborts the request
        (no READ was started, the lease is released here)."""
        self.counters.pulls += 1
        if not load.block_ids:
            self.counters.local_hits_only += 1
            self._release_lease(handle)
            return PullOutcome(KVSource.PULLED)
        try:
            peer = await self.peers.resolve(handle)
        except (PeerUnreachableError, InvalidMetadataError, StaleHandleError) as exc:
            return self._recompute(load.request_id, handle,
                                   f"handshake with {handle.peer_address} failed: {exc}")
        except Exception:
            self._release_lease(handle)
            raise
        try:
            remote = [handle.block_ids[i] for i in load.remote_block_indices]
        except IndexError:
            return self._recompute(load.request_id, handle,
                                   "the KV handle lists fewer blocks than its num_tokens needs")
        try:
            leased = await self.client.claim_kv(handle.peer_address, handle.request_id, handle.incarnation_id)
        except LeaseNotFoundError as exc:
            self.counters.leases_missing += 1
            self.engine.finish_remote_kv(load.request_id, ok=False)
            logger.info("request %s: %s; recomputing the prompt", load.request_id, exc)
            return PullOutcome(KVSource.RECOMPUTED)
        except PeerUnreachableError as exc:
            return self._recompute(load.request_id, handle, str(exc))
        if tuple(leased) != tuple(handle.block_ids):
            # READ only what the peer leased to this request: a handle naming other
            # blocks (another request's, another tenant's, past the pool) is refused.
            return self._recompute(load.request_id, handle,
                                   f"the KV handle names blocks its lease on {handle.peer_address} does not hold")
        started = time.monotonic()
        try:
            read = self.transport.start_read(peer, remote, load.block_ids,
                                             notification=b"release:" + handle.request_id.encode(),
                                             timeout_s=self.timeout_s)
        except (ValueError, KVTransferError) as exc:
            self.peers.forget(handle.peer_address)
            return self._recompute(load.request_id, handle, f"READ refused: {exc}")
        state, cancelled = await self._settle(read, handle, abort)
        error = self.transport.error(read)
        self.transport.release(read)
        if cancelled:
            raise asyncio.CancelledError
        if abort.is_set():
            return PullOutcome(KVSource.PULLED, aborted=True)
        if state is not TransferState.DONE:
            self.peers.forget(handle.peer_address)
            return self._recompute(load.request_id, handle, f"READ failed: {error}")
        self.observe_seconds(time.monotonic() - started)
        self.engine.finish_remote_kv(load.request_id, ok=True)
        return PullOutcome(KVSource.PULLED, read.num_blocks, read.num_bytes)

    async def _settle(self, read: TransferHandle, handle: KVHandle,
                      abort: asyncio.Event) -> tuple[TransferState, bool]:
        """Poll to a terminal state. An abort or a cancellation releases the
        prefill lease at once but still waits for the READ to end (bounded by
        its deadline), because it writes into blocks the engine would free."""
        cancelled = released = False
        spin_until = time.monotonic() + self.spin_s
        while True:
            state = self.transport.poll(read)
            if state.terminal:
                return state, cancelled
            if (abort.is_set() or cancelled) and not released:
                released = True
                self._release_lease(handle)
            try:
                await asyncio.sleep(0 if time.monotonic() < spin_until else self.poll_interval_s)
            except asyncio.CancelledError:
                cancelled = True

    def _recompute(self, request_id: str, handle: KVHandle, reason: str) -> PullOutcome:
        self.counters.failures += 1
        logger.warning("request %s: %s; recomputing the prompt", request_id, reason)
        self._release_lease(handle)
        self.engine.finish_remote_kv(request_id, ok=False)
        return PullOutcome(KVSource.RECOMPUTED)

    def _release_lease(self, handle: KVHandle) -> None:
        task = asyncio.create_task(self.client.release_kv(handle.peer_address, handle.request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for pending ReleaseKV calls (shutdown, tests)."""
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
