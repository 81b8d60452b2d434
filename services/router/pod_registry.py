"""The router's live pod set: discovery snapshots applied to the pools, the
pod watcher and the channels, while the router serves."""
from __future__ import annotations

import logging
from collections.abc import Iterable

from splitserve.router.membership import POOLS, Membership, MembershipEvent, Snapshot
from splitserve.router.metrics import RouterMetrics
from splitserve.router.pod_channels import PodChannels
from splitserve.router.pod_watcher import PodWatcher
from splitserve.router.routing import PodRouter

logger = logging.getLogger(__name__)


class PodRegistry:
    """Feeds ``Membership``'s events to the router's parts.

    - added: a channel opens, the pod joins its pool *not ready* and the
      watcher polls it; its first answered ``GetLoad`` puts it in rotation.
    - draining: no new work; its running streams and leases go on.
    - ready: a draining pod back in rotation (once ready again).
    - removed: out of its pool and its prefix index dropped at once, its
      poll and KV-event tasks cancelled; its channel closes when the last
      request running on it ends (nothing is cancelled).

    ``roles`` are the pools this deployment uses: the configured ones plus any
    a snapshot ever named (file discovery learns them). Every discovery source
    calls ``apply`` with full snapshots, from the event loop; ``origin``
    ``reconcile`` marks a periodic full re-read, and whatever it changes is a
    repair (an event the source's faster path missed).
    """

    def __init__(self, router: PodRouter, channels: PodChannels, watcher: PodWatcher,
                 metrics: RouterMetrics, source: str, roles: Iterable[str] = ()) -> None:
        self.router = router
        self.channels = channels
        self.watcher = watcher
        self.metrics = metrics
        self.source = source
        self.membership = Membership()
        self._roles = set(roles)
        for pool in router.pools.values():
            pool.subscribe(self.update_gauges)
        self.update_gauges()

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(self._roles)

    def apply(self, snapshot: Snapshot, origin: str = "watch") -> list[MembershipEvent]:
        events = self.membership.apply(snapshot)
        self._roles |= snapshot.roles()
        for event in events:
            self._handle(event)
            self.metrics.discovery_events.labels(self.source, event.kind).inc()
            logger.info("discovery (%s): %s pod %s %s", self.source, event.pod.role, event.pod.address,
                        event.kind)
        if origin == "reconcile" and events:
            self.metrics.discovery_repairs.labels(self.source).inc(len(events))
            logger.warning("discovery (%s): the periodic full list repaired %d missed change(s)",
                           self.source, len(events))
        return events

    def _handle(self, event: MembershipEvent) -> None:
        pod, pool = event.pod, self.router.pools[event.pod.role]
        if event.kind == "added":
            self.channels.open(pod.address)
            pool.add(pod.address, ready=False, draining=pod.state == "draining")
            self.watcher.add(pod.address, pod.role)
        elif event.kind == "draining":
            pool.set_draining(pod.address, True)
        elif event.kind == "ready":
            pool.set_draining(pod.address, False)
        elif event.kind == "removed":
            self.watcher.remove(pod.address)
            pool.remove(pod.address)
            self.router.indexes[pod.role].drop_pod(pod.address)
            self.channels.retire(pod.address)
        else:
            raise ValueError(f"unknown membership event {event.kind!r}")

    def update_gauges(self) -> None:
        """Refresh ``splitserve:router_pods{pool,state}`` (run on every change)."""
        for role in POOLS:
            counts = {"ready": 0, "draining": 0, "not_ready": 0}
            for state in self.router.pools[role].pods():
                counts[state.state] += 1
            for label, value in counts.items():
                self.metrics.router_pods.labels(role, label).set(value)
