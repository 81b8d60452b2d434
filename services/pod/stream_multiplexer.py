"""The pod's side of one ``DecodeStream`` or ``PrefillStream``: many calls,
one stream.

Each start runs the pod's own handler for one request (``call``: the
``DecodeResponse`` events a Decode call streams, or the one ``PrefillEvent``
a Prefill call ends with) in a task of its own; their events wait in one
outbox and leave together, so a step that produced tokens for thirty
requests costs one message, not thirty. Nothing here knows gRPC: the
servicer feeds the requests it reads and sends the batches ``responses``
yields.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from splitserve.proto import splitserve_v1_pb2 as pb

logger = logging.getLogger(__name__)

# Events queued together leave as one message up to about this size (a
# larger one alone), well inside the router's 64 MiB receive limit.
_BATCH_BYTES = 1 << 20

# The initial metadata a pod's stream sends before it reads: the caller
# writes only once it came (see ``router.tagged_stream_client``).
DECODE_STREAM_MARKER = ("splitserve-decode-stream", "1")
PREFILL_STREAM_MARKER = ("splitserve-prefill-stream", "1")


def is_terminal(event: pb.DecodeResponse) -> bool:
    """A Decode's last event: its Finished or its Error."""
    return event.WhichOneof("event") != "chunk"


def _decode_size(tagged: pb.TaggedDecodeEvent) -> int:
    # Only prompt logprobs grow large; a step's tokens are tens of bytes.
    event = tagged.event
    large = event.chunk.prompt_logprobs or event.finished.last_chunk.prompt_logprobs
    return tagged.ByteSize() if large else 64


@dataclass(frozen=True)
class StreamKind:
    """What differs between the streams: the call's name, its events' end,
    how an error, a tagged event and a batch are made, an event's size."""

    name: str
    is_terminal: Callable[[Any], bool]
    error: Callable[[str, str], Any]
    tagged: Callable[[int, Any], Any]
    batch: Callable[[list[Any]], Any]
    size_of: Callable[[Any], int]


DECODE_STREAM = StreamKind(
    "Decode", is_terminal,
    lambda code, message: pb.DecodeResponse(error=pb.Error(code=code, message=message)),
    lambda tag, event: pb.TaggedDecodeEvent(tag=tag, event=event),
    lambda events: pb.DecodeStreamResponse(events=events), _decode_size)

PREFILL_STREAM = StreamKind(
    "Prefill", lambda event: True,
    lambda code, message: pb.PrefillEvent(error=pb.Error(code=code, message=message)),
    lambda tag, event: pb.TaggedPrefillEvent(tag=tag, event=event),
    lambda events: pb.PrefillStreamResponse(events=events), lambda tagged: tagged.ByteSize())

Call = Callable[[Any], AsyncIterator[Any]]


class StreamMultiplexer:
    """Runs the requests one stream of ``kind`` starts; ``responses`` yields their events
    in batches until the caller stopped writing (``feed`` returned) and every
    request ended. A duplicate running tag answers INVALID_ARGUMENT for that
    start; a cancel of an unknown tag is ignored (the request already ended).
    ``close`` aborts whatever still runs. Call from one event loop."""

    def __init__(self, call: Call, kind: StreamKind = DECODE_STREAM) -> None:
        self._call = call
        self._kind = kind
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._outbox: list[Any] = []
        self._wake = asyncio.Event()
        self._writing_done = False

    @property
    def num_running(self) -> int:
        return len(self._tasks)

    def apply(self, message: Any) -> None:
        """One message from the caller: its cancels, then its starts."""
        for tag in message.cancels:
            task = self._tasks.pop(tag, None)
            if task is not None:
                task.cancel()
        for start in message.starts:
            if start.tag in self._tasks:
                self._post(start.tag, self._kind.error("INVALID_ARGUMENT", f"tag {start.tag} is already running"))
                continue
            self._tasks[start.tag] = asyncio.get_running_loop().create_task(self._run(start.tag, start.request))
        self._wake.set()

    async def feed(self, messages: AsyncIterator[Any]) -> None:
        """Apply the caller's messages until it stops writing."""
        try:
            async for message in messages:
                self.apply(message)
        except Exception as exc:  # noqa: BLE001 - a broken stream: the servicer's own end aborts the rest
            logger.debug("a %sStream's requests ended with %r", self._kind.name, exc)
        finally:
            self._writing_done = True
            self._wake.set()

    async def responses(self) -> AsyncIterator[Any]:
        """Batches of tagged events, each batch what queued since the last."""
        while True:
            if self._outbox:
                yield self._kind.batch(self._take_batch())
                continue
            if self._writing_done and not self._tasks:
                return
            self._wake.clear()
            await self._wake.wait()

    async def close(self) -> None:
        """Abort every request still running (their calls end as cancelled)."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _take_batch(self) -> list[Any]:
        outbox = self._outbox
        size_of = self._kind.size_of
        count, size = 0, 0
        for tagged in outbox:
            nbytes = size_of(tagged)
            if count and size + nbytes > _BATCH_BYTES:
                break
            count, size = count + 1, size + nbytes
        if count == len(outbox):
            self._outbox = []
            return outbox
        self._outbox = outbox[count:]
        return outbox[:count]

    def _post(self, tag: int, event: Any) -> None:
        self._outbox.append(self._kind.tagged(tag, event))
        self._wake.set()

    async def _run(self, tag: int, request: Any) -> None:
        kind = self._kind
        events = self._call(request)
        ended = False
        try:
            async for event in events:
                ended = kind.is_terminal(event)
                self._post(tag, event)
                if ended:
                    break
            if not ended:
                self._post(tag, kind.error("UNAVAILABLE", f"the {kind.name} call ended without its last event"))
        # A cancel (the caller's, or the stream's end) is no Exception: it posts nothing.
        except Exception as exc:  # noqa: BLE001 - reported in-stream, like Decode's own errors
            logger.exception("unexpected error in a multiplexed %s", kind.name)
            self._post(tag, kind.error("INTERNAL", f"internal error: {type(exc).__name__}"))
        finally:
            await events.aclose()  # type: ignore[attr-defined]  # aborts the engine request if unfinished
            if self._tasks.get(tag) is asyncio.current_task():
                del self._tasks[tag]
            self._wake.set()
