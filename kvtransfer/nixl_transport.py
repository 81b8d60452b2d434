"""``KVTransport`` over NIXL (UCX backend): one agent per pod, cache registered once.

UCX picks transports from the ``UCX_TLS`` environment variable when the agent
is created (shared memory / CMA on one host, TCP, RDMA), so ``ucx_tls`` is
applied to this process's environment before the agent exists. The NIXL
listener thread is off unless ``listen_port`` is given: metadata normally
travels over our own gRPC handshake.

NIXL's UCX progress thread is off unless ``progress_thread``: in NIXL 1.5 it
spins a full core per agent even when idle (measured: two idle pods kept both
cores of a 2-core machine busy, tripling a decode step's time). Without it, the
reader progresses its worker each time it polls a READ, and the target each
time it polls notifications (the prefill pod's lease keeper, every few ms
while leases exist), which one-sided transports (shared memory/CMA, RDMA) do
not even need; TCP emulates READ with messages the target must progress, so a
deployment moving KV over TCP may want the thread back.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

import torch

from .base import BaseTransport, Clock, _Peer, _Read
from .descriptors import run_descriptors
from .errors import InvalidMetadataError, KVTransferError
from .fault_hook import TransferFaults
from .layout import KVCacheLayout
from .metadata import PROTOCOL_VERSION, TransferMetadata
from .transport import TransferState

logger = logging.getLogger(__name__)


class NixlTransport(BaseTransport):
    """NIXL agent named ``agent_name`` over the contiguous tensor ``kv_cache``.

    Raises ``ValueError`` for a cache that is not a contiguous block-major
    tensor and ``KVTransferError`` if NIXL or its UCX plugin is unavailable.
    ``agent_name`` should be stable per pod (its name); restarts are told
    apart by the fresh ``incarnation_id``. ``faults``: the test-only hook
    (``fault_hook``), None in production.
    """

    def __init__(
        self,
        agent_name: str,
        kv_cache: torch.Tensor,
        *,
        model_fingerprint: str,
        block_hash_version: int = 1,
        ucx_tls: str | None = None,
        listen_port: int | None = None,
        num_threads: int = 0,
        progress_thread: bool = False,
        default_timeout_s: float = 30.0,
        clock: Clock = time.monotonic,
        faults: TransferFaults | None = None,
    ) -> None:
        super().__init__(default_timeout_s=default_timeout_s, clock=clock, faults=faults)
        layout = KVCacheLayout.from_tensor(kv_cache)
        if not agent_name:
            raise ValueError("agent_name must be non-empty (use the pod name)")
        if ucx_tls is not None:
            os.environ["UCX_TLS"] = ucx_tls
        try:
            from nixl._api import nixl_agent, nixl_agent_config
        except ImportError as exc:
            raise KVTransferError(f"NIXL is not installed ({exc}); pip install nixl") from None
        config = nixl_agent_config(
            enable_prog_thread=progress_thread,
            backends=["UCX"],
            enable_listen_thread=listen_port is not None,
            num_threads=num_threads,
            **({"listen_port": listen_port} if listen_port is not None else {}),
        )
        try:
            self._agent: Any = nixl_agent(agent_name, config)
        except Exception as exc:  # the bindings raise bare RuntimeError/nixlError
            raise KVTransferError(
                f"cannot create NIXL agent {agent_name!r}: {exc} (UCX_TLS="
                f"{os.environ.get('UCX_TLS', '<unset>')!r}; NIXL also needs a transport that "
                "reaches its own agent, e.g. include tcp, or leave UCX_TLS unset)"
            ) from exc
        if "UCX" not in self._agent.backends:
            raise KVTransferError("NIXL's UCX plugin is missing; check the nixl installation")
        self.kv_cache = kv_cache
        self._mem_type = "DRAM" if kv_cache.device.type == "cpu" else "VRAM"
        self._device_id = 0 if kv_cache.device.type == "cpu" else int(kv_cache.device.index or 0)
        self._registration = self._agent.register_memory(kv_cache)
        self._leaked: list[Any] = []
        self._metadata = TransferMetadata(
            protocol_version=PROTOCOL_VERSION,
            incarnation_id=uuid.uuid4().hex,
            agent_name=agent_name,
            agent_metadata=self._agent.get_agent_metadata(),
            base_address=kv_cache.data_ptr(),
            region_bytes=kv_cache.numel() * kv_cache.element_size(),
            device_id=self._device_id,
            mem_type=self._mem_type,
            layout=layout,
            model_fingerprint=model_fingerprint,
            block_hash_version=block_hash_version,
        )

    def local_metadata(self) -> TransferMetadata:
        return self._metadata

    def _wire_connect(self, metadata: TransferMetadata) -> object:
        try:
            loaded = self._agent.add_remote_agent(metadata.agent_metadata)
        except Exception as exc:
            raise InvalidMetadataError(
                f"NIXL refused the metadata of peer {metadata.agent_name!r}: {exc}"
            ) from exc
        name = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        if name != metadata.agent_name:
            self._agent.remove_remote_agent(name)
            raise InvalidMetadataError(
                f"peer metadata names agent {metadata.agent_name!r} but its NIXL blob is "
                f"for {name!r}; the handshake answer is inconsistent"
            )
        return name

    def _wire_disconnect(self, peer: _Peer) -> None:
        try:
            self._agent.remove_remote_agent(peer.wire)
        except Exception as exc:  # already gone on NIXL's side; nothing to undo
            logger.debug("remove_remote_agent(%s): %s", peer.wire, exc)

    def _wire_post(self, peer: _Peer, read: _Read) -> TransferState:
        remote = peer.metadata
        block_bytes = remote.layout.block_bytes
        local_descs = run_descriptors(
            read.runs, base_address=self._metadata.base_address, block_bytes=block_bytes,
            device_id=self._device_id, remote=False,
        )
        remote_descs = run_descriptors(
            read.runs, base_address=remote.base_address, block_bytes=block_bytes,
            device_id=remote.device_id, remote=True,
        )
        try:
            xfer = self._agent.initialize_xfer(
                "READ",
                self._agent.get_xfer_descs(local_descs, self._mem_type),
                self._agent.get_xfer_descs(remote_descs, remote.mem_type),
                peer.wire,
                read.notification,
            )
        except Exception as exc:
            raise KVTransferError(f"NIXL could not prepare the READ: {exc}") from exc
        read.wire = xfer
        try:
            status = self._agent.transfer(xfer)
        except Exception as exc:  # e.g. nixlRemoteDisconnectError: the peer died
            raise KVTransferError(f"NIXL could not post the READ: {exc}") from exc
        return self._status(read, status)

    def _wire_progress(self, read: _Read) -> TransferState:
        try:
            status = self._agent.check_xfer_state(read.wire)
        except Exception as exc:
            raise KVTransferError(str(exc)) from exc
        return self._status(read, status)

    def _status(self, read: _Read, status: str) -> TransferState:
        if status == "DONE":
            self._free(read)
            return TransferState.DONE
        if status == "PROC":
            return TransferState.TRANSFERRING
        raise KVTransferError(f"NIXL reported {status}")

    def _wire_abandon(self, read: _Read) -> None:
        self._free(read)

    def _free(self, read: _Read) -> None:
        xfer, read.wire = read.wire, None
        if xfer is None:
            return
        try:
            self._agent.release_xfer_handle(xfer)
        except Exception:
            # NIXL could not cancel a running READ; retry when closing so the
            # handle is never reused.
            self._leaked.append(xfer)

    def _wire_notify(self, peer: _Peer, payload: bytes) -> None:
        try:
            self._agent.send_notif(peer.wire, payload)
        except Exception as exc:
            raise KVTransferError(f"cannot notify {peer.wire!r}: {exc}") from exc

    def _wire_notifications(self) -> list[tuple[str, bytes]]:
        notifs = self._agent.get_new_notifs()
        return [(str(name), bytes(m)) for name, messages in notifs.items() for m in messages]

    def _wire_close(self) -> None:
        for xfer in self._leaked:
            try:
                self._agent.release_xfer_handle(xfer)
            except Exception as exc:
                logger.warning("NIXL transfer handle could not be released at close: %s", exc)
        self._leaked.clear()
        try:
            self._agent.deregister_memory(self._registration)
        except Exception as exc:
            logger.warning("NIXL deregister_memory failed at close: %s", exc)
