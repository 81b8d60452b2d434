"""One simulated pod: the real engine core (scheduler, block pool, prefix
cache), ``AsyncEngine``, ``PodCore`` with its leases and KV-event stream,
and a gRPC server, with ``SimRunner`` and ``SimTransport`` in place of the
model and NIXL. Many live in one process (``SimFleet``); each has its own
gRPC port and engine thread.

Lifecycle: ``start`` (a fresh incarnation: cold cache, new transfer
identity) -> ``ready`` -> ``stop`` (the pod's SIGTERM drain, as
``PodServer``: refuse new work, let running calls finish within the grace,
end the rest with UNAVAILABLE, serve granted leases until released or
expired) -> ``stopped``; ``start`` may be called again. ``crash`` stops at
once without a drain (RPCs in flight are cut).
"""
from __future__ import annotations

import asyncio
import enum
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import grpc

from splitserve.decode.peer_client import PeerClient
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.engine_args import EngineArgs
from splitserve.grpc_limits import MAX_MESSAGE_BYTES
from splitserve.engine.engine_core import EngineCore
from splitserve.engine.sim_runner import SimRunner
from splitserve.kvtransfer.sim_transport import RemoteNotify, SimFabric, SimTransport
from splitserve.kvtransfer import TransferMetadata
from splitserve.pod.config import PodConfig
from splitserve.pod.core import PodCore
from splitserve.pod.messages import Role
from splitserve.proto import splitserve_v1_pb2_grpc as pb_grpc
from splitserve.sim.config import SimConfig
from splitserve.sim.faults import FaultInjector
from splitserve.sim.latency_model import LatencyModel
from splitserve.sim.prefix_oracle import CacheMirror, MirroredKVEventHub, PrefixOracle
from splitserve.sim.sim_servicer import SimServicer

logger = logging.getLogger(__name__)

