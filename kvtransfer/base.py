"""Bookkeeping shared by every transport: peers, READ records, deadlines, metrics.

Subclasses supply the wire (NIXL, or in-process copies for tests) through the
``_wire_*`` hooks; this class owns the state machine so both behave alike.
"""
from __future__ import annotations

import itertools
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .descriptors import BlockRun, check_block_range, coalesce_runs
from .errors import KVTransferError, StalePeerError, UnknownPeerError, UnknownTransferError
from .fault_hook import TransferFaults
from .metadata import TransferMetadata, check_compatible
from .transport import KVTransport, PeerHandle, TransferHandle, TransferMetrics, TransferState

Clock = Callable[[], float]


@dataclass
class _Peer:
    handle: PeerHandle
    metadata: TransferMetadata
    wire: object  # the subclass's connection state (e.g. NIXL remote agent name)


@dataclass
class _Read:
    handle: TransferHandle
    runs: list[BlockRun]
    notification: bytes
    started: float
    state: TransferState = TransferState.PENDING
    wire: object = None
    error: str | None = None
    post_at: float | None = None  # a stalled READ (fault hook) is posted only then


class BaseTransport(KVTransport):
    """State machine and peer cache; see ``KVTransport`` for the contract.
    ``faults`` (tests only, see ``fault_hook``) fails or stalls READs."""

    def __init__(self, *, default_timeout_s: float, clock: Clock, faults: TransferFaults | None = None) -> None:
        if default_timeout_s <= 0:
            raise ValueError(f"default_timeout_s must be > 0, got {default_timeout_s}")
        self.metrics = TransferMetrics()
        self._faults = faults
        self._fault_dice = faults.dice() if faults is not None else None
        self._default_timeout_s = default_timeout_s
        self._clock = clock
        self._peers: dict[str, _Peer] = {}
        self._reads: dict[int, _Read] = {}
        self._ids = itertools.count(1)
        self._closed = False

    # -- hooks -------------------------------------------------------------
    @abstractmethod
    def _wire_connect(self, metadata: TransferMetadata) -> object: ...

    @abstractmethod
    def _wire_disconnect(self, peer: _Peer) -> None: ...

    @abstractmethod
    def _wire_post(self, peer: _Peer, read: _Read) -> TransferState:
        """Post the READ (set ``read.wire``); return PENDING, TRANSFERRING or DONE.
        Raise ``KVTransferError`` if the wire refuses it."""

    @abstractmethod
    def _wire_progress(self, read: _Read) -> TransferState:
        """Non-blocking check of a posted READ; raise ``KVTransferError`` on error."""

    @abstractmethod
    def _wire_abandon(self, read: _Read) -> None:
        """Stop caring about a READ (cancel / free its handle); must not raise."""

    @abstractmethod
    def _wire_notify(self, peer: _Peer, payload: bytes) -> None: ...

    @abstractmethod
    def _wire_notifications(self) -> list[tuple[str, bytes]]: ...

    @abstractmethod
    def _wire_close(self) -> None: ...

    # -- peers -------------------------------------------------------------
    def add_peer(self, metadata: TransferMetadata) -> PeerHandle:
        self._check_open()
        check_compatible(self.local_metadata(), metadata)
        known = self._peers.get(metadata.agent_name)
        if known is not None:
            if known.handle.incarnation_id == metadata.incarnation_id:
                return known.handle
            self._drop_peer(known, f"peer {metadata.agent_name!r} restarted (new incarnation)")
            self.metrics.peers_rehandshaked += 1
        wire = self._wire_connect(metadata)
        handle = PeerHandle(metadata.agent_name, metadata.incarnation_id, metadata.layout)
        self._peers[metadata.agent_name] = _Peer(handle, metadata, wire)
        self.metrics.peers_added += 1
        return handle

    def remove_peer(self, agent_name: str) -> None:
        peer = self._peers.get(agent_name)
        if peer is not None:
            self._drop_peer(peer, f"peer {agent_name!r} removed")

    def _drop_peer(self, peer: _Peer, reason: str) -> None:
        for read in self._reads.values():
            if read.handle.peer == peer.handle and not read.state.terminal:
                self._fail(read, reason)
        del self._peers[peer.handle.agent_name]
        self._wire_disconnect(peer)

    def _live_peer(self, peer: PeerHandle) -> _Peer:
        known = self._peers.get(peer.agent_name)
        if known is None:
            raise UnknownPeerError(
                f"KV peer {peer.agent_name!r} is not loaded; handshake (add_peer) first"
            )
        if known.handle != peer:
            raise StalePeerError(
                f"KV peer {peer.agent_name!r} restarted (incarnation {peer.incarnation_id} is now "
                f"{known.handle.incarnation_id}); its blocks are gone, recompute the prompt"
            )
        return known

    # -- reads -------------------------------------------------------------
    def start_read(
        self,
        peer: PeerHandle,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        notification: bytes | None = None,
        timeout_s: float | None = None,
    ) -> TransferHandle:
        self._check_open()
        live = self._live_peer(peer)
        if not remote_block_ids:
            raise ValueError("start_read needs at least one block")
        runs = coalesce_runs(remote_block_ids, local_block_ids)
        check_block_range(remote_block_ids, peer.layout.num_blocks, "remote")
        check_block_range(local_block_ids, self.local_metadata().layout.num_blocks, "local")
        timeout = self._default_timeout_s if timeout_s is None else timeout_s
        if timeout <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout}")
        now = self._clock()
        handle = TransferHandle(
            transfer_id=next(self._ids),
            peer=peer,
            num_blocks=len(remote_block_ids),
            num_descriptors=len(runs),
            num_bytes=len(remote_block_ids) * peer.layout.block_bytes,
            deadline=now + timeout,
        )
        read = _Read(handle, runs, notification or b"", started=now)
        self._reads[handle.transfer_id] = read
        self.metrics.transfers_started += 1
        self.metrics.reads_in_flight += 1
        faults, dice = self._faults, self._fault_dice
        if faults is not None and dice is not None:
            if faults.fail_rate > 0 and dice.random() < faults.fail_rate:
                self.metrics.faults_injected_fail += 1
                self._fail(read, "post failed: injected by the test fault hook (SPLITSERVE_KV_FAULTS)")
                return handle
            if faults.stall_s > 0:
                self.metrics.faults_injected_stall += 1
                read.post_at = now + faults.stall_s
                return handle
        self._post(live, read)
        return handle

    def _post(self, live: _Peer, read: _Read) -> None:
        read.post_at = None
        try:
            self._advance(read, self._wire_post(live, read))
        except KVTransferError as exc:
            self._fail(read, f"post failed: {exc}")

    def poll(self, handle: TransferHandle) -> TransferState:
        read = self._read(handle)
        if read.state.terminal:
            return read.state
        if read.post_at is not None:
            if self._clock() >= read.post_at:
                try:
                    self._post(self._live_peer(handle.peer), read)
                except (UnknownPeerError, StalePeerError) as exc:
                    self._fail(read, f"post failed: {exc}")
            elif self._clock() >= handle.deadline:
                self._fail(read, "timed out", timed_out=True)
            return read.state
        try:
            self._advance(read, self._wire_progress(read))
        except KVTransferError as exc:
            self._fail(read, f"transfer failed: {exc}")
            return read.state
        if not read.state.terminal and self._clock() >= handle.deadline:
            self._fail(read, "timed out", timed_out=True)
        return read.state

    def cancel(self, handle: TransferHandle) -> None:
        read = self._read(handle)
        if not read.state.terminal:
            self._fail(read, "cancelled", cancelled=True)

    def release(self, handle: TransferHandle) -> None:
        read = self._reads.get(handle.transfer_id)
        if read is None:
            return
        if not read.state.terminal:
            self._fail(read, "released while running", cancelled=True)
        del self._reads[handle.transfer_id]

    def error(self, handle: TransferHandle) -> str | None:
        return self._read(handle).error

    def wait(self, handle: TransferHandle, timeout: float, poll_interval_s: float = 0.0005) -> TransferState:
        give_up = time.monotonic() + timeout
        while True:
            state = self.poll(handle)
            if state.terminal:
                return state
            if time.monotonic() >= give_up:
                self._fail(self._read(handle), f"wait timed out after {timeout}s", timed_out=True)
                return TransferState.FAILED
            time.sleep(poll_interval_s)

    def _read(self, handle: TransferHandle) -> _Read:
        read = self._reads.get(handle.transfer_id)
        if read is None or read.handle != handle:
            raise UnknownTransferError(
                f"transfer {handle.transfer_id} is unknown to this transport (already released?)"
            )
        return read

    def _advance(self, read: _Read, state: TransferState) -> None:
        read.state = state
        if state is TransferState.DONE:
            self.metrics.reads_in_flight -= 1
            self.metrics.transfers_done += 1
            self.metrics.bytes_transferred += read.handle.num_bytes
            self.metrics.transfer_seconds += self._clock() - read.started

    def _fail(self, read: _Read, reason: str, *, timed_out: bool = False, cancelled: bool = False) -> None:
        self._wire_abandon(read)
        read.state = TransferState.FAILED
        read.error = reason
        self.metrics.reads_in_flight -= 1
        if cancelled:
            self.metrics.transfers_cancelled += 1
        else:
            self.metrics.transfers_failed += 1
            self.metrics.transfers_timed_out += int(timed_out)

    # -- notifications -------------------------------------------------------
    def send_notification(self, peer: PeerHandle, payload: bytes) -> None:
        self._check_open()
        self._wire_notify(self._live_peer(peer), payload)
        self.metrics.notifications_sent += 1

    def get_notifications(self) -> list[tuple[str, bytes]]:
        if self._closed:
            return []
        messages = self._wire_notifications()
        self.metrics.notifications_received += len(messages)
        return messages

    # -- lifetime ------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        for peer in list(self._peers.values()):
            self._drop_peer(peer, "transport closed")
        for read in self._reads.values():
            if not read.state.terminal:
                self._fail(read, "transport closed", cancelled=True)
        self._wire_close()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise KVTransferError("KV transport is closed")
