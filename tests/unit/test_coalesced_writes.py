"""``CoalescingTransport`` sends what one loop pass wrote as one write, and
the router's HTTP server streams byte-identical responses with it."""
from __future__ import annotations

import asyncio
import socket

import httpx

from splitserve.coalesced_writes import CoalescingTransport
from splitserve.http_server import EmbeddedHTTPServer


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_writes_of_one_loop_pass_leave_as_one_and_close_sends_them_first() -> None:
    async def scenario() -> RecordingTransport:
        inner = RecordingTransport()
        transport = CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"5\r\nhello\r\n")
        transport.write(b"")
        assert inner.writes == []  # nothing sent inside the pass
        await asyncio.sleep(0)
        assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\n5\r\nhello\r\n"]
        transport.write(b"0\r\n\r\n")
        await asyncio.sleep(0)
        transport.write(b"late")
        transport.close()
        assert inner.writes[1:] == [b"0\r\n\r\n", b"late"] and inner.closed
        transport.write(b"after close")
        await asyncio.sleep(0)
        assert inner.writes[-1] == b"late"  # dropped: the transport is closing
        assert transport.get_extra_info("peername") == "info:peername"
        return inner

    asyncio.run(scenario())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _stream_app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    for i in range(3):
        await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
        await asyncio.sleep(0.01)
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def test_a_coalescing_server_streams_the_same_bytes_on_a_kept_alive_connection() -> None:
    async def scenario() -> None:
        port = _free_port()
        server = EmbeddedHTTPServer(_stream_app, "127.0.0.1", port, coalesce_writes=True)
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                for _ in range(3):  # one connection, several responses
                    async with client.stream("GET", "/") as response:
                        body = b"".join([chunk async for chunk in response.aiter_raw()])
                    assert response.status_code == 200
                    assert response.headers["transfer-encoding"] == "chunked"
                    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
        finally:
            await server.stop()

    asyncio.run(scenario())
