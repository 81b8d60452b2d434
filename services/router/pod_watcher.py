"""Keeps ``PodRouter``'s view of the pods fresh: polls each pod's ``GetLoad``
(load and readiness) and follows its ``StreamKVEvents`` (prefix index)."""
from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from splitserve.router.pd_client import LoadSnapshot, PodCallError, PodClient
from splitserve.router.routing import PodRouter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatcherConfig:
    """``poll_interval_s``: GetLoad period. ``max_missed_polls``: failed polls
    in a row before a pod is taken out of rotation. KV event streams reconnect
    after ``backoff_min_s``, doubling to ``backoff_max_s``."""

    poll_interval_s: float = 0.2
    poll_timeout_s: float = 1.0
    max_missed_polls: int = 1
    backoff_min_s: float = 0.1
    backoff_max_s: float = 2.0


class PodWatcher:
    """One poll task and one KV-event task per pod.

    ``pods`` maps each pod id to its ``PodRouter`` role (the pool it sits in):
    the pods ``start`` watches; ``add``/``remove`` change the set while the
    router serves (discovery). Pods start not ready; a successful poll makes
    one ready, a failed one (or ``max_missed_polls`` of them) takes it out. A
    pod whose incarnation id changes (it restarted) has its prefix index
    cleared.
    """

    def __init__(self, router: PodRouter, clients: Mapping[str, PodClient], pods: Mapping[str, str],
                 config: WatcherConfig | None = None) -> None:
        self.router = router
        self.clients = clients
        self.pods = dict(pods)
        self.config = config or WatcherConfig()
        self._tasks: dict[str, tuple[asyncio.Task[None], ...]] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._incarnations: dict[str, str] = {}
        self.snapshots: dict[str, LoadSnapshot] = {}  # each watched pod's last GetLoad answer

    def start(self) -> None:
        for pod, role in self.pods.items():
            self._watch(pod, role)

    def add(self, pod: str, role: str) -> None:
        """Start watching ``pod`` (already in ``router.pools[role]``); it stays
        out of rotation until its first poll answers."""
        self.pods[pod] = role
        self._watch(pod, role)

    def remove(self, pod: str) -> None:
        """Stop watching ``pod`` at once (its tasks end in the background)."""
        self.pods.pop(pod, None)
        self._incarnations.pop(pod, None)
        self.snapshots.pop(pod, None)
        for task in self._tasks.pop(pod, ()):
            task.cancel()
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    def watching(self, pod: str) -> bool:
        return pod in self._tasks

    def _watch(self, pod: str, role: str) -> None:
        if pod in self._tasks:
            return
        self.router.pools[role].set_ready(pod, False)
        self._tasks[pod] = (asyncio.create_task(self._poll(pod, role), name=f"poll:{pod}"),
                            asyncio.create_task(self._follow_kv_events(pod, role), name=f"kv:{pod}"))

    async def stop(self) -> None:
        for pod in list(self._tasks):
            self.remove(pod)
        await asyncio.gather(*self._stopping, return_exceptions=True)

    def ready(self) -> bool:
        """At least one ready pod in every pool that has pods."""
        return all(pool.ready_pods() for pool in self.router.pools.values() if len(pool))

    async def poll_once(self, pod: str, role: str) -> bool:
        """Poll ``pod`` once and apply the result; True when it answered."""
        client = self.clients.get(pod)
        if client is None:
            return False  # removed while this poll was due
        try:
            snapshot = await client.get_load(timeout=self.config.poll_timeout_s)
        except PodCallError as exc:
            logger.debug("GetLoad failed: %s", exc)
            return False
        previous = self._incarnations.get(pod)
        if previous is not None and previous != snapshot.incarnation_id:
            logger.info("pod %s restarted (incarnation %s -> %s); clearing its prefix index",
                        pod, previous, snapshot.incarnation_id)
            self.router.on_kv_events(role, pod, cleared=True)
        self._incarnations[pod] = snapshot.incarnation_id
        self.router.update_load(role, pod, snapshot.load)
        self.snapshots[pod] = snapshot
        self.router.pools[role].set_ready(pod, True)
        return True

    async def _poll(self, pod: str, role: str) -> None:
        missed = 0
        was_ready = False
        phase = poll_phase(pod) * self.config.poll_interval_s
        while True:
            ok = await self.poll_once(pod, role)
            missed = 0 if ok else missed + 1
            if missed >= self.config.max_missed_polls:
                self.router.pools[role].set_ready(pod, False)
            if ok != was_ready:
                logger.info("pod %s (%s) is %s", pod, role, "ready" if ok else "not answering; out of rotation")
                was_ready = ok
            # The first poll is at once (a new pod gets ready fast); then each
            # pod keeps its own phase, so N pods found together are polled one
            # by one across the period, not as one burst of N RPCs (at 256 pods
            # ~100 ms of the router's loop at once, which requests queue behind).
            await asyncio.sleep(self.config.poll_interval_s + phase)
            phase = 0.0

    async def _follow_kv_events(self, pod: str, role: str) -> None:
        backoff = self.config.backoff_min_s
        while True:
            try:
                first = True
                client = self.clients.get(pod)
                if client is None:
                    return
                async for batch in client.kv_events():
                    self.router.on_kv_events(role, pod, batch.stored, batch.removed,
                                             cleared=batch.cleared)
                    if first:
                        backoff = self.config.backoff_min_s
                        first = False
            except PodCallError as exc:
                logger.debug("KV event stream of %s broke: %s", pod, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.backoff_max_s)


def poll_phase(pod: str) -> float:
    """The pod's fixed offset in the poll period, as a fraction in [0, 1):
    a hash of its id, so every router replica spreads the same way."""
    return zlib.crc32(pod.encode()) / 2**32
