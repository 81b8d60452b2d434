"""EventStreamResponse: the router's SSE response on plain asyncio."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from splitserve.router.event_stream import EventStreamResponse

pytestmark = pytest.mark.asyncio


class Events:
    """An event iterator that records how it ended."""

    def __init__(self, items: list[str], then_wait: bool = False, fail: bool = False) -> None:
        self.items, self.then_wait, self.fail = items, then_wait, fail
        self.ended: str | None = None
        self.waiting = asyncio.Event()

    async def run(self) -> AsyncIterator[str]:
        try:
            for item in self.items:
                yield item
            if self.fail:
                raise RuntimeError("backend broke")
            if self.then_wait:
                self.waiting.set()
                await asyncio.Event().wait()
            self.ended = "done"
        except asyncio.CancelledError:
            self.ended = "cancelled"
            raise
        except GeneratorExit:
            self.ended = "closed"
            raise


def channel(disconnect: asyncio.Event) -> tuple[Any, Any, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return receive, send, sent


async def test_streams_every_event_then_ends_the_body() -> None:
    events = Events(["data: 1\n\n", "data: 2\n\n"])
    receive, send, sent = channel(asyncio.Event())
    await EventStreamResponse(events.run(), headers={"Cache-Control": "no-cache"})({}, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    assert (b"cache-control", b"no-cache") in sent[0]["headers"]
    assert [m["body"] for m in sent[1:]] == [b"data: 1\n\n", b"data: 2\n\n", b""]
    assert [m["more_body"] for m in sent[1:]] == [True, True, False]
    assert events.ended == "done"


async def test_a_client_that_leaves_cancels_the_stream_and_the_call_returns() -> None:
    events = Events(["data: 1\n\n"], then_wait=True)
    gone = asyncio.Event()
    receive, send, sent = channel(gone)
    call = asyncio.ensure_future(EventStreamResponse(events.run())({}, receive, send))
    await events.waiting.wait()
    gone.set()
    await asyncio.wait_for(call, timeout=5)  # no CancelledError: the cut was ours
    assert events.ended == "cancelled"
    assert all(m.get("more_body", True) for m in sent)  # no end-of-body after the cut


async def test_a_cancelled_caller_still_sees_its_cancellation() -> None:
    events = Events([], then_wait=True)
    receive, send, _ = channel(asyncio.Event())
    call = asyncio.ensure_future(EventStreamResponse(events.run())({}, receive, send))
    await events.waiting.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert events.ended == "cancelled"


async def test_a_failing_stream_raises_and_leaves_no_watcher_behind() -> None:
    events = Events(["data: 1\n\n"], fail=True)
    receive, send, _ = channel(asyncio.Event())
    before = len(asyncio.all_tasks())
    with pytest.raises(RuntimeError, match="backend broke"):
        await EventStreamResponse(events.run())({}, receive, send)
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before


async def test_a_stream_cut_while_writing_is_closed() -> None:
    events = Events(["data: 1\n\n", "data: 2\n\n"])
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message.get("body") == b"data: 1\n\n":
            gone.set()
            await asyncio.sleep(1)  # a slow client: the cut lands here, not in the iterator

    await asyncio.wait_for(EventStreamResponse(events.run())({}, receive, send), timeout=5)
    assert events.ended == "closed"


async def test_the_last_event_ends_the_body_in_the_same_write() -> None:
    events = Events(["data: 1\n\n", "data: 2\n\ndata: [DONE]\n\n", "data: never\n\n"])
    receive, send, sent = channel(asyncio.Event())
    await EventStreamResponse(events.run(), last_event=b"data: [DONE]\n\n")({}, receive, send)
    assert [(m["body"], m["more_body"]) for m in sent[1:]] == [
        (b"data: 1\n\n", True), (b"data: 2\n\ndata: [DONE]\n\n", False)]
    assert events.ended == "closed"  # nothing after the last event is read
