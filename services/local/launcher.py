"""``splitserve up``: router + prefill + decode (or unified) pods as local
processes, with the same code paths as on Kubernetes (gRPC + NIXL over shared
memory), kept the way Deployments keep their pods.

Each pool is held at its replica count by a ``DeploymentController``: a pod
that dies is replaced (exponential back-off) while the router routes around
it; ``splitserve scale`` / ``rollout restart`` (through the control endpoint,
``control.json`` in the state dir) change a pool while it serves. The router
follows the pods through ``--discovery file`` (the launcher rewrites
``pods.json``). Only a router or launcher failure ends ``up``; Ctrl-C stops
everything, leaving no orphans.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitserve.local.control_server import ControlServer
from splitserve.local.controller import RECONCILE_INTERVAL_S, DeploymentController, DrainTiming, PodLaunch
from splitserve.local.pod_pool import CrashBackoff, LocalPod, PodPool
from splitserve.local.probes import free_port, is_healthy, router_pod_states
from splitserve.local.process_group import ManagedProcess, ProcessGroup
from splitserve.local.state_dir import PODS_FILE, ControlInfo, default_state_dir

__all__ = ["LocalCluster", "LocalClusterConfig", "PodEndpoint", "free_port", "is_healthy", "run_until_interrupted"]
DISCOVERY = ("file", "static")


@dataclass
class LocalClusterConfig:
    """What ``splitserve up`` starts. ``num_unified > 0`` is the colocated
    baseline (no prefill/decode pods). ``discovery`` "file": the router
    follows ``pods.json`` (pools scale, roll and heal); "static": the router
    gets a fixed address list (a crashed pod comes back on its old ports;
    no scale, no rollout). Pools may start at 0 only with file discovery."""

    model: str
    num_prefill: int = 1
    num_decode: int = 1
    num_unified: int = 0
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str | None = None
    engine_args: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None
    state_dir: Path | None = None
    ready_timeout_seconds: float = 300.0
    discovery: str = "file"
    min_ready_seconds: float = 1.0
    drain_notice_seconds: float = 0.5
    termination_grace_seconds: float = 120.0
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.discovery not in DISCOVERY:
            raise ValueError(f"discovery must be one of {', '.join(DISCOVERY)}, got {self.discovery!r}")
        if min(self.num_prefill, self.num_decode, self.num_unified) < 0:
            raise ValueError("pod counts must be >= 0")
        if self.num_unified > 0:
            self.num_prefill = self.num_decode = 0
        elif self.discovery == "static" and (self.num_prefill < 1 or self.num_decode < 1):
            raise ValueError("need at least one prefill and one decode pod (--prefill N --decode M), "
                             "or unified pods (--unified K)")
        elif self.num_prefill + self.num_decode == 0:
            raise ValueError("no pods: ask for prefill/decode pods (--prefill N --decode M) or --unified K")
        for name in ("min_ready_seconds", "drain_notice_seconds", "termination_grace_seconds",
                     "backoff_base_seconds", "backoff_max_seconds", "ready_timeout_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    @property
    def replicas(self) -> dict[str, int]:
        if self.num_unified:
            return {"unified": self.num_unified}
        return {"prefill": self.num_prefill, "decode": self.num_decode}


@dataclass(frozen=True)
class PodEndpoint:
    role: str
    index: int
    grpc_port: int
    http_port: int

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


@dataclass
class LocalCluster:
    """The running processes of one ``splitserve up``. ``start`` returns once
    every pod and the router are ready; from then on a background thread
    reconciles the pools until ``stop`` (or until the router or the
    controller fails: ``failure`` then says why)."""

    config: LocalClusterConfig
    group: ProcessGroup = field(default_factory=ProcessGroup)
    router_group: ProcessGroup = field(default_factory=ProcessGroup)
    log_dir: Path = field(init=False)
    state_dir: Path = field(init=False)
    controller: DeploymentController = field(init=False)
    control: ControlServer | None = field(init=False, default=None)
    router: ManagedProcess | None = field(init=False, default=None)
    failure: str | None = field(init=False, default=None)
    log: Callable[[str], None] = field(default=lambda line: print(f"up: {line}", file=sys.stderr, flush=True))

    def __post_init__(self) -> None:
        cfg = self.config
        self.log_dir = cfg.log_dir or Path(tempfile.mkdtemp(prefix="splitserve-up-"))
        self.state_dir = cfg.state_dir or default_state_dir(cfg.port)
        backoff = dict(base_s=cfg.backoff_base_seconds, max_s=cfg.backoff_max_seconds)
        pools = [PodPool(role, n, cfg.min_ready_seconds, CrashBackoff(**backoff))
                 for role, n in cfg.replicas.items()]
        self.controller = DeploymentController(
            pools, self.group, PodLaunch(self._pod_argv, self.log_dir), cfg.host,
            self.pods_file if cfg.discovery == "file" else None,
            DrainTiming(cfg.drain_notice_seconds, cfg.termination_grace_seconds),
            scalable=cfg.discovery == "file", log=lambda line: self.log(line))
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}/v1"

    @property
    def pods_file(self) -> Path:
        return self.state_dir / PODS_FILE

    @property
    def pods(self) -> list[PodEndpoint]:
        """Every pod process alive now (starting, ready or draining)."""
        return [PodEndpoint(p.role, p.index, p.grpc_port, p.http_port) for p in self.controller.live_pods()]

    def start(self) -> None:
        """Start every pod, then the router; return once all report healthy.
        Raises ``RuntimeError`` (after stopping everything) if a pod exits
        before it is ready, or the readiness timeout passes."""
        cfg = self.config
        self.state_dir.mkdir(parents=True, exist_ok=True)
        other = ControlInfo.read(self.state_dir)
        if other is not None and other.pid != os.getpid():
            raise RuntimeError(f"another splitserve up (pid {other.pid}) runs with state in {self.state_dir}")
        try:
            self.control = ControlServer(self.controller, status=self.status)
            self.control.start()
            ControlInfo(self.control.url, os.getpid(), cfg.port).write(self.state_dir)
            self._wait("pods", self._pods_ready)
            self.router = self.router_group.start("router", self._router_argv(),
                                                  log_path=self.log_dir / "router.log")
            self._wait("router", self._router_ready)
            self.controller.fail_fast = False
            self._thread = threading.Thread(target=self._reconcile_forever, name="up-controller", daemon=True)
            self._thread.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.router_group.stop_all()
        self.controller.stop_pods()
        self.group.stop_all()
        if self.control is not None:
            self.control.close()
            (self.state_dir / "control.json").unlink(missing_ok=True)
            self.control = None

    # -- local kubectl (also reachable through the control endpoint) ---------------

    def scale(self, **replicas: int) -> None:
        self.controller.scale(replicas)

    def rollout_restart(self, role: str) -> None:
        self.controller.rollout_restart(role)

    def wait_converged(self, roles: list[str] | None = None, timeout: float = 180.0) -> None:
        """Until the pools are scaled/rolled out and the router sees their ready pods."""
        self._wait("pools", lambda: all(p["converged"] for role, p in self.status()["pools"].items()
                                        if roles is None or role in roles), timeout)

    def status(self) -> dict[str, Any]:
        """The controller's pools and pods plus the router's view: a pool is
        ``converged`` only once the router lists exactly its ready pods as
        ready and none as draining (``splitserve scale --wait`` waits for that)."""
        status = self.controller.status()
        seen = router_pod_states(self.config.host, self.config.port)
        status["router"] = {"url": self.base_url, "pid": self.router.pid if self.router else None,
                            "pods": seen or {}}
        if seen is not None:
            for role, pool in status["pools"].items():
                view = seen.get(role, {})
                pool["router_ready"] = view.get("ready", 0)
                pool["converged"] = (pool["converged"] and view.get("ready", 0) == pool["ready"]
                                     and not view.get("draining", 0))
        return status

    # -- helpers -----------------------------------------------------------------------

    def _wait(self, what: str, done: Callable[[], bool], timeout: float | None = None) -> None:
        limit = self.config.ready_timeout_seconds if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not done():
            if self.failure is not None:
                raise RuntimeError(self.failure)
            if self.router is not None and not self.router.is_running():
                raise RuntimeError(f"the router exited with code {self.router.returncode}; "
                                   f"see {self.router.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {limit:.0f}s; logs in {self.log_dir}")
            time.sleep(RECONCILE_INTERVAL_S)

    def _pods_ready(self) -> bool:
        self.controller.reconcile()
        return self.controller.converged()

    def _router_ready(self) -> bool:
        self.controller.reconcile()
        return (is_healthy(self.config.host, self.config.port)
                and all(p["converged"] for p in self.status()["pools"].values()))

    def _reconcile_forever(self) -> None:
        while not self._stopping.wait(RECONCILE_INTERVAL_S):
            try:
                self.controller.reconcile()
            except Exception as exc:  # noqa: BLE001 - reported; `up` ends on it
                self.failure = f"the launcher's controller failed: {exc!r}"
                return
            if self.router is not None and not self.router.is_running():
                self.failure = (f"the router exited with code {self.router.returncode}; "
                                f"see {self.router.log_path}")
                return

    def _pod_argv(self, pod: LocalPod) -> list[str]:
        cfg = self.config
        return [sys.executable, "-m", "splitserve", "serve", pod.role, "--model", cfg.model,
                "--host", cfg.host, "--port", str(pod.grpc_port), "--http-port", str(pod.http_port),
                *cfg.engine_args]

    def _router_argv(self) -> list[str]:
        cfg = self.config
        argv = [sys.executable, "-m", "splitserve", "router", "--model", cfg.model,
                "--host", cfg.host, "--port", str(cfg.port)]
        if cfg.discovery == "file":
            argv += ["--discovery", "file", "--discovery-file", str(self.pods_file)]
        else:
            for role in cfg.replicas:
                argv += [f"--{role}", ",".join(p.address for p in self.controller.live_pods() if p.role == role)]
        if cfg.policy:
            argv += ["--policy", cfg.policy]
        return argv + list(cfg.router_args)


def run_until_interrupted(cluster: LocalCluster) -> int:
    """Start the cluster, print how to use it, block until Ctrl-C/SIGTERM or
    the router/launcher fails (a pod dying is not a failure: it is replaced);
    stop everything. Returns the process exit code."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        cluster.start()
        cfg = cluster.config
        shape = " + ".join(f"{n} {role}" for role, n in cfg.replicas.items())
        print(f"splitserve is up: router + {shape} pods (logs: {cluster.log_dir})", flush=True)
        print(f"OpenAI base URL: {cluster.base_url}", flush=True)
        print(f"try: curl {cluster.base_url}/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{cfg.model}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'", flush=True)
        if cfg.discovery == "file":
            pool = next(iter(cfg.replicas))
            print(f"pods: splitserve status --port {cfg.port}; splitserve scale {pool}=N --port {cfg.port}; "
                  f"splitserve rollout restart {pool} --port {cfg.port}", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        while not stop.wait(0.5):
            if cluster.failure is not None:
                print(f"{cluster.failure}; stopping", file=sys.stderr, flush=True)
                return 1
        return 0
    except RuntimeError as exc:
        print(f"splitserve up failed: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("stopped.", flush=True)
