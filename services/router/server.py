"""The router process: tokenizer, settings, PodRouter, orchestrator, the live
pod registry fed by one discovery source, the request queue, the KEDA
scaler and the OpenAI app, served by an embedded uvicorn until asked to stop."""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from splitserve.grpc_tls import GrpcTLS
from splitserve.http_server import HTTPTLS, EmbeddedHTTPServer
from splitserve.router.app import create_app
from splitserve.router.discovery import DiscoveryConfig, DiscoveryFeed, DiscoverySource, make_source
from splitserve.router.metrics import RouterMetrics
from splitserve.router.orchestrator import Orchestrator, OrchestratorConfig
from splitserve.router.pd_client import PodClient
from splitserve.router.pod_channels import PodChannels
from splitserve.router.pod_registry import PodRegistry
from splitserve.router.pod_state import PodPool
from splitserve.router.pod_watcher import PodWatcher, WatcherConfig
from splitserve.router.policies import DecodePolicy, make_policy
from splitserve.router.prefill_rate import PrefillRate
from splitserve.router.request_queue import QueueConfig, RequestQueue
from splitserve.router.request_tracker import RequestTracker
from splitserve.router.routing import PodRouter
from splitserve.router.scaler_core import ScalerCore
from splitserve.router.scaler_servicer import ScalerServer
from splitserve.router.serving import OpenAIServing
from splitserve.router.settings import settings_from_env
from splitserve.startup_heap import freeze_startup_heap

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    """Everything ``splitserve router`` takes. Pods come from ``discovery``;
    without one, ``prefill`` and ``decode`` (host:port lists) or ``unified``
    make a static one. ``served_model_names`` default to ``(model,)`` as in
    vLLM; ``max_prompt_tokens`` to the model's ``max_position_embeddings``.
    ``block_size`` must equal the pods'. ``scaler_port`` 0: no KEDA scaler.
    ``shutdown_grace_s``: how long open streams may run after SIGTERM.
    ``host``: one bind address or a comma-separated list (on Kubernetes the
    pod IP plus 127.0.0.1, so ``kubectl port-forward`` still reaches it).
    ``http_tls``: HTTPS on the OpenAI port; ``grpc_tls``: TLS (mutual with a
    CA) on the channels to the pods."""

    model: str
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    unified: tuple[str, ...] = ()
    discovery: DiscoveryConfig | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "kv_affinity"
    load_factor: float = 1.25
    pd_threshold_tokens: int = 64
    block_size: int = 16
    served_model_names: tuple[str, ...] = ()
    max_prompt_tokens: int | None = None
    max_tokens_limit: int | None = None
    poll_interval_s: float = 0.2
    load_heartbeat_s: float = 1.0
    kv_event_interval_s: float = 0.02
    scaler_port: int = 0
    max_queued_requests: int = 256
    queue_timeout_s: float = 60.0
    shutdown_grace_s: float = 30.0
    http_tls: HTTPTLS | None = None
    grpc_tls: GrpcTLS | None = None
    settings_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.discovery is None:
            object.__setattr__(self, "discovery", DiscoveryConfig(
                "static", prefill=self.prefill, decode=self.decode, unified=self.unified))
        elif self.prefill or self.decode or self.unified:
            raise ValueError("give pod addresses in the DiscoveryConfig, not both")
        if not self.hosts:
            raise ValueError(f"--host must name at least one address, got {self.host!r}")
        if not 0 <= self.scaler_port < 65536:
            raise ValueError(f"--scaler-port must be in 0..65535, got {self.scaler_port}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"--shutdown-grace-seconds must be >= 0, got {self.shutdown_grace_s}")
        QueueConfig(self.max_queued_requests, self.queue_timeout_s)  # validates

    @property
    def hosts(self) -> tuple[str, ...]:
        """The addresses to bind (``host`` split on commas)."""
        return tuple(h.strip() for h in self.host.split(",") if h.strip())

    @property
    def pods(self) -> DiscoveryConfig:
        """The discovery config (always set after construction)."""
        discovery = self.discovery
        if discovery is None:
            raise RuntimeError("RouterConfig.discovery is set in __post_init__")
        return discovery


@dataclass
class RouterParts:
    """The built router, not yet serving (tests drive ``app`` directly)."""

    app: FastAPI
    serving: OpenAIServing
    orchestrator: Orchestrator
    watcher: PodWatcher
    metrics: RouterMetrics
    registry: PodRegistry
    feed: DiscoveryFeed
    source: DiscoverySource
    queue: RequestQueue
    scaler: ScalerCore


def build_router(config: RouterConfig, tokenizer: Any = None) -> RouterParts:
    """Load the tokenizer (unless given) and wire everything; no I/O besides
    reading the model folder, no tasks started."""
    from splitserve.engine.tokenizer import eos_token_ids, load_tokenizer

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    overrides: dict[str, Any] = {
        "served_model_names": config.served_model_names or (config.model,),
        "block_size": config.block_size,
        "model_root": config.model,
        "max_prompt_tokens": config.max_prompt_tokens or _max_positions(config.model) or 32768,
    }
    if config.max_tokens_limit is not None:
        overrides["max_tokens_limit"] = config.max_tokens_limit
    settings = settings_from_env(**{**overrides, **config.settings_overrides})
    metrics = RouterMetrics()
    router = PodRouter(make_policy(config.policy, config.block_size, config.load_factor),
                       DecodePolicy(config.block_size, config.load_factor),
                       PodPool(), PodPool(), metrics, unified_pods=PodPool())
    channels = PodChannels(functools.partial(PodClient, tls=config.grpc_tls))
    rate = PrefillRate()
    orchestrator = Orchestrator(router, channels, OrchestratorConfig(
        block_size=config.block_size, pd_threshold_tokens=config.pd_threshold_tokens,
        eos_token_ids=eos_token_ids(config.model, tokenizer)), metrics, prefill_observer=rate)
    watcher = PodWatcher(router, channels, {}, WatcherConfig(poll_interval_s=config.poll_interval_s,
                                                             load_heartbeat_s=config.load_heartbeat_s,
                                                             kv_event_interval_s=config.kv_event_interval_s))
    registry = PodRegistry(router, channels, watcher, metrics, config.pods.kind,
                           config.pods.configured_roles())
    source = make_source(config.pods)
    feed = DiscoveryFeed(registry, metrics, source.name)
    scaler = ScalerCore(router, rate, metrics)
    queue = RequestQueue(router, lambda: registry.roles, QueueConfig(
        config.max_queued_requests, config.queue_timeout_s,
        pd_threshold_tokens=config.pd_threshold_tokens), metrics, listener=scaler)
    scaler.queue = queue.waiting
    serving = OpenAIServing(orchestrator, tokenizer, settings, metrics)

    def ready() -> bool:
        return not queue.stopping and (queue.can_start() or queue.has_room())

    app = create_app(serving, settings, ready=ready, admission=queue)
    return RouterParts(app, serving, orchestrator, watcher, metrics, registry, feed, source, queue, scaler)


def _max_positions(model: str) -> int | None:
    path = Path(model) / "config.json"
    if not path.exists():
        return None
    value = json.loads(path.read_text()).get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 1 else None


async def serve(config: RouterConfig, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set or SIGINT/SIGTERM arrives, then drain:
    new requests get 503 (``Retry-After``) and ``/health`` 503, queued ones
    are released with a 503, open streams get ``shutdown_grace_s`` to end
    and are cut after it; then everything closes and this returns."""
    parts = build_router(config)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    discovery = asyncio.create_task(parts.source.run(parts.feed), name=f"discovery:{parts.source.name}")
    tracker = RequestTracker(parts.app)
    https = [EmbeddedHTTPServer(tracker, host, config.port, tls=config.http_tls, coalesce_writes=True)
             for host in config.hosts]
    scaler = ScalerServer(parts.scaler, config.host, config.scaler_port) if config.scaler_port else None
    try:
        for http in https:
            await http.start()
        if scaler is not None:
            await scaler.start()
        freeze_startup_heap()
        logger.info("router on %s://%s:%d/v1 (discovery %s, policy %s%s)",
                    "https" if config.http_tls else "http", config.host, config.port,
                    config.pods.kind, config.policy,
                    f", KEDA scaler on :{scaler.port}" if scaler is not None else "")
        stop_wait = asyncio.create_task(stop.wait())
        await asyncio.wait({stop_wait, discovery}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if discovery.done():
            discovery.result()  # a source ends only by failing (e.g. no cluster config): say why
        logger.info("stopping: new requests get 503; open requests have %.0f s", config.shutdown_grace_s)
        parts.queue.stop()
        if not await tracker.wait_idle(config.shutdown_grace_s):
            logger.warning("grace period over: cutting %d open request(s)", await tracker.cut())
    finally:
        discovery.cancel()
        await asyncio.gather(discovery, return_exceptions=True)
        if scaler is not None:
            await scaler.stop()
        for http in https:
            await http.stop()
        await parts.watcher.stop()
        await parts.orchestrator.aclose()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
