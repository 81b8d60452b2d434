"""The transport interface the engine's KV connector talks to.

Decode side: ``add_peer`` (after the gRPC handshake), ``start_read`` for the
blocks it lacks, ``poll`` from the step loop until DONE or FAILED, then
``release``. Prefill side: ``local_metadata`` for the handshake RPC and
``get_notifications`` to learn which leases to drop. Every method is called
from one thread (the engine's); implementations are not thread-safe.
"""
from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from .layout import KVCacheLayout
from .metadata import TransferMetadata


class TransferState(enum.Enum):
    """A READ's progress, as returned by ``poll`` (sglang's KVPoll, simplified)."""

    PENDING = "pending"            # accepted, not on the wire yet
    TRANSFERRING = "transferring"  # posted; bytes may be moving
    DONE = "done"                  # every byte is in the local blocks
    FAILED = "failed"              # error, timeout, cancel or peer gone; local blocks undefined

    @property
    def terminal(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED)


@dataclass(frozen=True)
class PeerHandle:
    """A handshaked peer, valid for one incarnation of it only."""

    agent_name: str
    incarnation_id: str
    layout: KVCacheLayout


@dataclass(frozen=True)
class TransferHandle:
    """Token for one READ; ``deadline`` is on the transport's clock."""

    transfer_id: int
    peer: PeerHandle
    num_blocks: int
    num_descriptors: int
    num_bytes: int
    deadline: float


@dataclass
class TransferMetrics:
    """Plain counters, read (never reset) by the pod's Prometheus exporter."""

    bytes_transferred: int = 0
    transfer_seconds: float = 0.0
    transfers_started: int = 0
    transfers_done: int = 0
    transfers_failed: int = 0
    transfers_timed_out: int = 0
    transfers_cancelled: int = 0
    reads_in_flight: int = 0
    notifications_sent: int = 0
    notifications_received: int = 0
    peers_added: int = 0
    peers_rehandshaked: int = 0
    faults_injected_fail: int = 0   # the test fault hook only (fault_hook.py)
    faults_injected_stall: int = 0


class KVTransport(ABC):
    """Moves KV blocks between the caches of pods. One instance per pod."""

    metrics: TransferMetrics

    @abstractmethod
    def local_metadata(self) -> TransferMetadata:
        """This pod's handshake message (served by ``GetTransferMetadata``)."""

    @abstractmethod
    def add_peer(self, metadata: TransferMetadata) -> PeerHandle:
        """Load a peer from its handshake; cached by agent name.

        Same name and incarnation: returns the cached handle. Same name, new
        incarnation: the old remote agent and its in-flight READs are dropped
        (they FAIL) and the new one is loaded. Raises ``IncompatiblePeerError``
        for a peer we cannot pull from.
        """

    @abstractmethod
    def remove_peer(self, agent_name: str) -> None:
        """Forget a peer (pod gone); its in-flight READs FAIL. No-op if unknown."""

    @abstractmethod
    def start_read(
        self,
        peer: PeerHandle,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        notification: bytes | None = None,
        timeout_s: float | None = None,
    ) -> TransferHandle:
        """Pull ``remote_block_ids[i]`` of ``peer`` into ``local_block_ids[i]`` as
        one READ of coalesced descriptors; ``notification`` reaches the peer once
        the READ has completed.

        Raises ``ValueError`` for bad block ids, ``UnknownPeerError`` /
        ``StalePeerError`` for a peer not (or no longer) loaded. Wire errors do
        not raise: the handle polls FAILED.
        """

    @abstractmethod
    def poll(self, handle: TransferHandle) -> TransferState:
        """Advance and report one READ; never blocks. A READ past its deadline
        is abandoned and FAILED. Raises ``UnknownTransferError`` after release."""

    @abstractmethod
    def cancel(self, handle: TransferHandle) -> None:
        """Abandon a READ (request aborted); it polls FAILED. No-op if terminal."""

    @abstractmethod
    def release(self, handle: TransferHandle) -> None:
        """Forget a READ, cancelling it first if still running. Idempotent."""

    @abstractmethod
    def error(self, handle: TransferHandle) -> str | None:
        """Why a FAILED READ failed (for logs), else ``None``."""

    @abstractmethod
    def send_notification(self, peer: PeerHandle, payload: bytes) -> None:
        """Send a small message to a peer (e.g. ``release:<request_id>`` after
        a READ that carried no notification)."""

    @abstractmethod
    def get_notifications(self) -> list[tuple[str, bytes]]:
        """Drain messages received since the last call, as (peer name, payload)."""

    @abstractmethod
    def close(self) -> None:
        """Abandon every READ, drop every peer, unregister memory. Idempotent."""

    def wait(self, handle: TransferHandle, timeout: float, poll_interval_s: float = 0.0005) -> TransferState:
        """Poll until terminal. If ``timeout`` seconds pass first, the READ is
        cancelled and FAILED is returned. For tests and tools; the engine polls."""
        give_up = time.monotonic() + timeout
        while True:
            state = self.poll(handle)
            if state.terminal:
                return state
            if time.monotonic() >= give_up:
                self.cancel(handle)
                return self.poll(handle)
            time.sleep(poll_interval_s)

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
