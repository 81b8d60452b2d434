"""Scale from zero: the router holds a request while no pod can start it,
bounded in number and time, and tells the scaler at once that a pool is wanted."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from splitserve.router.errors import try_again_later
from splitserve.router.metrics import RouterMetrics
from splitserve.router.routing import PodRouter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueConfig:
    """``max_queued_requests`` waiting at once (0: no queue, answer 503 at
    once); each waits at most ``timeout_s``. ``retry_after_s`` goes in the
    503's ``Retry-After``. ``pd_threshold_tokens``: a P/D request this long
    or longer wants a prefill pod (shorter ones run on the decode pod)."""

    max_queued_requests: int = 256
    timeout_s: float = 60.0
    retry_after_s: int = 5
    pd_threshold_tokens: int = 64

    def __post_init__(self) -> None:
        if self.max_queued_requests < 0:
            raise ValueError(f"--max-queued-requests must be >= 0, got {self.max_queued_requests}")
        if self.timeout_s <= 0:
            raise ValueError(f"--queue-timeout-seconds must be > 0, got {self.timeout_s}")
        if self.retry_after_s < 1:
            raise ValueError("retry_after_s must be >= 1")


class DemandListener(Protocol):
    """The scaler's side: ``demand`` runs synchronously when a request meets
    a pool with no ready pod; ``queue_changed`` when the queue grows or shrinks."""

    def demand(self, pool: str, arrival: float) -> None: ...

    def queue_changed(self) -> None: ...


class ClientGone(Exception):
    """The client disconnected while its request was queued (its slot is free)."""


@dataclass(frozen=True, eq=False)
class QueuedRequest:
    pool: str  # the pool whose ready pod it waits for
    num_prompt_tokens: int
    wants_prefill: bool
    since: float


class RequestQueue:
    """Admission for new requests (the HTTP routes call ``admit`` before any
    response starts, so a refusal is a real HTTP 503 with ``Retry-After``).

    A request can start when its path has a ready pod: a decode pod for P/D
    (with no prefill pod the decode pod computes the prompt), a unified pod
    for a unified deployment; ``roles`` says which pools the deployment
    uses. Otherwise it waits, woken the moment a pool's readiness changes.
    Several router replicas share nothing: each has its own queue.
    """

    def __init__(self, router: PodRouter, roles: Callable[[], frozenset[str]], config: QueueConfig,
                 metrics: RouterMetrics, listener: DemandListener | None = None) -> None:
        self.router = router
        self.roles = roles
        self.config = config
        self.metrics = metrics
        self.listener = listener
        self.stopping = False
        self._waiting: set[QueuedRequest] = set()
        self._changed = asyncio.Event()
        for pool in router.pools.values():
            pool.subscribe(self._wake)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def unified(self) -> bool:
        """A unified deployment (the pools in use name unified pods and not both P/D pools)."""
        roles = self.roles()
        return "unified" in roles and not {"prefill", "decode"} <= roles

    def can_start(self) -> bool:
        return self.router.has_ready("decode") or self.router.has_ready("unified")

    def has_room(self) -> bool:
        return len(self._waiting) < self.config.max_queued_requests

    def waiting(self) -> list[QueuedRequest]:
        return list(self._waiting)

    def stop(self) -> None:
        """Refuse new requests and release the queued ones with a 503 (shutdown)."""
        self.stopping = True
        self._wake()

    async def admit(self, num_prompt_tokens: int, arrival: float | None = None,
                    disconnected: Callable[[], Awaitable[object]] | None = None) -> None:
        """Return once the request may start. Raises ``OpenAIError`` 503 (with
        ``Retry-After``) when the queue is full, the wait passes ``timeout_s``
        or the router stops; ``ClientGone`` when the awaitable
        ``disconnected()`` makes (called only if the request queues)
        completes first. The slot is freed on every way out, cancellation
        included."""
        arrival = time.monotonic() if arrival is None else arrival
        retry = self.config.retry_after_s
        if self.stopping:
            raise try_again_later("the router is shutting down; retry on another replica", retry)
        unified = self.unified()
        pool = "unified" if unified else "decode"
        wants_prefill = not unified and num_prompt_tokens >= self.config.pd_threshold_tokens
        if self.listener is not None:
            for wanted in (pool, "prefill") if wants_prefill else (pool,):
                if not self.router.has_ready(wanted):
                    self.listener.demand(wanted, arrival)
        if self.can_start():
            return
        if not self.has_room():
            raise try_again_later(
                f"no {pool} pod is ready and {len(self._waiting)} requests already wait for one "
                f"(--max-queued-requests {self.config.max_queued_requests}); retry later", retry)
        entry = QueuedRequest(pool, num_prompt_tokens, wants_prefill, time.monotonic())
        self._enter(entry)
        watch = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            deadline = entry.since + self.config.timeout_s
            while not self.can_start():
                if self.stopping:
                    raise try_again_later("the router is shutting down; retry on another replica", retry)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise try_again_later(
                        f"no {pool} pod became ready within {self.config.timeout_s:g} s "
                        "(--queue-timeout-seconds); retry later", retry)
                changed = asyncio.ensure_future(self._changed.wait())
                waits: set[asyncio.Future[object]] = {changed}
                if watch is not None:
                    waits.add(watch)
                try:
                    await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                if watch is not None and watch.done():
                    raise ClientGone()
        finally:
            if watch is not None:
                watch.cancel()
            self._leave(entry)

    def _enter(self, entry: QueuedRequest) -> None:
        self._waiting.add(entry)
        self._publish()

    def _leave(self, entry: QueuedRequest) -> None:
        self._waiting.discard(entry)
        self.metrics.queue_wait.observe(time.monotonic() - entry.since)
        self._publish()

    def _publish(self) -> None:
        for pool in ("prefill", "decode", "unified"):
            self.metrics.queued_requests.labels(pool).set(
                sum(1 for e in self._waiting if e.pool == pool))
        if self.listener is not None:
            self.listener.queue_changed()
