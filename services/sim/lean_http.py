"""A lean load-generator client for the router's streamed completions.

On a 2-core host the load generator shares the cores with the router it
measures; httpx spends ~1.4 ms of client CPU per streamed request, which
both caps the request rate a benchmark can offer and adds itself to every
"through the router" latency. This client keeps one HTTP/1.1 keep-alive
connection and reads just what the router sends: a chunked
``text/event-stream`` body, or an error body with ``Content-Length``. It is
a benchmark tool, not a general HTTP client (no redirects, TLS, proxies or
compression)."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from urllib.parse import urlsplit

from splitserve.sim.replay_client import RequestResult, StreamTally, completion_body


class LeanConnection:
    """One keep-alive connection to ``base_url`` (``http://host:port``)."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"LeanConnection takes http://host:port, not {base_url!r}")
        self.host, self.port = parts.hostname, parts.port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def stream_completion(self, model: str, prompt: Sequence[int], max_tokens: int,
                                result: RequestResult, timeout_s: float = 120.0) -> None:
        """As ``replay_client.stream_completion``: fill ``result``, never raise
        for a failed request. A broken connection is reopened next call."""
        tally = StreamTally(result, max_tokens)
        body = json.dumps(completion_body(model, prompt, max_tokens)).encode()
        try:
            await asyncio.wait_for(self._exchange(body, tally), timeout_s)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, KeyError) as exc:
            result.error = result.error or f"{type(exc).__name__}: {exc}"
            await self.close()
        finally:
            tally.close()

    async def _exchange(self, body: bytes, tally: StreamTally) -> None:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._reader, self._writer
        if reader is None:
            raise OSError("connection not open")
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n" % (self.host.encode(), self.port, len(body)) + body)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
        if headers.get("transfer-encoding", "").lower() != "chunked":
            raw = await reader.readexactly(int(headers.get("content-length", "0")))
            tally.result.error = f"HTTP {status}: {raw[:200]!r}"
            if headers.get("connection", "").lower() == "close":
                await self.close()
            return
        pending, live = "", True
        while True:
            size = int((await reader.readline()).split(b";", 1)[0], 16)
            if size == 0:
                await reader.readline()  # the CRLF after the last chunk (no trailers from the router)
                break
            chunk = (await reader.readexactly(size + 2))[:-2].decode()
            if status != 200:
                tally.result.error = tally.result.error or f"HTTP {status}: {chunk[:200]!r}"
                continue
            pending += chunk
            *events, pending = pending.split("\n\n")
            for event in events:
                if live and event.startswith("data: "):
                    live = tally.feed(event[6:])

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
