"""The router's side of a pod's ``DecodeStream`` or ``PrefillStream``: every
Decode (or Prefill) to one pod over one long-lived gRPC stream.

A call per request costs the router a call set-up, a request, the
response's messages and its status; one shared stream costs a message per
batch of starts and one per batch of events (the pod sends each step's
events of all requests together). A request's events come out of ``events``
exactly as its own call's would; closing that iterator early cancels the
request on the pod.

When the stream breaks (the pod died, froze past the keepalive, or closed),
every request on it fails with the stream's status and the next request
opens a new one. A pod that predates the RPC answers UNIMPLEMENTED before any
event: ``TaggedStreamUnsupported``, so the caller falls back to its own call.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import Message

from splitserve.pod.stream_multiplexer import DECODE_STREAM_MARKER, PREFILL_STREAM_MARKER, is_terminal
from splitserve.proto import splitserve_v1_pb2 as pb

logger = logging.getLogger(__name__)

# Opens the stream, whose requests are written as serialized bytes (the
# multicallable has no request serializer; ``encode_start`` makes them).
OpenStream = Callable[[], grpc.aio.StreamStreamCall]

# Nothing is written before the pod's marker came: a write that races the
# status of a pod without the RPC turns its UNIMPLEMENTED into INTERNAL
# (grpc.aio marks the call so when the write's batch fails).

# Starts queued together leave as one message up to about this size (a
# larger one alone): far inside the 64 MiB message limit of both sides, and
# other requests' starts do not queue behind many long prompts.
_BATCH_BYTES = 1 << 20


@dataclass(frozen=True)
class StreamSpec:
    """One kind of shared stream as the router uses it."""

    name: str                                 # for messages: "DecodeStream"
    method: str                               # the gRPC method's path
    response: type[Message]                   # what the pod sends
    marker: tuple[str, str]                   # the pod's initial metadata
    is_terminal: Callable[[Message], bool]    # a request's last event

    def opener(self, channel: grpc.aio.Channel) -> OpenStream:
        """Opens this stream on ``channel``, its requests written as bytes."""
        return channel.stream_stream(self.method, request_serializer=None,
                                     response_deserializer=self.response.FromString)


DECODE_STREAM = StreamSpec("DecodeStream", "/splitserve.v1.Engine/DecodeStream", pb.DecodeStreamResponse,
                           DECODE_STREAM_MARKER, is_terminal)
PREFILL_STREAM = StreamSpec("PrefillStream", "/splitserve.v1.Engine/PrefillStream", pb.PrefillStreamResponse,
                            PREFILL_STREAM_MARKER, lambda event: True)


class TaggedStreamError(Exception):
    """The shared stream ended under a running request (``code``: its status)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class TaggedStreamUnsupported(TaggedStreamError):
    """The pod has no such stream (an older version): use its own call."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_start(tag: int, request: Message) -> bytes:
    """One ``starts`` entry of a ``DecodeStreamRequest`` or
    ``PrefillStreamRequest`` (the same layout), serialized: written as it is
    into the batch, so a request is serialized once (building the batch as
    messages copied each request twice: into its DecodeStart, then into the
    batch)."""
    body = request.SerializeToString()
    start = b"\x08" + _varint(tag) + b"\x12" + _varint(len(body)) + body  # the start: 1 tag, 2 request
    return b"\x0a" + _varint(len(start)) + start  # the stream request's field 1 (starts)


def encode_cancels(tags: list[int]) -> bytes:
    """The stream request's ``cancels`` (field 2, packed), serialized."""
    if not tags:
        return b""
    packed = b"".join(_varint(tag) for tag in tags)
    return b"\x12" + _varint(len(packed)) + packed


