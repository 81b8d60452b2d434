"""The KEDA external scaler's logic, transport-free: one metric per pool and
its activity, pushed the moment a request meets a pool with no ready pod.

Metrics (KEDA hands them to the HPA as AverageValue: desired pods =
ceil(value / target)):

- ``splitserve-prefill``: seconds of prompt work waiting = (prompt tokens
  queued on the prefill pods + those of the router's queued requests) /
  the pool's *measured* rate per pod (``PrefillRate``). Target: backlog
  seconds per pod (default 2).
- ``splitserve-decode`` / ``splitserve-unified``: load units, summed over the
  pool's pods: max(sequences in flight / max_num_seqs, KV usage), plus the
  router's queued requests / max_num_seqs. 1.0 is one full pod; target
  default 0.8.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from splitserve.router.membership import POOLS
from splitserve.router.metrics import RouterMetrics
from splitserve.router.pod_state import PodState
from splitserve.router.prefill_rate import PrefillRate
from splitserve.router.request_queue import QueuedRequest
from splitserve.router.routing import PodRouter

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = {"prefill": 2.0, "decode": 0.8, "unified": 0.8}


def metric_name(pool: str) -> str:
    return f"splitserve-{pool}"


@dataclass(frozen=True)
class ScalerConfig:
    """``max_num_seqs``: a pod's sequence capacity (the engines' default;
    ``GetLoad`` does not report it). ``activation_hold_s``: a request that
    met a pool with no ready pod keeps the pool active this long (it may
    have been served another way, e.g. decode-only while prefill is at
    zero). ``refresh_s``: how often an open ``StreamIsActive`` re-checks
    for a change of state besides the pushes."""

    max_num_seqs: int = 256
    activation_hold_s: float = 30.0
    refresh_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.activation_hold_s < 0 or self.refresh_s <= 0:
            raise ValueError("max_num_seqs must be >= 1, activation_hold_s >= 0, refresh_s > 0")


@dataclass(frozen=True)
class PoolQuery:
    """What KEDA's ``scalerMetadata`` asks for: a pool and its target."""

    pool: str
    target: float

    @property
    def metric_name(self) -> str:
        return metric_name(self.pool)


@dataclass(frozen=True)
class Push:
    """One ``StreamIsActive`` message: the state, and for a push caused by a
    request, when that request arrived (monotonic) and when it was pushed."""

    active: bool
    arrival: float | None = None
    pushed: float | None = None


@dataclass(eq=False)
class _Subscriber:
    """One open ``StreamIsActive``: woken by ``event``; ``arrival`` is the
    first request that met the empty pool since its last send."""

    event: asyncio.Event
    arrival: float | None = None


class ScalerCore:
    """Answers KEDA from the router's own view (pods' polled load, its queue,
    the measured prefill rate). ``queue`` returns the requests the router
    holds. ``demand`` and ``queue_changed`` are the ``RequestQueue``'s
    ``DemandListener``. Call from the event loop."""

    def __init__(self, router: PodRouter, rate: PrefillRate, metrics: RouterMetrics,
                 queue: Callable[[], list[QueuedRequest]] = list,
                 config: ScalerConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.router = router
        self.rate = rate
        self.metrics = metrics
        self.queue = queue
        self.config = config or ScalerConfig()
        self.clock = clock
        self._last_demand: dict[str, float] = {}
        self._subscribers: dict[str, set[_Subscriber]] = {p: set() for p in POOLS}

    @staticmethod
    def query(metadata: Mapping[str, str]) -> PoolQuery:
        """Validate ``scalerMetadata``; ``ValueError`` says what is wrong."""
        pool = metadata.get("pool", "")
        if pool not in POOLS:
            raise ValueError(f"scalerMetadata.pool must be one of {', '.join(POOLS)}, got {pool!r}")
        raw = metadata.get("target")
        if raw is None or raw == "":
            return PoolQuery(pool, DEFAULT_TARGETS[pool])
        try:
            target = float(raw)
        except ValueError:
            raise ValueError(f"scalerMetadata.target must be a number, got {raw!r}") from None
        if not math.isfinite(target) or target <= 0:
            raise ValueError(f"scalerMetadata.target must be > 0, got {raw!r}")
        return PoolQuery(pool, target)

    def _serving(self, pool: str) -> list[PodState]:
        return [p for p in self.router.pools[pool].pods() if not p.draining]

    def metric_value(self, pool: str) -> float:
        queued = self.queue()
        if pool == "prefill":
            tokens = sum(p.load.queued_prompt_tokens for p in self._serving(pool))
            tokens += sum(e.num_prompt_tokens for e in queued if e.wants_prefill)
            value = tokens / self.rate.tokens_per_s()
        else:
            value = sum(self._pod_load(p) for p in self._serving(pool))
            value += sum(1 for e in queued if e.pool == pool) / self.config.max_num_seqs
        self.metrics.scaler_metric_value.labels(pool).set(value)
        return value

    def _pod_load(self, pod: PodState) -> float:
        load = pod.load
        kv = 1.0 - load.free_blocks / load.total_blocks if load.total_blocks else 0.0
        return max(load.num_requests / self.config.max_num_seqs, kv)

    def is_active(self, pool: str) -> bool:
        """Work on the pool's pods, requests queued for it, or a recent request
        that found it with no ready pod."""
        if any(p.load.num_requests or p.load.queued_prompt_tokens for p in self._serving(pool)):
            return True
        if any(e.pool == pool or (pool == "prefill" and e.wants_prefill) for e in self.queue()):
            return True
        last = self._last_demand.get(pool)
        return last is not None and self.clock() - last <= self.config.activation_hold_s

    def demand(self, pool: str, arrival: float) -> None:
        """A request arrived for ``pool`` while it had no ready pod: push now."""
        self._last_demand[pool] = self.clock()
        for subscriber in self._subscribers[pool]:
            if subscriber.arrival is None:
                subscriber.arrival = arrival
            subscriber.event.set()

    def queue_changed(self) -> None:
        for subscribers in self._subscribers.values():
            for subscriber in subscribers:
                subscriber.event.set()

    async def activity(self, pool: str) -> AsyncIterator[Push]:
        """The stream behind ``StreamIsActive``: the state at once, then each
        change, and ``active`` for every push ``demand`` triggers (several
        requests before the next send coalesce into one push)."""
        me = _Subscriber(asyncio.Event())
        self._subscribers[pool].add(me)
        try:
            last = self.is_active(pool)
            yield Push(last)
            while True:
                try:
                    await asyncio.wait_for(me.event.wait(), self.config.refresh_s)
                except asyncio.TimeoutError:
                    pass
                me.event.clear()
                arrival, me.arrival = me.arrival, None
                state = self.is_active(pool)
                if arrival is not None:
                    yield Push(True, arrival, time.monotonic())
                    last = True
                elif state != last:
                    yield Push(state)
                    last = state
        finally:
            self._subscribers[pool].discard(me)
