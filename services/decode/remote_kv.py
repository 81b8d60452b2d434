"""What only a decode pod does: serve Decode for a request that arrived with
a KV handle, pulling the prompt's blocks from the prefill pod that holds them
(or recomputing when that fails).

``PodCore.decode`` runs the stream; it checks the handle here before
submitting and calls ``pull`` when the engine names the local blocks to fill.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from splitserve.decode.kv_puller import KVPuller, PullOutcome
from splitserve.decode.peer_client import PeerClient
from splitserve.decode.peer_directory import PeerDirectory
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.step_io import RemoteKVLoad
from splitserve.kvtransfer import IncompatiblePeerError, KVTransport
from splitserve.pod.messages import KVHandle, failed_precondition, invalid


class RemoteKV:
    def __init__(self, engine: AsyncEngine, transport: KVTransport, peer_client: PeerClient,
                 timeout_s: float, observe_seconds: Callable[[float], None]) -> None:
        self.puller = KVPuller(engine, transport, PeerDirectory(transport, peer_client), peer_client,
                               timeout_s, observe_seconds=observe_seconds)

    @staticmethod
    def check_handle(handle: KVHandle) -> None:
        """Refuse a malformed handle before any engine work (INVALID_ARGUMENT)."""
        if handle.num_tokens < 1:
            raise invalid("kv_handle.num_tokens must be >= 1")
        # Too few block ids for num_tokens is judged after the handshake (a peer
        # with another block size must be refused as such) and recomputes.
        if not handle.peer_address or not handle.agent_name:
            raise invalid("kv_handle needs peer_address and agent_name")

    async def pull(self, handle: KVHandle, load: RemoteKVLoad, abort: asyncio.Event) -> PullOutcome:
        """Fill ``load``'s blocks from the handle's peer; an incompatible peer
        is FAILED_PRECONDITION, every other failure recomputes."""
        try:
            return await self.puller.pull(handle, load, abort)
        except IncompatiblePeerError as exc:
            raise failed_precondition(str(exc)) from None

    @property
    def failures(self) -> int:
        return self.puller.counters.failures

    async def drain(self) -> None:
        await self.puller.drain()
