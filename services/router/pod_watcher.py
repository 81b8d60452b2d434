"""Keeps ``PodRouter``'s view of the pods fresh: follows each pod's
``StreamKVEvents`` (prefix index, and the pod's load riding along) and polls
its ``GetLoad`` (load and readiness) whenever that stream brings no load: at
hundreds of pods a poll per pod and period was most of an idle router's CPU
(256 pods, 1 s period: a quarter of a core), a streamed load message a
fraction of it."""
from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from splitserve.router.pd_client import LoadSnapshot, PodCallError, PodClient
from splitserve.router.routing import PodRouter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatcherConfig:
    """``poll_interval_s``: GetLoad period, and how often a pod streams a
    changed load. ``max_missed_polls``: failed polls in a row before a pod is
    taken out of rotation. ``load_heartbeat_s``: a pod streams its load at
    least this often; while it does (within ``load_heartbeat_s`` +
    ``poll_timeout_s``) it is not polled (0: always poll). A pod sends its KV
    events at most every ``kv_event_interval_s``, merged (0: every engine
    step's at once). KV event streams reconnect after ``backoff_min_s``,
    doubling to ``backoff_max_s``."""

    poll_interval_s: float = 0.2
    poll_timeout_s: float = 1.0
    max_missed_polls: int = 1
    load_heartbeat_s: float = 1.0
    kv_event_interval_s: float = 0.02
    backoff_min_s: float = 0.1
    backoff_max_s: float = 2.0

    def __post_init__(self) -> None:
        if self.poll_interval_s <= 0 or self.poll_timeout_s <= 0 or self.load_heartbeat_s < 0:
            raise ValueError("poll_interval_s and poll_timeout_s must be > 0, load_heartbeat_s >= 0")
        if not 0 <= self.kv_event_interval_s <= 10:
            raise ValueError(f"kv_event_interval_s must be in 0..10 seconds, got {self.kv_event_interval_s}")


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
        self.snapshots: dict[str, LoadSnapshot] = {}  # each watched pod's last load (polled or streamed)
        self._streamed_at: dict[str, float] = {}  # when each pod's stream last brought its load

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
        self._streamed_at.pop(pod, None)
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
        self._apply_load(pod, role, snapshot)
        return True

    def _apply_load(self, pod: str, role: str, snapshot: LoadSnapshot) -> None:
        previous = self._incarnations.get(pod)
        if previous is not None and previous != snapshot.incarnation_id:
            logger.info("pod %s restarted (incarnation %s -> %s); clearing its prefix index",
                        pod, previous, snapshot.incarnation_id)
            self.router.on_kv_events(role, pod, cleared=True)
        self._incarnations[pod] = snapshot.incarnation_id
        self.router.update_load(role, pod, snapshot.load)
        self.snapshots[pod] = snapshot
        self.router.pools[role].set_ready(pod, True)

    def _stream_fresh_for(self, pod: str) -> float:
        """Seconds the pod's last streamed load stays fresh (<= 0: poll it)."""
        at = self._streamed_at.get(pod)
        if at is None or not self.config.load_heartbeat_s:
            return 0.0
        return at + self.config.load_heartbeat_s + self.config.poll_timeout_s - time.monotonic()

    async def _poll(self, pod: str, role: str) -> None:
        missed = 0
        was_ready = False
        phase = poll_phase(pod) * self.config.poll_interval_s
        while True:
            fresh = self._stream_fresh_for(pod)
            if fresh > 0:  # the pod's stream brings its load: no poll until it stops
                await asyncio.sleep(max(fresh, self.config.poll_interval_s))
                continue
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
                config = self.config
                stream = client.kv_events(config.poll_interval_s if config.load_heartbeat_s else 0.0,
                                          config.load_heartbeat_s, config.kv_event_interval_s)
                async for batch in stream:
                    if batch.load is not None:
                        self._apply_load(pod, role, batch.load)
                        self._streamed_at[pod] = time.monotonic()
                    self.router.on_kv_events(role, pod, batch.stored, batch.removed,
                                             cleared=batch.cleared)
                    if first:
                        backoff = self.config.backoff_min_s
                        first = False
            except PodCallError as exc:
                logger.debug("KV event stream of %s broke: %s", pod, exc)
            self._streamed_at.pop(pod, None)  # polls take over until the stream is back
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.backoff_max_s)


def poll_phase(pod: str) -> float:
    """The pod's fixed offset in the poll period, as a fraction in [0, 1):
    a hash of its id, so every router replica spreads the same way."""
    return zlib.crc32(pod.encode()) / 2**32
