"""A transport that moves no bytes but takes the time a real one would.

Simulated pods (``splitserve serve sim``) use it: a READ stays TRANSFERRING
until ``transfer_seconds(num_bytes)`` of the transport's clock have passed,
then completes (or fails, when an injected failure was drawn for it) and
delivers its notification to the peer. Same state machine, stale-peer rules
and metrics as ``NixlTransport`` (``BaseTransport``); the layout is only
described, never allocated.

Peers in the same process meet on a ``SimFabric`` (by agent name). A peer
that is not on this process's fabric is reached through ``remote_notify``
(the sim host sends the notification as a ``ReleaseKV`` over gRPC to the
address carried in the peer's ``agent_metadata``); its READs complete
without a liveness check, since there is nothing to read.
"""
from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from .base import BaseTransport, Clock, _Peer, _Read
from .errors import KVTransferError
from .layout import KVCacheLayout
from .metadata import PROTOCOL_VERSION, TransferMetadata
from .transport import TransferState

_METADATA_PREFIX = b"sim:"
RemoteNotify = Callable[[str, bytes], None]
"""``(peer gRPC address, payload)``; must not block (schedule the call)."""


class SimFabric:
    """The in-process 'network' of simulated pods: agents by name."""

    def __init__(self) -> None:
        self.agents: dict[str, SimTransport] = {}


@dataclass
class _SimRead:
    ready_at: float
    fail: bool


def sim_peer_address(metadata: TransferMetadata) -> str:
    """The gRPC address a sim peer put in its handshake ('' if none)."""
    blob = metadata.agent_metadata
    return blob[len(_METADATA_PREFIX):].decode("utf-8", "replace") if blob.startswith(_METADATA_PREFIX) else ""


class SimTransport(BaseTransport):
    """One simulated pod's agent.

    ``transfer_seconds`` gives a READ's duration from its byte count (the
    latency model, jitter included). ``failure_rate`` is the chance that a
    READ fails at the end of its time (drawn at post from a generator seeded
    by ``seed``); it may be changed at run time. ``address`` is this pod's
    gRPC address, published for peers in other processes.
    """

    def __init__(
        self,
        fabric: SimFabric,
        agent_name: str,
        layout: KVCacheLayout,
        transfer_seconds: Callable[[int], float],
        *,
        address: str = "",
        failure_rate: float = 0.0,
        seed: int = 0,
        model_fingerprint: str = "sim",
        block_hash_version: int = 1,
        default_timeout_s: float = 30.0,
        remote_notify: RemoteNotify | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(default_timeout_s=default_timeout_s, clock=clock)
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be in [0, 1], got {failure_rate}")
        self.failure_rate = failure_rate
        self._transfer_seconds = transfer_seconds
        self._rng = random.Random(f"sim-transport:{seed}:{agent_name}")
        self._fabric = fabric
        self._remote_notify = remote_notify
        self._inbox: list[tuple[str, bytes]] = []
        self._metadata = TransferMetadata(
            protocol_version=PROTOCOL_VERSION,
            incarnation_id=uuid.uuid4().hex,
            agent_name=agent_name,
            agent_metadata=_METADATA_PREFIX + address.encode("utf-8"),
            base_address=0,
            region_bytes=layout.total_bytes,
            device_id=0,
            mem_type="VRAM",
            layout=layout,
            model_fingerprint=model_fingerprint,
            block_hash_version=block_hash_version,
        )
        fabric.agents[agent_name] = self  # a restarted pod replaces its predecessor

    def local_metadata(self) -> TransferMetadata:
        return self._metadata

    # -- wire hooks ----------------------------------------------------------
    def _wire_connect(self, metadata: TransferMetadata) -> object:
        return metadata

    def _wire_disconnect(self, peer: _Peer) -> None:
        pass

    def _wire_post(self, peer: _Peer, read: _Read) -> TransferState:
        seconds = max(0.0, self._transfer_seconds(read.handle.num_bytes))
        fail = self.failure_rate > 0 and self._rng.random() < self.failure_rate
        read.wire = _SimRead(read.started + seconds, fail)
        return TransferState.TRANSFERRING

    def _wire_progress(self, read: _Read) -> TransferState:
        wire: _SimRead = read.wire  # type: ignore[assignment]
        if self._clock() < wire.ready_at:
            return TransferState.TRANSFERRING
        if wire.fail:
            raise KVTransferError("injected KV transfer failure")
        peer = self._peers.get(read.handle.peer.agent_name)
        if peer is None:
            raise KVTransferError(f"peer {read.handle.peer.agent_name!r} was dropped")
        self._deliver(peer, read.notification)
        return TransferState.DONE

    def _wire_abandon(self, read: _Read) -> None:
        read.wire = _SimRead(float("inf"), True)

    def _wire_notify(self, peer: _Peer, payload: bytes) -> None:
        self._deliver(peer, payload)

    def _wire_notifications(self) -> list[tuple[str, bytes]]:
        messages, self._inbox = self._inbox, []
        return messages

    def _wire_close(self) -> None:
        if self._fabric.agents.get(self._metadata.agent_name) is self:
            del self._fabric.agents[self._metadata.agent_name]

    # -- helpers -------------------------------------------------------------
    def _deliver(self, peer: _Peer, payload: bytes) -> None:
        """Hand ``payload`` to the peer: in-process if it is on the fabric,
        else through ``remote_notify``. Raises ``KVTransferError`` if the
        peer is gone or restarted (a READ from it then fails)."""
        metadata: TransferMetadata = peer.wire  # type: ignore[assignment]
        target = self._fabric.agents.get(metadata.agent_name)
        if target is not None:
            if target._closed or target._metadata.incarnation_id != metadata.incarnation_id:
                raise KVTransferError(f"peer {metadata.agent_name!r} is gone or restarted")
            if payload:
                target._inbox.append((self._metadata.agent_name, payload))
            return
        address = sim_peer_address(metadata)
        if self._remote_notify is None or not address:
            raise KVTransferError(f"peer {metadata.agent_name!r} is not reachable from this process")
        if payload:
            self._remote_notify(address, payload)


def sim_layout(num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
               dtype: str) -> KVCacheLayout:
    """A block-major layout description (nothing is allocated)."""
    return KVCacheLayout(num_blocks, num_layers, block_size, num_kv_heads, head_dim, dtype)
