"""Many simulated pods in one process: one asyncio loop, one gRPC port and
one engine thread per pod, one shared in-process KV fabric, one shared
prefix oracle, and the membership operations a bench or test needs
(add, drain, restart, crash pods; inject faults; report what is held).

``SimFleet`` is transport-free (the HTTP control API in ``control_http``
is a thin layer over it). Event-loop only.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from splitserve.decode.peer_client import GrpcPeerClient
from splitserve.kvtransfer.sim_transport import SimFabric
from splitserve.pod.messages import Role
from splitserve.sim.config import SimConfig
from splitserve.sim.faults import FaultConfig
from splitserve.sim.load_sampler import LoadSampler
from splitserve.sim.prefix_oracle import CacheMirror, PrefixOracle
from splitserve.sim.sim_pod import FleetShared, PodStatus, SimPod

logger = logging.getLogger(__name__)
_RELEASE_PREFIX = b"release:"


class UnknownPodError(KeyError):
    """No pod of that name in this fleet."""


class SimFleet:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.faults = config.faults
        self._peer_client = GrpcPeerClient()
        self.oracle = PrefixOracle(config.block_size, self._serving_mirrors)
        self.shared = FleetShared(config, SimFabric(), self._peer_client, self.oracle, self._remote_notify)
        self.pods: dict[str, SimPod] = {}
        self.sampler = LoadSampler(lambda: self.pods.values())
        self._background: set[asyncio.Task[Any]] = set()
        self._next_index = 0
        slow = random.Random(f"sim-slow:{config.seed}").sample(range(config.total_pods), config.slow_pods)
        self._slow_indexes = frozenset(slow)

    # -- lifetime -----------------------------------------------------------------

    async def start(self) -> None:
        """Start every configured pod (concurrently); raises if any fails."""
        pods = [self._new_pod(group.role) for group in self.config.groups for _ in range(group.count)]
        results = await asyncio.gather(*(p.start() for p in pods), return_exceptions=True)
        failed = [(p.name, r) for p, r in zip(pods, results) if isinstance(r, BaseException)]
        if failed:
            await self.close()
            name, error = failed[0]
            raise OSError(f"{len(failed)} sim pod(s) failed to start; first {name}: {error}")
        self.write_discovery()
        self.sampler.start()

    async def close(self, grace_seconds: float = 0.0) -> None:
        """Stop every pod (drain with ``grace_seconds``) and the shared client."""
        await self.sampler.stop()
        await asyncio.gather(*(p.stop(grace_seconds) for p in self.pods.values()), return_exceptions=True)
        self.write_discovery()
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        await self._peer_client.close()

    # -- membership ---------------------------------------------------------------

    async def add_pod(self, role: Role) -> SimPod:
        """A new pod (next index and port), started."""
        pod = self._new_pod(role)
        try:
            await pod.start()
        except BaseException:
            del self.pods[pod.name]
            raise
        self.write_discovery()
        return pod

    async def stop_pod(self, name: str, grace_seconds: float | None = None) -> None:
        """Drain and stop one pod (it stays listed, stopped; ``start_pod`` revives it)."""
        pod = self.pod(name)
        task = asyncio.create_task(pod.stop(grace_seconds))
        await asyncio.sleep(0)  # let the drain mark the pod draining before the file is written
        self.write_discovery()
        await task
        self.write_discovery()

    async def start_pod(self, name: str) -> None:
        await self.pod(name).start()
        self.write_discovery()

    async def remove_pod(self, name: str, grace_seconds: float | None = None) -> None:
        """Drain, stop and forget one pod (absent from the discovery file)."""
        await self.stop_pod(name, grace_seconds)
        self.pods.pop(name, None)
        self.write_discovery()

    async def crash_pod(self, name: str) -> None:
        await self.pod(name).crash()
        self.write_discovery()

    async def restart_all(self) -> None:
        """Every pod stopped (no grace) and started again: cold caches, new
        incarnations; oracle records and load samples start over."""
        pods = list(self.pods.values())
        # A hair of grace, not 0: PodCore.drain(0) reports idle pods as timed out.
        await asyncio.gather(*(p.stop(0.01) for p in pods))
        results = await asyncio.gather(*(p.start() for p in pods if p.status is PodStatus.STOPPED),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        self.reset_observations()
        self.write_discovery()
        if errors:
            raise OSError(f"{len(errors)} pod(s) failed to restart: {errors[0]}")

    def reset_observations(self) -> None:
        self.oracle.reset()
        self.sampler.reset()
        for pod in self.pods.values():
            pod.calls.clear()

    def set_faults(self, faults: FaultConfig) -> None:
        self.faults = faults
        for pod in self.pods.values():
            pod.set_faults(faults)

    def set_slow(self, name: str, factor: float) -> None:
        if factor <= 0:
            raise ValueError(f"slow factor must be > 0, got {factor}")
        self.pod(name).latency.slow_factor = factor

    # -- queries ------------------------------------------------------------------

    def pod(self, name: str) -> SimPod:
        try:
            return self.pods[name]
        except KeyError:
            raise UnknownPodError(f"no sim pod {name!r}; pods: {', '.join(self.pods) or 'none'}") from None

    def serving_pods(self, role: Role | None = None) -> list[SimPod]:
        return [p for p in self.pods.values() if p.serving and (role is None or p.role is role)]

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": p.name, "role": p.role.value, "address": p.address, "port": p.port,
                 "status": p.status.value, "incarnation_id": p.incarnation_id(), "starts": p.starts,
                 "slow_factor": p.latency.slow_factor, "calls": dict(p.calls),
                 "faults": vars(p.faults.counters).copy()} for p in self.pods.values()]

    def held_report(self) -> dict[str, dict[str, int]]:
        """Per pod: requests, used blocks and leases still held (all 0 when idle)."""
        return {p.name: p.held_state() for p in self.pods.values()}

    def is_idle(self) -> bool:
        return all(not any(v for v in state.values()) for state in self.held_report().values())

    def _serving_mirrors(self, role: str) -> Iterator[CacheMirror]:
        for pod in self.pods.values():
            if pod.serving and pod.role.value == role:
                yield pod.mirror

    # -- discovery file -------------------------------------------------------------

    def discovery_document(self) -> dict[str, Any]:
        """The runtime contract's file-discovery JSON for this fleet's pods."""
        states = {PodStatus.READY: "ready", PodStatus.DRAINING: "draining"}
        return {"version": 1, "pods": [{"role": p.role.value, "address": p.address, "state": states[p.status]}
                                       for p in self.pods.values() if p.status in states]}

    def write_discovery(self) -> None:
        path = self.config.discovery_file
        if not path:
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(self.discovery_document(), f)
        os.replace(tmp, target)

    # -- helpers --------------------------------------------------------------------

    def _new_pod(self, role: Role) -> SimPod:
        index = self._next_index
        if index >= self.config.max_pods or (self.config.base_port and self.config.base_port + index > 65535):
            raise ValueError(f"this fleet cannot create pod #{index} (limit {self.config.max_pods} pods, "
                             f"ports from {self.config.base_port})")
        self._next_index += 1
        slow = self.config.slow_factor if index in self._slow_indexes else 1.0
        pod = SimPod(index, role, self.shared, slow_factor=slow)
        pod.set_faults(self.faults)
        self.pods[pod.name] = pod
        return pod

    def _remote_notify(self, address: str, payload: bytes) -> None:
        """A READ from a prefill pod in another process finished: its release
        notification travels as a ReleaseKV call."""
        if not payload.startswith(_RELEASE_PREFIX):
            return
        request_id = payload[len(_RELEASE_PREFIX):].decode("utf-8", "replace")
        task = asyncio.get_running_loop().create_task(self._peer_client.release_kv(address, request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def role_counts(pods: Iterable[SimPod]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for pod in pods:
        counts[pod.role.value] = counts.get(pod.role.value, 0) + 1
    return counts
