"""The pod's engine: ``AsyncEngine`` plus a tap on the block pool's KV events.

Adapter (engine/ is not ours to change): ``AsyncEngine`` offers no hook to
run code on its engine thread, and ``BlockPool.take_events`` must run there
(the pool is single-threaded). ``PodEngine`` overrides the step to drain the
events right after each step and hands them to ``KVEventHub``, which delivers
them to asyncio subscribers through ``call_soon_threadsafe``.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.block_pool import KVCacheEvents


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[KVCacheEvents | None]


@dataclass
class KVEventHub:
    """Fan-out of KV cache events from the engine thread to asyncio streams."""

    _subscribers: list[_Subscriber] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, events: KVCacheEvents) -> None:
        """Engine thread: deliver one batch to every subscriber (non-blocking)."""
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            try:
                sub.loop.call_soon_threadsafe(sub.queue.put_nowait, events)
            except RuntimeError:  # that subscriber's loop is closed
                pass

    def close(self) -> None:
        """End every subscription (shutdown)."""
        with self._lock:
            subscribers, self._subscribers = self._subscribers, []
        for sub in subscribers:
            try:
                sub.loop.call_soon_threadsafe(sub.queue.put_nowait, None)
            except RuntimeError:
                pass

    async def subscribe(self) -> AsyncIterator[KVCacheEvents]:
        """Batches published after this call, until ``close``."""
        sub = _Subscriber(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._subscribers.append(sub)
        try:
            while (events := await sub.queue.get()) is not None:
                yield events
        finally:
            with self._lock:
                if sub in self._subscribers:
                    self._subscribers.remove(sub)


class PodEngine(AsyncEngine):
    """``AsyncEngine`` that publishes the pool's events after every step."""

    kv_events: KVEventHub

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.kv_events = KVEventHub()
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _step(self) -> None:
        super()._step()
        events = self.core.pool.take_events()
        if not events.is_empty:
            self.kv_events.publish(events)

    def shutdown(self, timeout: float | None = 10.0) -> None:
        super().shutdown(timeout)
        self.kv_events.close()
