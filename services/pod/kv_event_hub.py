"""Fan-out of the block pool's KV events from the engine thread to asyncio.

The pool is single-threaded, so its events are drained on the engine thread
by ``KVEventHub.after_step`` (an ``AsyncEngine`` after-step hook) and handed
to each asyncio subscriber through ``call_soon_threadsafe``.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from splitserve.engine.block_pool import KVCacheEvents
from splitserve.engine.engine_core import EngineCore


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[KVCacheEvents | None]


@dataclass
class KVEventHub:
    """Fan-out of KV cache events from the engine thread to asyncio streams."""

    _subscribers: list[_Subscriber] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def after_step(self, core: EngineCore) -> None:
        """Engine-thread hook: publish what the step stored or evicted."""
        events = core.pool.take_events()
        if not events.is_empty:
            self.publish(events)

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
