"""Handshaked prefill peers of a decode pod, by gRPC address.

A peer is (re)handshaked when it is unknown or when a KV handle names an
incarnation other than the cached one (the prefill pod restarted): fetch its
``TransferMetadata`` over gRPC, ``check_compatible`` it (inside
``KVTransport.add_peer``) and load it into the transport. Event-loop only,
like the transport.
"""
from __future__ import annotations

from splitserve.decode.peer_client import PeerClient
from splitserve.kvtransfer import KVTransport, PeerHandle
from splitserve.pod.messages import KVHandle


class StaleHandleError(RuntimeError):
    """The handle names an incarnation the peer no longer has: its blocks are gone."""


class PeerDirectory:
    def __init__(self, transport: KVTransport, client: PeerClient) -> None:
        self.transport = transport
        self.client = client
        self._peers: dict[str, PeerHandle] = {}
        self.handshakes = 0

    async def resolve(self, handle: KVHandle) -> PeerHandle:
        """The loaded peer for ``handle``.

        Raises ``IncompatiblePeerError`` (mismatched model, dtype, block size,
        ...), ``InvalidMetadataError``, ``PeerUnreachableError`` or
        ``StaleHandleError`` (the pod restarted since it issued the handle).
        """
        cached = self._peers.get(handle.peer_address)
        if cached is not None and cached.incarnation_id == handle.incarnation_id \
                and cached.agent_name == handle.agent_name:
            return cached
        metadata = await self.client.get_transfer_metadata(handle.peer_address)
        peer = self.transport.add_peer(metadata)
        self.handshakes += 1
        self._peers[handle.peer_address] = peer
        if peer.incarnation_id != handle.incarnation_id or peer.agent_name != handle.agent_name:
            raise StaleHandleError(
                f"KV handle of {handle.request_id!r} names {handle.agent_name!r} incarnation "
                f"{handle.incarnation_id}, but {handle.peer_address} now runs {peer.agent_name!r} "
                f"incarnation {peer.incarnation_id}; recomputing the prompt"
            )
        return peer

    def forget(self, address: str) -> None:
        """Drop a peer (e.g. after a failed READ) so the next handle re-handshakes."""
        self._peers.pop(address, None)
