"""``events_with_load``: the pod's KV events with its load riding along, a
load-only message on a change (at most every interval) or a heartbeat."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from splitserve.pod.load_stream import events_with_load

pytestmark = pytest.mark.timeout(30)


class Source:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.closed = False

    async def events(self) -> AsyncIterator[str]:
        try:
            while (item := await self.queue.get()) is not None:
                yield item
        finally:
            self.closed = True


def test_batches_carry_the_load_and_changes_or_heartbeats_come_alone() -> None:
    async def scenario() -> None:
        source, load = Source(), {"value": 1}
        stream = events_with_load(source.events(), lambda: load["value"], interval_s=0.02, heartbeat_s=0.2)
        assert await anext(stream) == (None, 1)  # the load at once
        await source.queue.put("b1")
        assert await anext(stream) == ("b1", 1)
        load["value"] = 2
        assert await anext(stream) == (None, 2)  # changed: within an interval
        started = asyncio.get_running_loop().time()
        assert await anext(stream) == (None, 2)  # unchanged: only the heartbeat
        assert asyncio.get_running_loop().time() - started >= 0.15
        load["value"] = 3
        await source.queue.put("b2")
        assert await anext(stream) == ("b2", 3)
        await source.queue.put(None)
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        assert source.closed

    asyncio.run(scenario())


def test_closing_the_stream_closes_the_events_and_leaves_no_task() -> None:
    async def scenario() -> None:
        source = Source()
        stream = events_with_load(source.events(), lambda: 0, interval_s=0.01)
        assert await anext(stream) == (None, 0)
        await source.queue.put("b1")
        assert await anext(stream) == ("b1", 0)  # the next batch is awaited meanwhile
        await asyncio.sleep(0.05)
        await stream.aclose()
        assert source.closed
        await asyncio.sleep(0)
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    asyncio.run(scenario())


def test_the_interval_must_be_positive() -> None:
    async def scenario() -> None:
        with pytest.raises(ValueError, match="interval_s"):
            await anext(events_with_load(Source().events(), lambda: 0, interval_s=0))

    asyncio.run(scenario())
