"""In-process transport for unit tests: peers are objects on a shared ``FakeFabric``.

Behaves like ``NixlTransport`` (same state machine, same stale-peer rules)
but copies with ``torch``; it can be told to fail or delay READs. Not for
production: nothing leaves the process.
"""
from __future__ import annotations

import time
import uuid

import torch

from .base import BaseTransport, Clock, _Peer, _Read
from .errors import KVTransferError
from .fault_hook import TransferFaults
from .layout import KVCacheLayout
from .metadata import PROTOCOL_VERSION, TransferMetadata
from .transport import TransferState


class FakeFabric:
    """The 'network' of a test: fake agents by name, and their inboxes."""

    def __init__(self) -> None:
        self.agents: dict[str, FakeTransport] = {}


class FakeTransport(BaseTransport):
    """A fake pod agent holding ``kv_cache``.

    Knobs a test may change at any time (read when a READ is started or polled):
    ``start_delay_s`` (READ stays PENDING), ``read_delay_s`` (then
    TRANSFERRING; ``math.inf`` hangs it), ``fail_post`` (FAILED at once),
    ``fail_transfer`` (FAILED when it would complete).
    """

    def __init__(
        self,
        fabric: FakeFabric,
        agent_name: str,
        kv_cache: torch.Tensor,
        *,
        model_fingerprint: str = "test-model",
        block_hash_version: int = 1,
        default_timeout_s: float = 30.0,
        clock: Clock = time.monotonic,
        faults: TransferFaults | None = None,
    ) -> None:
        super().__init__(default_timeout_s=default_timeout_s, clock=clock, faults=faults)
        layout = KVCacheLayout.from_tensor(kv_cache)
        self.kv_cache = kv_cache
        self.start_delay_s = 0.0
        self.read_delay_s = 0.0
        self.fail_post = False
        self.fail_transfer = False
        self._fabric = fabric
        self._inbox: list[tuple[str, bytes]] = []
        self._metadata = TransferMetadata(
            protocol_version=PROTOCOL_VERSION,
            incarnation_id=uuid.uuid4().hex,
            agent_name=agent_name,
            agent_metadata=b"fake:" + agent_name.encode(),
            base_address=kv_cache.data_ptr(),
            region_bytes=kv_cache.numel() * kv_cache.element_size(),
            device_id=0,
            mem_type="DRAM",
            layout=layout,
            model_fingerprint=model_fingerprint,
            block_hash_version=block_hash_version,
        )
        # A restarted fake pod replaces its predecessor, as a new pod would.
        fabric.agents[agent_name] = self

    def local_metadata(self) -> TransferMetadata:
        return self._metadata

    def _target(self, read: _Read) -> FakeTransport:
        target = self._fabric.agents.get(read.handle.peer.agent_name)
        if target is None or target._closed:
            raise KVTransferError(f"peer {read.handle.peer.agent_name!r} unreachable")
        if target._metadata.incarnation_id != read.handle.peer.incarnation_id:
            raise KVTransferError(f"peer {read.handle.peer.agent_name!r} has a new incarnation")
        return target

    def _wire_connect(self, metadata: TransferMetadata) -> object:
        return metadata.agent_name

    def _wire_disconnect(self, peer: _Peer) -> None:
        pass

    def _wire_post(self, peer: _Peer, read: _Read) -> TransferState:
        if self.fail_post:
            raise KVTransferError("injected post failure")
        read.wire = (self.start_delay_s, self.read_delay_s)
        return self._wire_progress(read)

    def _wire_progress(self, read: _Read) -> TransferState:
        start_delay, read_delay = read.wire  # type: ignore[misc]
        elapsed = self._clock() - read.started
        if elapsed < start_delay:
            return TransferState.PENDING
        if elapsed < start_delay + read_delay:
            return TransferState.TRANSFERRING
        target = self._target(read)
        if self.fail_transfer:
            raise KVTransferError("injected transfer failure")
        for run in read.runs:
            self.kv_cache[run.local_start : run.local_start + run.length].copy_(
                target.kv_cache[run.remote_start : run.remote_start + run.length]
            )
        if read.notification:
            target._inbox.append((self._metadata.agent_name, read.notification))
        return TransferState.DONE

    def _wire_abandon(self, read: _Read) -> None:
        read.wire = (float("inf"), float("inf"))

    def _wire_notify(self, peer: _Peer, payload: bytes) -> None:
        target = self._fabric.agents.get(peer.handle.agent_name)
        if target is None or target._metadata.incarnation_id != peer.handle.incarnation_id:
            raise KVTransferError(f"peer {peer.handle.agent_name!r} unreachable")
        target._inbox.append((self._metadata.agent_name, payload))

    def _wire_notifications(self) -> list[tuple[str, bytes]]:
        messages, self._inbox = self._inbox, []
        return messages

    def _wire_close(self) -> None:
        if self._fabric.agents.get(self._metadata.agent_name) is self:
            del self._fabric.agents[self._metadata.agent_name]
