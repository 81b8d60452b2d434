"""HTTP/1.1 connections whose writes in one pass of the event loop leave as
one socket send.

uvicorn writes a response's status line and headers, then each body chunk,
each with its own ``send``: a streamed completion's headers and its first
event go out as two segments although they are ready together (and every
``send`` on loopback also runs the receiver's TCP path: a tenth of the
router's CPU per short request was these writes). ``CoalescingHttpProtocol``
gives uvicorn's httptools protocol a transport that gathers what is written
until the loop runs its next callbacks, then sends it in one write. Nothing
waits longer than the rest of the current loop pass, and ``close`` sends
what is pending first.
"""
from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """Wraps ``transport``: ``write`` gathers, a ``call_soon`` sends. Every
    other attribute is the wrapped transport's."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        pending = self._pending
        if pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            pending.append(data)

    def flush(self) -> None:
        """Send what was gathered now (a no-op when nothing is)."""
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools HTTP/1.1 protocol on a ``CoalescingTransport``
    (pass as ``uvicorn.Config(http=...)``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
