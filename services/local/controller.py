"""The Deployment controller of ``splitserve up``: keeps every pool at its
replica count, runs scale and rolling restarts, replaces crashed pods with
back-off, and keeps the router's pods file in step.

``reconcile()`` is one pass (reap exits, probe starting pods' /health, send
due SIGTERM/SIGKILL to draining pods, carry out each pool's plan, rewrite the
pods file if it changed); the launcher calls it from one thread every
``RECONCILE_INTERVAL_S``. ``scale``, ``rollout_restart`` and ``status`` may
be called from any thread (the control endpoint's): they only change the
desired state under the lock, the next pass acts on it.
"""
from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitserve.local.pod_pool import LocalPod, PodPhase, PodPool
from splitserve.local.pods_file import PodsFileEntry, write_pods_file
from splitserve.local.probes import free_port, is_healthy
from splitserve.local.process_group import ManagedProcess, ProcessGroup

RECONCILE_INTERVAL_S = 0.2


class PodCrashedError(RuntimeError):
    """A pod exited while ``fail_fast`` was set (before ``up`` was ready)."""


class ControlError(ValueError):
    """A scale or rollout request the controller refuses (the message says why)."""


@dataclass(frozen=True)
class PodLaunch:
    """How to start a pod process: ``argv(pod)`` and where its logs go."""

    argv: Callable[[LocalPod], Sequence[str]]
    log_dir: Path


@dataclass(frozen=True)
class DrainTiming:
    """``notice_s``: how long a pod is listed "draining" before SIGTERM (the
    router re-reads the file every 0.2 s, so it stops sending first);
    ``grace_s``: SIGKILL if it has not exited this long after SIGTERM
    (terminationGracePeriodSeconds)."""

    notice_s: float = 0.5
    grace_s: float = 120.0


