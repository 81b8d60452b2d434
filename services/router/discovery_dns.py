"""``--discovery dns``: the A/AAAA records of headless Service names,
resolved every ``interval_s`` (for clusters where the router may not read
EndpointSlices). Each address is a ``ready`` candidate, routed once its
``GetLoad`` answers; DNS cannot say "draining", so a pod leaves when its
record does (its running streams still finish).

A name that does not exist, or has no address (a headless Service with no
ready pod: scaled to zero), is an empty pool, not an error. Any other
failure (resolver unreachable, timeout) keeps that pool's last good view.
"""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Mapping

from splitserve.router.discovery import DiscoveryFeed
from splitserve.router.membership import DiscoveredPod, Snapshot


class NoRecords(Exception):
    """The name has no A/AAAA record (NXDOMAIN or an empty answer)."""


Resolver = Callable[[str], Awaitable[list[str]]]


async def system_resolver(host: str) -> list[str]:
    """A and AAAA addresses of ``host`` through the system resolver."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise NoRecords(host) from None
        raise
    return sorted({str(info[4][0]) for info in infos})


class DnsDiscovery:
    """``services`` maps pool -> ``HOST:PORT`` of its headless Service;
    ``resolver`` is injectable (tests)."""

    name = "dns"

    def __init__(self, services: Mapping[str, str], interval_s: float = 2.0,
                 resolver: Resolver = system_resolver) -> None:
        self.services = dict(services)
        self.interval_s = interval_s
        self.resolver = resolver
        self._views: dict[str, list[DiscoveredPod]] = {role: [] for role in self.services}

    async def resolve_once(self, feed: DiscoveryFeed) -> None:
        """Resolve every name and publish; a failed name keeps its last view."""
        healthy = True
        for role, target in self.services.items():
            host, _, port = target.rpartition(":")
            try:
                addresses = await self.resolver(host)
            except NoRecords:
                addresses = []
            except Exception as exc:  # noqa: BLE001 - any resolver failure keeps the last good view
                feed.failed(f"resolving {host} ({role}): {exc.__class__.__name__}: {exc}")
                healthy = False
                continue
            try:
                self._views[role] = [DiscoveredPod(role, f"[{a}]:{port}" if ":" in a else f"{a}:{port}")
                                     for a in addresses]
            except ValueError as exc:
                feed.failed(f"resolving {host} ({role}) gave a bad address: {exc}")
                healthy = False
        try:
            snapshot = Snapshot.of(p for view in self._views.values() for p in view)
        except ValueError as exc:  # one address behind two pools' names
            feed.failed(str(exc))
            return
        feed.publish(snapshot, healthy=healthy)

    async def run(self, feed: DiscoveryFeed) -> None:
        while True:
            await self.resolve_once(feed)
            await asyncio.sleep(self.interval_s)
