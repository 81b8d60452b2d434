"""Fan-out of the block pool's KV events from the engine thread to asyncio.

The pool is single-threaded, so its events are drained on the engine thread
by ``KVEventHub.after_step`` (an ``AsyncEngine`` after-step hook) and handed
to each asyncio subscriber through ``call_soon_threadsafe``. Batches that
queue up while a subscriber is still sending the previous one leave as one
(``coalesce``): a fast engine steps far more often than a stream can send, and
every message costs the router a wake-up.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from splitserve.engine.block_hash import BlockHash
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

    async def subscribe(self, min_interval_s: float = 0.0) -> AsyncIterator[KVCacheEvents]:
        """Batches published after this call, until ``close``; those already
        queued when one is taken come merged with it (``coalesce``). With
        ``min_interval_s``, a batch published sooner than that after the
        previous one left waits until then, merged with what follows it."""
        sub = _Subscriber(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._subscribers.append(sub)
        queue, loop = sub.queue, sub.loop
        next_at = 0.0
        try:
            while (events := await queue.get()) is not None:
                if (delay := next_at - loop.time()) > 0:
                    await asyncio.sleep(delay)
                waiting, closed = [events], False
                while not queue.empty():
                    more = queue.get_nowait()
                    if more is None:  # closed while those were queued
                        closed = True
                        break
                    waiting.append(more)
                yield events if len(waiting) == 1 else coalesce(waiting)
                next_at = loop.time() + min_interval_s
                if closed:
                    return
        finally:
            with self._lock:
                if sub in self._subscribers:
                    self._subscribers.remove(sub)


def coalesce(batches: Sequence[KVCacheEvents]) -> KVCacheEvents:
    """One batch with the effect of ``batches`` applied in order, each the way
    the router applies a batch (clear, then evictions, then stores): a clear
    drops what came before it, and a block's last event decides whether it is
    stored or removed (stores keep the order of their last event)."""
    start = max((i for i, b in enumerate(batches) if b.all_cleared), default=0)
    last: dict[BlockHash, bool] = {}  # True: stored
    for batch in batches[start:]:
        for h in batch.removed_block_hashes:
            last.pop(h, None)
            last[h] = False
        for h in batch.stored_block_hashes:
            last.pop(h, None)
            last[h] = True
    return KVCacheEvents(stored_block_hashes=[h for h, stored in last.items() if stored],
                         removed_block_hashes=[h for h, stored in last.items() if not stored],
                         all_cleared=batches[start].all_cleared)
