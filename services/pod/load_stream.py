"""The pod's KV events with its load riding along (``StreamKVEvents`` when
the router asks for load): the router then needs no ``GetLoad`` poll per pod
and period, which at hundreds of pods was most of an idle router's CPU.

Every event batch carries the load of the moment; between batches a
load-only message goes out when the load changed (at most every
``interval_s``) or when nothing went out for ``heartbeat_s`` (so a silent
stream means a stuck pod). Transport-free: the servicer turns each pair
into a ``KVEventBatch``.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

Events = TypeVar("Events")
Load = TypeVar("Load")


async def events_with_load(events: AsyncIterator[Events], load: Callable[[], Load], interval_s: float,
                           heartbeat_s: float = 0.0) -> AsyncIterator[tuple[Events | None, Load]]:
    """``(batch, load)`` per event batch and ``(None, load)`` per load-only
    message, the first one at once; ends when ``events`` ends. Closing it
    closes ``events``."""
    if interval_s <= 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s}")
    pending: asyncio.Future[Events] | None = None
    try:
        sent = load()
        last_sent = time.monotonic()
        yield None, sent
        pending = asyncio.ensure_future(anext(events))
        while True:
            done, _ = await asyncio.wait((pending,), timeout=interval_s)
            now = time.monotonic()
            if done:
                try:
                    batch = pending.result()
                except StopAsyncIteration:
                    return
                pending = asyncio.ensure_future(anext(events))
                sent, last_sent = load(), now
                yield batch, sent
                continue
            current = load()
            if current != sent or (heartbeat_s > 0 and now - last_sent >= heartbeat_s):
                sent, last_sent = current, now
                yield None, current
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