class DeploymentController:
    def __init__(self, pools: Sequence[PodPool], group: ProcessGroup, launch: PodLaunch, host: str,
                 pods_file: Path | None, timing: DrainTiming = DrainTiming(), scalable: bool = True,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic) -> None:
        self.pools = {pool.role: pool for pool in pools}
        self.group = group
        self.launch = launch
        self.host = host
        self.pods_file = pods_file
        self.timing = timing
        self.scalable = scalable  # False: static discovery, the router's pod list is fixed
        self.fail_fast = True
        self._log = log
        self._clock = clock
        self._lock = threading.RLock()
        self._processes: dict[str, ManagedProcess] = {}
        self._written: list[PodsFileEntry] | None = None
        self._freed_ports: dict[str, list[tuple[int, int]]] = {role: [] for role in self.pools}

    # -- control (any thread) ---------------------------------------------------

    def scale(self, replicas: dict[str, int]) -> None:
        with self._lock:
            self._check_pools(replicas, "scale")
            for role, count in replicas.items():
                try:
                    self.pools[role].scale(count)
                except ValueError as exc:
                    raise ControlError(str(exc)) from None
                self._log(f"scale {role} to {count}")

    def rollout_restart(self, role: str) -> None:
        with self._lock:
            self._check_pools({role: 0}, "rollout restart")
            self.pools[role].restart()
            self._log(f"rollout restart {role}: revision {self.pools[role].revision}")

    def converged(self, roles: Sequence[str] | None = None) -> bool:
        with self._lock:
            return all(self.pools[r].converged() for r in (roles or self.pools))

    def status(self) -> dict[str, Any]:
        """Pools and pods as JSON-ready data (``splitserve status``)."""
        now = self._clock()
        with self._lock:
            return {"pools": {role: {
                "replicas": pool.replicas, "revision": pool.revision, "restarts": pool.restarts,
                "ready": sum(p.phase is PodPhase.READY for p in pool.pods),
                "converged": pool.converged(),
                "backoff_s": round(max(0.0, pool.backoff.not_before - now), 3),
                "pods": [{"name": p.name, "state": p.phase.value, "revision": p.revision, "address": p.address,
                          "http_port": p.http_port, "pid": p.pid, "age_s": round(now - p.started_at, 1)}
                         for p in pool.pods],
            } for role, pool in self.pools.items()}}

    def live_pods(self) -> list[LocalPod]:
        with self._lock:
            return [p for pool in self.pools.values() for p in pool.pods]

    # -- the loop (one thread) --------------------------------------------------

    def reconcile(self) -> None:
        """One pass. Raises ``PodCrashedError`` for an exit while ``fail_fast``."""
        with self._lock:
            self._reap(self._clock())
            starting = [p for p in self.live_pods() if p.phase is PodPhase.STARTING]
        healthy = {p.name for p in starting if is_healthy(p.host, p.http_port, timeout=0.5)}
        with self._lock:
            now = self._clock()
            for pod in starting:
                if pod.name in healthy and pod in self.pools[pod.role].pods:
                    self.pools[pod.role].mark_ready(pod, now)
                    self._log(f"{pod.name} ready at {pod.address}")
            self._signal_draining(now)
            for pool in self.pools.values():
                plan = pool.plan(now)
                for _ in range(plan.start):
                    self._start(pool, now)
                for name in plan.drain:
                    pod = next(p for p in pool.pods if p.name == name)
                    pool.mark_draining(pod, now, self.timing.notice_s, self.timing.grace_s)
                    self._log(f"{pod.name} draining")
            self._write_pods_file()

    def stop_pods(self) -> None:
        """Mark every pod draining in the pods file (the caller then stops the processes)."""
        with self._lock:
            for pool in self.pools.values():
                for pod in pool.active:
                    pool.mark_draining(pod, self._clock(), 0.0, self.timing.grace_s)
            self._write_pods_file()

    # -- helpers ----------------------------------------------------------------

    def _check_pools(self, replicas: dict[str, int], what: str) -> None:
        if not self.scalable:
            raise ControlError(f"{what} needs the router's file discovery; this up runs a static pod list")
        unknown = sorted(set(replicas) - set(self.pools))
        if unknown:
            raise ControlError(f"no pool {', '.join(unknown)} in this up; its pools: {', '.join(self.pools)}")

    def _start(self, pool: PodPool, now: float) -> None:
        freed = self._freed_ports[pool.role]
        grpc_port, http_port = freed.pop(0) if freed else (free_port(self.host), free_port(self.host))
        pod = pool.new_pod(self.host, grpc_port, http_port, now)
        process = self.group.start(pod.name, list(self.launch.argv(pod)),
                                   log_path=self.launch.log_dir / f"{pod.name}.log")
        pod.pid = process.pid
        self._processes[pod.name] = process
        self._log(f"{pod.name} starting (revision {pod.revision}, pid {pod.pid})")

    def _reap(self, now: float) -> None:
        exited = {p.name: p for p in self.group.reap()}
        for pool in self.pools.values():
            for pod in list(pool.pods):
                process = exited.get(pod.name)
                if process is None:
                    continue
                del self._processes[pod.name]
                code = process.popen.returncode
                if pod.phase is PodPhase.DRAINING:
                    pool.remove(pod, now)
                    self._log(f"{pod.name} exited with code {code} after draining; removed")
                    continue
                if self.fail_fast:
                    raise PodCrashedError(f"{pod.name} exited with code {code} before it was ready; "
                                          f"see {process.log_path}")
                delay = pool.remove(pod, now)
                if not self.scalable:
                    self._freed_ports[pool.role].append((pod.grpc_port, pod.http_port))  # same address
                self._log(f"{pod.name} exited with code {code}; replacing it in {delay:.1f}s "
                          f"(see {process.log_path})")

    def _signal_draining(self, now: float) -> None:
        for pod in self.live_pods():
            process = self._processes.get(pod.name)
            if pod.phase is not PodPhase.DRAINING or process is None:
                continue
            if not pod.terminated and pod.terminate_at is not None and now >= pod.terminate_at:
                pod.terminated = True
                self.group.signal(process, signal.SIGTERM)
            elif pod.kill_at is not None and now >= pod.kill_at:
                self._log(f"{pod.name} still running {self.timing.grace_s:.0f}s after SIGTERM; killing it")
                self.group.signal(process, signal.SIGKILL)

    def _write_pods_file(self) -> None:
        entries = [PodsFileEntry(p.role, p.address, "draining" if p.phase is PodPhase.DRAINING else "ready")
                   for p in self.live_pods() if p.ready_at is not None]
        if self.pods_file is not None and entries != self._written:
            write_pods_file(self.pods_file, entries)
            self._written = entries