_SERVER_OPTIONS = (("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES))
# Poll intervals of a sim prefill pod's lease keeper. The real defaults poll
# every 0.2 ms while a lease is claimed (a NIXL READ is served only when its
# target polls); a sim READ needs no target, and hundreds of pods polling at
# 5 kHz would eat the cores the simulation needs.
_LEASE_POLL_S = 0.005
_CLAIMED_LEASE_POLL_S = 0.002


class PodStatus(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


class SharedPeerClient:
    """One ``PeerClient`` (one channel per prefill address) for every decode
    pod of the fleet; ``close`` is a no-op here, the fleet closes the real one."""

    def __init__(self, inner: PeerClient) -> None:
        self._inner = inner

    async def get_transfer_metadata(self, address: str) -> TransferMetadata:
        return await self._inner.get_transfer_metadata(address)

    async def claim_kv(self, address: str, request_id: str, incarnation_id: str) -> tuple[int, ...]:
        return await self._inner.claim_kv(address, request_id, incarnation_id)

    async def release_kv(self, address: str, request_id: str) -> bool:
        return await self._inner.release_kv(address, request_id)

    async def close(self) -> None:
        return None


@dataclass
class FleetShared:
    """What every pod of one fleet shares (built by ``SimFleet``)."""

    config: SimConfig
    fabric: SimFabric
    peer_client: PeerClient
    oracle: PrefixOracle
    remote_notify: RemoteNotify


class SimPod:
    """One sim pod; event-loop only (its engine runs on its own thread)."""

    def __init__(self, index: int, role: Role, shared: FleetShared, slow_factor: float = 1.0) -> None:
        config = shared.config
        self.index = index
        self.role = role
        self.name = f"{role.value}-{index:03d}"
        # Base port 0: an ephemeral port, chosen at the first start and kept after.
        self.port = config.base_port + index if config.base_port else 0
        self.shared = shared
        self.mirror = CacheMirror()
        self.faults = FaultInjector(config.faults, seed=config.seed * 1_000_003 + index)
        self.latency = LatencyModel(config.latency, seed=config.seed * 1_000_003 + index, slow_factor=slow_factor)
        self.status = PodStatus.STOPPED
        self.core: PodCore | None = None
        self.transport: SimTransport | None = None
        self.runner: SimRunner | None = None
        self._server: grpc.aio.Server | None = None
        self.starts = 0
        self.calls: Counter[str] = Counter()  # Prefill/Decode calls over every incarnation

    @property
    def serving(self) -> bool:
        return self.status is PodStatus.READY

    @property
    def address(self) -> str:
        return f"{self.shared.config.dial_host}:{self.port}"

    async def start(self) -> None:
        """Start a fresh incarnation; raises ``OSError`` if the port is taken."""
        if self.status is not PodStatus.STOPPED:
            raise RuntimeError(f"pod {self.name} is {self.status.value}, not stopped")
        self.status = PodStatus.STARTING
        try:
            server = self._server = grpc.aio.server(options=_SERVER_OPTIONS)
            port = server.add_insecure_port(f"{self.shared.config.host}:{self.port}")
            if port == 0:
                raise OSError(f"sim pod {self.name}: cannot bind gRPC on port {self.port}")
            self.port = port
            self.core = self._build_core()
            await self.core.start()
            self._tune_polling(self.core)
            pb_grpc.add_EngineServicer_to_server(
                SimServicer(self.core, self.name, self.faults, self.shared.oracle, self.mirror, self.calls),
                server)
            await server.start()
        except BaseException:
            await self._teardown(grace=0.0)
            raise
        self.starts += 1
        self.status = PodStatus.READY

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Drain like a pod given SIGTERM, then stop; a no-op when stopped."""
        if self.status is not PodStatus.READY or self.core is None:
            return
        self.status = PodStatus.DRAINING
        grace = self.shared.config.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        await self.core.drain(grace)
        await self._teardown(grace=1.0)

    async def crash(self) -> None:
        """Stop at once: RPCs in flight are cut, leases and blocks vanish."""
        if self.status is PodStatus.STOPPED:
            return
        self.status = PodStatus.DRAINING
        await self._teardown(grace=0.0)

    async def _teardown(self, grace: float) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.core is not None:
            await self.core.close()
            self.core = None
        self.transport = None
        self.runner = None
        self.mirror.clear()
        self.status = PodStatus.STOPPED

    def set_faults(self, injector_config: Any) -> None:
        """Swap the fault settings (a ``FaultConfig``) of this pod."""
        self.faults.config = injector_config
        if self.transport is not None:
            self.transport.failure_rate = injector_config.kv_failure_rate

    # -- reports ----------------------------------------------------------------

    def incarnation_id(self) -> str:
        return self.core.incarnation_id if self.core is not None else ""

    def held_state(self) -> dict[str, int]:
        """What this pod still holds: requests, blocks in use, leases."""
        if self.core is None:
            return {"running": 0, "waiting": 0, "held": 0, "used_blocks": 0, "leased_blocks": 0, "leases": 0}
        sched = self.core.engine.stats().scheduler
        handler = self.core.prefill_handler
        return {
            "running": sched.num_running,
            "waiting": sched.num_waiting + sched.num_waiting_for_remote_kv,
            "held": sched.num_held,
            "used_blocks": sched.num_total_blocks - sched.num_free_blocks,
            "leased_blocks": handler.leases.table.num_leased_blocks if handler else 0,
            "leases": len(handler.leases.table) if handler else 0,
        }

    # -- building -----------------------------------------------------------------

    def _build_core(self) -> PodCore:
        config = self.shared.config
        model = config.model
        runner = SimRunner(num_blocks=config.num_blocks, block_size=config.block_size,
                           max_model_len=config.resolved_max_model_len, vocab_size=model.vocab_size,
                           eos_token_ids=model.eos_token_ids, step_timer=self.latency)
        args = EngineArgs(model=f"sim:{self.name}", block_size=config.block_size,
                          max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                          enable_prefix_caching=config.enable_prefix_caching, seed=config.seed + self.index,
                          num_gpu_blocks_override=config.num_blocks, max_model_len=config.resolved_max_model_len)
        hub = MirroredKVEventHub(self.mirror)
        engine = AsyncEngine(EngineCore(args, runner), after_step=[hub.after_step])
        transport = None
        if self.role is not Role.UNIFIED:
            transport = SimTransport(
                self.shared.fabric, self.name, model.layout(config.num_blocks, config.block_size),
                self.latency.transfer_seconds, address=self.address,
                failure_rate=self.faults.config.kv_failure_rate, seed=config.seed + self.index,
                model_fingerprint=model.fingerprint, default_timeout_s=config.kv_transfer_timeout_s,
                remote_notify=self.shared.remote_notify)
        pod_config = PodConfig(self.role, host=config.host, port=self.port, http_port=0,
                               advertise_address=self.address, agent_name=self.name,
                               kv_lease_seconds=config.kv_lease_seconds, kv_claim_timeout_s=config.kv_claim_timeout_s,
                               kv_transfer_timeout_s=config.kv_transfer_timeout_s,
                               shutdown_grace_seconds=config.shutdown_grace_seconds)
        peers = SharedPeerClient(self.shared.peer_client) if self.role is Role.DECODE else None
        self.runner, self.transport = runner, transport
        return PodCore(pod_config, engine, transport, peers, hub)

    @staticmethod
    def _tune_polling(core: PodCore) -> None:
        # No public knob for these yet (see the fleet README section): set
        # them on the objects PodCore built.
        if core.prefill_handler is not None:
            keeper = core.prefill_handler.leases
            keeper._poll_interval_s = _LEASE_POLL_S  # noqa: SLF001
            keeper._claimed_poll_interval_s = _CLAIMED_LEASE_POLL_S  # noqa: SLF001
        if core.remote_kv is not None:
            core.remote_kv.puller.spin_s = 0.0  # a sim READ ends on a timer, not by polling
            core.remote_kv.puller.poll_interval_s = 0.001


async def wait_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Gather, logging (not raising) failures."""
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(result, BaseException):
            logger.error("sim pod task failed: %r", result)
