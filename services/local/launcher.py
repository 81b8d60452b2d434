"""``splitserve up``: router + prefill + decode (or unified) pods as local
processes, with the same code paths as on Kubernetes (gRPC + NIXL over shared
memory). Prints the OpenAI base URL once every process is ready; Ctrl-C (or a
child dying) stops everything, leaving no orphans."""
from __future__ import annotations

import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from splitserve.local.process_group import ProcessGroup


@dataclass
class LocalClusterConfig:
    """What ``splitserve up`` starts. ``num_unified > 0`` is the colocated
    baseline (no prefill/decode pods)."""

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
    ready_timeout_seconds: float = 300.0

    def __post_init__(self) -> None:
        if min(self.num_prefill, self.num_decode, self.num_unified) < 0:
            raise ValueError("pod counts must be >= 0")
        if self.num_unified > 0:
            self.num_prefill = self.num_decode = 0
        elif self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError(
                "need at least one prefill and one decode pod (--prefill N --decode M), "
                "or unified pods (--unified K)"
            )


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
    """The running processes of one ``splitserve up``."""

    config: LocalClusterConfig
    group: ProcessGroup = field(default_factory=ProcessGroup)
    pods: list[PodEndpoint] = field(default_factory=list)
    log_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_dir = self.config.log_dir or Path(tempfile.mkdtemp(prefix="splitserve-up-"))

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}/v1"

    def start(self) -> None:
        """Start every pod, then the router; return once all report healthy.
        Raises ``RuntimeError`` (after stopping everything) if one exits or the
        readiness timeout passes."""
        cfg = self.config
        roles = [("prefill", cfg.num_prefill), ("decode", cfg.num_decode), ("unified", cfg.num_unified)]
        try:
            for role, count in roles:
                for index in range(count):
                    pod = PodEndpoint(role, index, free_port(cfg.host), free_port(cfg.host))
                    self.pods.append(pod)
                    self.group.start(pod.name, self._pod_argv(pod), log_path=self.log_dir / f"{pod.name}.log")
            self._wait_ready([(p.name, p.http_port) for p in self.pods])
            self.group.start("router", self._router_argv(), log_path=self.log_dir / "router.log")
            self._wait_ready([("router", cfg.port)])
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.group.stop_all()

    def _pod_argv(self, pod: PodEndpoint) -> list[str]:
        return [
            sys.executable, "-m", "splitserve", "serve", pod.role,
            "--model", self.config.model,
            "--host", self.config.host,
            "--port", str(pod.grpc_port),
            "--http-port", str(pod.http_port),
            *self.config.engine_args,
        ]

    def _router_argv(self) -> list[str]:
        cfg = self.config

        def addresses(role: str) -> str:
            return ",".join(f"{cfg.host}:{p.grpc_port}" for p in self.pods if p.role == role)

        argv = [sys.executable, "-m", "splitserve", "router", "--model", cfg.model,
                "--host", cfg.host, "--port", str(cfg.port)]
        if cfg.num_unified:
            argv += ["--unified", addresses("unified")]
        else:
            argv += ["--prefill", addresses("prefill"), "--decode", addresses("decode")]
        if cfg.policy:
            argv += ["--policy", cfg.policy]
        return argv + list(cfg.router_args)

    def _wait_ready(self, targets: Sequence[tuple[str, int]]) -> None:
        deadline = time.monotonic() + self.config.ready_timeout_seconds
        pending = dict(targets)
        while pending:
            exited = self.group.first_exited()
            if exited is not None:
                raise RuntimeError(
                    f"{exited.name} exited with code {exited.popen.returncode} before it was ready; "
                    f"see {exited.log_path}"
                )
            for name, port in list(pending.items()):
                if is_healthy(self.config.host, port):
                    del pending[name]
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"not ready after {self.config.ready_timeout_seconds:.0f}s: {', '.join(pending)}; "
                    f"logs in {self.log_dir}"
                )
            time.sleep(0.2)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def is_healthy(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def run_until_interrupted(cluster: LocalCluster) -> int:
    """Start the cluster, print how to use it, block until Ctrl-C/SIGTERM or a
    child dies; stop everything. Returns the process exit code."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        cluster.start()
        shape = (f"{cluster.config.num_unified} unified" if cluster.config.num_unified
                 else f"{cluster.config.num_prefill} prefill + {cluster.config.num_decode} decode")
        print(f"splitserve is up: router + {shape} pods (logs: {cluster.log_dir})", flush=True)
        print(f"OpenAI base URL: {cluster.base_url}", flush=True)
        print(
            f"try: curl {cluster.base_url}/completions -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{cluster.config.model}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'",
            flush=True,
        )
        print("Ctrl-C stops everything.", flush=True)
        while not stop.wait(0.5):
            exited = cluster.group.first_exited()
            if exited is not None:
                print(f"{exited.name} exited with code {exited.popen.returncode}; stopping "
                      f"(see {exited.log_path})", file=sys.stderr, flush=True)
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
