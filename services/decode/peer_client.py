"""How a decode pod talks to prefill pods' control plane: the handshake,
ClaimKV and ReleaseKV. ``GrpcPeerClient`` is the real one; ``LocalPeerClient``
calls in-process pod cores (unit tests)."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import grpc

from splitserve.grpc_tls import GrpcTLS, aio_channel
from splitserve.kvtransfer import InvalidMetadataError, LeaseNotFoundError, TransferMetadata
from splitserve.pod.messages import PodError


class PeerUnreachableError(RuntimeError):
    """The prefill pod did not answer (down, restarting, or refusing)."""


class PeerClient(Protocol):
    """Calls to a prefill pod at ``address`` (its gRPC host:port).

    ``get_transfer_metadata`` raises ``PeerUnreachableError`` or
    ``InvalidMetadataError``; ``claim_kv`` raises ``LeaseNotFoundError`` for
    an unknown/expired lease or a restarted pod, ``PeerUnreachableError``
    otherwise; ``release_kv`` is best effort and never raises.
    """

    async def get_transfer_metadata(self, address: str) -> TransferMetadata: ...

    async def claim_kv(self, address: str, request_id: str, incarnation_id: str) -> tuple[int, ...]: ...

    async def release_kv(self, address: str, request_id: str) -> bool: ...

    async def close(self) -> None: ...


class GrpcPeerClient:
    """One cached grpc.aio channel per prefill address."""

    def __init__(self, timeout_s: float = 10.0, tls: GrpcTLS | None = None) -> None:
        from splitserve.proto import splitserve_v1_pb2 as pb
        from splitserve.proto import splitserve_v1_pb2_grpc as pb_grpc

        self._pb = pb
        self._pb_grpc = pb_grpc
        self._timeout_s = timeout_s
        self._tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> object:
        channel = self._channels.get(address)
        if channel is None:
            channel = aio_channel(address, self._tls)
            self._channels[address] = channel
        return self._pb_grpc.EngineStub(channel)

    async def get_transfer_metadata(self, address: str) -> TransferMetadata:
        try:
            reply = await self._stub(address).GetTransferMetadata(  # type: ignore[attr-defined]
                self._pb.GetTransferMetadataRequest(), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise PeerUnreachableError(
                f"GetTransferMetadata to {address}: {exc.code().name} {exc.details()}") from None
        if not reply.encoded:
            raise InvalidMetadataError(f"prefill pod {address} sent transfer metadata without `encoded`")
        return TransferMetadata.from_bytes(reply.encoded)

    async def claim_kv(self, address: str, request_id: str, incarnation_id: str) -> tuple[int, ...]:
        try:
            reply = await self._stub(address).ClaimKV(  # type: ignore[attr-defined]
                self._pb.ClaimKVRequest(request_id=request_id, incarnation_id=incarnation_id),
                timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise LeaseNotFoundError(exc.details() or "KV lease not found") from None
            raise PeerUnreachableError(f"ClaimKV to {address}: {exc.code().name} {exc.details()}") from None
        return tuple(reply.block_ids)

    async def release_kv(self, address: str, request_id: str) -> bool:
        try:
            reply = await self._stub(address).ReleaseKV(  # type: ignore[attr-defined]
                self._pb.ReleaseKVRequest(request_id=request_id), timeout=self._timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.found)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        await asyncio.gather(*(c.close() for c in channels.values()), return_exceptions=True)


class LocalPeer(Protocol):
    """The slice of ``PodCore`` a ``LocalPeerClient`` calls."""

    def transfer_metadata(self) -> TransferMetadata: ...

    def claim_kv(self, request_id: str, incarnation_id: str) -> tuple[int, ...]: ...

    def release_kv(self, request_id: str) -> bool: ...


class LocalPeerClient:
    """Peers are in-process cores looked up by address (``lookup`` returns
    None for an address with no pod, which reads as unreachable)."""

    def __init__(self, lookup: Callable[[str], LocalPeer | None]) -> None:
        self._lookup = lookup

    def _peer(self, address: str) -> LocalPeer:
        peer = self._lookup(address)
        if peer is None:
            raise PeerUnreachableError(f"no pod at {address}")
        return peer

    async def get_transfer_metadata(self, address: str) -> TransferMetadata:
        try:
            return self._peer(address).transfer_metadata()
        except PodError as exc:
            raise PeerUnreachableError(exc.message) from None

    async def claim_kv(self, address: str, request_id: str, incarnation_id: str) -> tuple[int, ...]:
        try:
            return self._peer(address).claim_kv(request_id, incarnation_id)
        except PodError as exc:
            if exc.code == "NOT_FOUND":
                raise LeaseNotFoundError(exc.message) from None
            raise PeerUnreachableError(exc.message) from None

    async def release_kv(self, address: str, request_id: str) -> bool:
        try:
            return self._peer(address).release_kv(request_id)
        except (PodError, PeerUnreachableError):
            return False

    async def close(self) -> None:
        return None