class _Route:
    """One running request's events, waiting to be read."""

    __slots__ = ("events", "error", "waiter")

    def __init__(self) -> None:
        self.events: deque[Message] = deque()
        self.error: TaggedStreamError | None = None
        self.waiter: asyncio.Future[None] | None = None

    def push(self, event: Message) -> None:
        self.events.append(event)
        self._wake()

    def fail(self, error: TaggedStreamError) -> None:
        self.error = error
        self._wake()

    async def next(self) -> Message:
        while not self.events:
            if self.error is not None:
                raise self.error
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.events.popleft()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Session:
    """One open stream: its routes by tag, a writer and a reader task."""

    def __init__(self, call: grpc.aio.StreamStreamCall, kind: StreamSpec) -> None:
        self.call = call
        self.kind = kind
        self.routes: dict[int, _Route] = {}
        self.broken: TaggedStreamError | None = None
        self._starts: list[bytes] = []  # encode_start entries
        self._cancels: list[int] = []
        self._wake_writer = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write())
        self._reader = loop.create_task(self._read())

    def start(self, tag: int, request: Message) -> _Route:
        route = self.routes[tag] = _Route()
        self._starts.append(encode_start(tag, request))
        self._wake_writer.set()
        return route

    def cancel(self, tag: int) -> None:
        if self.routes.pop(tag, None) is not None and self.broken is None:
            self._cancels.append(tag)
            self._wake_writer.set()

    async def close(self) -> None:
        self.call.cancel()
        for task in (self._writer, self._reader):
            task.cancel()
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)

    async def _write(self) -> None:
        try:
            metadata = await self.call.initial_metadata()
            if not any((key, value) == self.kind.marker for key, value in metadata or ()):
                return  # the call ended first (an older pod's UNIMPLEMENTED, a pod down): the reader says
            while True:
                if not (self._starts or self._cancels):
                    self._wake_writer.clear()
                    await self._wake_writer.wait()
                    continue
                await self.call.write(self._next_message())
        except Exception as exc:  # noqa: BLE001 - the call ended; the reader reports its status
            logger.debug("%s write failed: %r", self.kind.name, exc)

    def _next_message(self) -> bytes:
        """Every queued cancel, and the queued starts up to ``_BATCH_BYTES``
        (a serialized stream request)."""
        count, size = 0, 0
        for start in self._starts:
            if count and size + len(start) > _BATCH_BYTES:
                break
            count, size = count + 1, size + len(start)
        message = b"".join(self._starts[:count]) + encode_cancels(self._cancels)
        del self._starts[:count]
        self._cancels = []
        return message

    async def _read(self) -> None:
        error = TaggedStreamError(grpc.StatusCode.UNAVAILABLE, f"the pod ended its {self.kind.name}")
        is_terminal = self.kind.is_terminal
        try:
            async for message in self.call:
                routes = self.routes
                for tagged in message.events:
                    event = tagged.event
                    if is_terminal(event):
                        route = routes.pop(tagged.tag, None)
                    else:
                        route = routes.get(tagged.tag)
                    if route is not None:  # None: cancelled by its reader
                        route.push(event)
        except grpc.aio.AioRpcError as exc:
            kind = (TaggedStreamUnsupported if exc.code() == grpc.StatusCode.UNIMPLEMENTED
                    else TaggedStreamError)
            error = kind(exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            error = TaggedStreamError(grpc.StatusCode.CANCELLED, "the router closed the pod's channel")
            raise
        finally:
            self.broken = error
            self._writer.cancel()
            routes, self.routes = self.routes, {}
            for route in routes.values():
                route.fail(error)


class TaggedStreamClient:
    """Requests to one pod over its shared stream of ``kind`` (opened by
    ``open_stream`` on first use and again after a break). Call from one
    event loop."""

    def __init__(self, open_stream: OpenStream, kind: StreamSpec) -> None:
        self._open_stream = open_stream
        self.kind = kind
        self._session: _Session | None = None
        self._next_tag = 1

    async def events(self, request: Message) -> AsyncIterator[Message]:
        """The request's events, ending with its last (``kind.is_terminal``);
        ``TaggedStreamError`` if the stream broke first."""
        session = self._session
        if session is None or session.broken is not None:
            session = self._session = _Session(self._open_stream(), self.kind)
        tag = self._next_tag
        self._next_tag += 1
        route = session.start(tag, request)
        is_terminal = self.kind.is_terminal
        ended = False
        try:
            while True:
                event = await route.next()
                ended = is_terminal(event)
                yield event
                if ended:
                    return
        finally:
            if not ended:
                session.cancel(tag)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
