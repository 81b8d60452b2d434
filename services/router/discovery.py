"""Where the router learns its pods: the ``--discovery`` config, the feed
every source publishes through, and the ``static`` source.

A source runs as one task for the router's life and publishes *full*
snapshots (``DiscoveryFeed.publish``); the ``PodRegistry`` diffs them. A
source that cannot read its input calls ``DiscoveryFeed.failed`` and keeps
its last good view: nothing is removed because a read failed.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from splitserve.router.membership import POOLS, DiscoveredPod, Snapshot, check_address
from splitserve.router.metrics import RouterMetrics
from splitserve.router.pod_registry import PodRegistry

logger = logging.getLogger(__name__)

DISCOVERY_KINDS = ("static", "file", "dns", "kubernetes")


@dataclass(frozen=True)
class DiscoveryConfig:
    """``--discovery`` and its flags, validated once.

    static: ``prefill``/``decode``/``unified`` are ``HOST:PORT`` lists.
    file: ``file`` is the JSON ``splitserve up`` rewrites (polled every
    ``file_poll_s`` and re-read every ``reconcile_s``).
    dns: ``*_service`` are ``HOST:PORT`` of headless Service names, resolved
    every ``dns_interval_s``.
    kubernetes: ``*_service`` are Service names in ``namespace`` (None: the
    pod's own, else "default"), port ``grpc_port_name`` of their
    EndpointSlices, a full LIST every ``reconcile_s``.
    Either unified or prefill + decode (file discovery: whatever the file says).
    """

    kind: str = "static"
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    unified: tuple[str, ...] = ()
    file: str | None = None
    prefill_service: str | None = None
    decode_service: str | None = None
    unified_service: str | None = None
    namespace: str | None = None
    grpc_port_name: str = "grpc"
    reconcile_s: float = 30.0
    file_poll_s: float = 0.2
    dns_interval_s: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in DISCOVERY_KINDS:
            raise ValueError(f"--discovery must be one of {', '.join(DISCOVERY_KINDS)}, got {self.kind!r}")
        if self.reconcile_s <= 0 or self.file_poll_s <= 0 or self.dns_interval_s <= 0:
            raise ValueError("--reconcile-seconds and the poll intervals must be > 0")
        services = {k: v for k, v in self.services().items() if v}
        if self.kind != "static" and (self.prefill or self.decode or self.unified):
            raise ValueError("--prefill/--decode/--unified addresses need --discovery static")
        if self.kind not in ("dns", "kubernetes") and services:
            raise ValueError("--prefill-service/--decode-service/--unified-service need "
                             "--discovery dns or kubernetes")
        if self.kind == "file":
            if not self.file:
                raise ValueError("--discovery file needs --discovery-file PATH")
        elif self.file:
            raise ValueError("--discovery-file needs --discovery file")
        if self.kind == "static":
            _check_shape({r: bool(getattr(self, r)) for r in POOLS}, "--prefill and --decode", "--unified")
            pods = self.prefill + self.decode + self.unified
            if len(set(pods)) != len(pods):
                raise ValueError(f"a pod address is listed twice: {', '.join(pods)}")
            for address in pods:
                check_address(address)
        elif self.kind in ("dns", "kubernetes"):
            _check_shape({r: r in services for r in POOLS}, "--prefill-service and --decode-service",
                         "--unified-service")
            if self.kind == "dns":
                for role, target in services.items():
                    try:
                        check_address(target)
                    except ValueError:
                        raise ValueError(f"--{role}-service {target!r}: dns discovery needs the "
                                         "headless Service's HOST:PORT") from None
            if not self.grpc_port_name:
                raise ValueError("--grpc-port-name must not be empty")

    def services(self) -> dict[str, str | None]:
        return {"prefill": self.prefill_service, "decode": self.decode_service,
                "unified": self.unified_service}

    def configured_roles(self) -> frozenset[str]:
        """The pools the flags name (file discovery: none until the file says)."""
        if self.kind == "static":
            return frozenset(r for r in POOLS if getattr(self, r))
        return frozenset(r for r, s in self.services().items() if s)


def _check_shape(given: Mapping[str, bool], pd: str, unified: str) -> None:
    if given["unified"] and (given["prefill"] or given["decode"]):
        raise ValueError(f"give either {unified} or {pd}, not both")
    if not given["unified"] and not (given["prefill"] and given["decode"]):
        raise ValueError(f"need {pd}, or {unified}")


class DiscoveryFeed:
    """What a source talks to: snapshots into the registry, failures counted
    (``splitserve:discovery_errors_total``) and logged once per state change
    (a source failing every poll logs when it starts and when it recovers)."""

    def __init__(self, registry: PodRegistry, metrics: RouterMetrics, source: str) -> None:
        self.registry = registry
        self.metrics = metrics
        self.source = source
        self.failing: str | None = None
        self.published = asyncio.Event()  # set once a first good snapshot arrived

    def publish(self, snapshot: Snapshot, origin: str = "watch", healthy: bool = True) -> None:
        """Apply a full snapshot. ``healthy`` False: part of the source still
        fails (its part of the snapshot is the last good one)."""
        if self.failing is not None and healthy:
            logger.info("discovery (%s) recovered", self.source)
            self.failing = None
        self.registry.apply(snapshot, origin)
        self.published.set()

    def failed(self, reason: str) -> None:
        """Count a failed read; the last good view stays. Logged when the
        source starts failing, not again until it has recovered."""
        self.metrics.discovery_errors.labels(self.source).inc()
        if self.failing is None:
            logger.warning("discovery (%s) failed, keeping the last good view of %d pod(s): %s",
                           self.source, len(self.registry.membership.pods), reason)
        self.failing = reason


class DiscoverySource(Protocol):
    """A source: ``run`` publishes snapshots until cancelled (never returns
    on its own; failures go to ``feed.failed``)."""

    name: str

    async def run(self, feed: DiscoveryFeed) -> None: ...


class StaticDiscovery:
    """The pods given on the command line, published once."""

    name = "static"

    def __init__(self, config: DiscoveryConfig) -> None:
        self.snapshot = Snapshot.of(DiscoveredPod(role, address)
                                    for role in POOLS for address in getattr(config, role))

    async def run(self, feed: DiscoveryFeed) -> None:
        feed.publish(self.snapshot)
        await asyncio.Event().wait()


def make_source(config: DiscoveryConfig) -> DiscoverySource:
    """The source ``config.kind`` names (imports the kubernetes client only when used)."""
    if config.kind == "static":
        return StaticDiscovery(config)
    if config.kind == "file":
        from splitserve.router.discovery_file import FileDiscovery
        return FileDiscovery(config.file or "", config.file_poll_s, config.reconcile_s)
    if config.kind == "dns":
        from splitserve.router.discovery_dns import DnsDiscovery
        return DnsDiscovery({r: s for r, s in config.services().items() if s}, config.dns_interval_s)
    from splitserve.router.discovery_kubernetes import KubernetesDiscovery
    return KubernetesDiscovery.from_config(config)
