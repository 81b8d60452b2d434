"""Shared helpers of the membership, discovery and queue tests (no tests
here): the router's live core (registry, watcher, channels, orchestrator)
over real gRPC to fake Engine pods (test doubles, no model) whose GetLoad
can be held back, as a starting pod's is."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest_asyncio
from test_router_orchestrator_fakes import BLOCK, EOS, FakeCluster, FakeEngine

from splitserve.engine.block_hash import hash_prompt_blocks
from splitserve.engine.sampling_params import SamplingParams
from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.proto import splitserve_v1_pb2_grpc as pb_grpc
from splitserve.http_server import EmbeddedHTTPServer
from splitserve.router.backend import BackendRequest, TokenChunk
from splitserve.router.discovery import DiscoveryConfig
from splitserve.router.membership import DiscoveredPod, Snapshot
from splitserve.router.metrics import RouterMetrics
from splitserve.router.orchestrator import Orchestrator, OrchestratorConfig
from splitserve.router.pd_client import PodClient
from splitserve.router.pod_channels import PodChannels
from splitserve.router.pod_registry import PodRegistry
from splitserve.router.pod_state import PodPool
from splitserve.router.pod_watcher import PodWatcher, WatcherConfig
from splitserve.router.policies import DecodePolicy, make_policy
from splitserve.router.request_tracker import RequestTracker
from splitserve.router.routing import PodRouter
from splitserve.router.server import RouterConfig, RouterParts, build_router

LONG = tuple(range(1, 41))  # 10 blocks of 4


@dataclass
class GatedEngine(FakeEngine):
    """A fake pod whose GetLoad fails with UNAVAILABLE until ``answering``."""

    answering: bool = True

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.LoadReport:
        if not self.answering:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name}: still starting")
        return await super().GetLoad(request, context)


async def add_pod(cluster: FakeCluster, name: str, role: int, answering: bool = True,
                  host: str = "127.0.0.1", port: int = 0) -> GatedEngine:
    """A fake pod on ``host:port`` (port 0: a free one)."""
    engine = GatedEngine(name=name, role=role, peers=cluster.pods, answering=answering)
    server = grpc.aio.server()
    pb_grpc.add_EngineServicer_to_server(engine, server)
    port = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    engine.address = f"{host}:{port}"
    cluster.pods[engine.address] = engine
    cluster.servers.append(server)
    return engine


class RecordingClient(PodClient):
    """A real PodClient that records when its channel is closed."""

    def __init__(self, address: str, closed: list[str]) -> None:
        super().__init__(address)
        self._closed = closed

    async def close(self) -> None:
        self._closed.append(self.address)
        await super().close()


@dataclass
class LiveRouter:
    """The router's transport-free membership core wired as ``build_router``
    does, without HTTP: apply snapshots, run requests through the orchestrator."""

    source: str = "test"
    metrics: RouterMetrics = field(default_factory=RouterMetrics)
    closed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.router = PodRouter(make_policy("kv_affinity", BLOCK), DecodePolicy(BLOCK), PodPool(), PodPool(),
                                self.metrics, unified_pods=PodPool())
        self.channels = PodChannels(lambda address: RecordingClient(address, self.closed))
        self.watcher = PodWatcher(self.router, self.channels, {},
                                  WatcherConfig(poll_interval_s=0.02, backoff_min_s=0.02))
        self.registry = PodRegistry(self.router, self.channels, self.watcher, self.metrics, self.source)
        self.orch = Orchestrator(self.router, self.channels, OrchestratorConfig(
            block_size=BLOCK, pd_threshold_tokens=16, eos_token_ids=frozenset({EOS})), self.metrics,
            seed_source=lambda: 1234)

    def apply(self, *pods: tuple[str, FakeEngine] | tuple[str, FakeEngine, str], origin: str = "watch"):
        return self.registry.apply(Snapshot.of(
            DiscoveredPod(p[0], p[1].address, p[2] if len(p) > 2 else "ready") for p in pods), origin)

    def ready_ids(self, role: str) -> list[str]:
        return [p.pod_id for p in self.router.pools[role].ready_pods()]

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def run(self, request: BackendRequest) -> list[TokenChunk]:
        async with aclosing(self.orch.generate(request)) as chunks:
            return [c async for c in chunks]

    async def close(self) -> None:
        await self.watcher.stop()
        await self.orch.aclose()


def request(prompt: tuple[int, ...] = LONG, max_tokens: int = 6, rid: str = "r1") -> BackendRequest:
    params = SamplingParams(max_tokens=max_tokens, seed=7, temperature=1.0)
    return BackendRequest(rid, prompt, params, tuple(hash_prompt_blocks(prompt, BLOCK)))


async def until(condition: Callable[[], bool], what: str, steps: int = 1000, step_s: float = 0.01) -> None:
    """Wait for ``condition`` (bounded by steps, not a timing assertion)."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(step_s)
    raise AssertionError(f"never happened: {what}")


async def no_leaks(*engines: FakeEngine) -> None:
    """End of every test: no pod holds a lease or a running sequence (the
    fakes' stand-ins for KV blocks)."""
    await until(lambda: not any(e.leases or e.running for e in engines), "every lease and stream released")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def http_router(tokenizer: Any, tracker: bool = False, **config: Any) -> AsyncIterator[tuple[RouterParts, str]]:
    """``build_router``'s parts (file discovery, no source running: tests
    apply snapshots to ``parts.registry``) served over a real socket; yields
    the parts and the base URL. ``tracker`` puts the shutdown request
    tracker in front, as ``serve`` does (``parts.tracker``)."""
    config.setdefault("discovery", DiscoveryConfig("file", file="unused.json"))
    config.setdefault("block_size", BLOCK)
    config.setdefault("pd_threshold_tokens", 16)
    config.setdefault("poll_interval_s", 0.02)
    parts = build_router(RouterConfig(model="tiny", **config), tokenizer=tokenizer)
    app: Any = RequestTracker(parts.app) if tracker else parts.app
    parts.tracker = app if tracker else None  # type: ignore[attr-defined]
    port = free_port()
    server = EmbeddedHTTPServer(app, "127.0.0.1", port)
    await server.start()
    try:
        yield parts, f"http://127.0.0.1:{port}"
    finally:
        await server.stop()
        await parts.watcher.stop()
        await parts.orchestrator.aclose()


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[FakeCluster]:
    """Fake Engine pods on real gRPC ports, stopped after the test."""
    c = FakeCluster()
    yield c
    await c.stop()


def live_router_fixture(source: str = "test"):  # noqa: ANN201 - a pytest fixture
    """A ``live`` fixture: a ``LiveRouter`` whose metrics name ``source``."""
    @pytest_asyncio.fixture
    async def live() -> AsyncIterator[LiveRouter]:
        r = LiveRouter(source=source)
        yield r
        await r.close()

    return live
