"""An HTTP server (uvicorn) that runs inside a process's own asyncio loop.

uvicorn normally takes over SIGINT/SIGTERM; pods and the router own those
signals themselves (to drain gracefully), so the embedded server never
installs handlers and is stopped by ``stop()``.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import uvicorn


class _QuietSignalServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass
class EmbeddedHTTPServer:
    """Serve an ASGI app on host:port as a task of the running loop."""

    app: Any
    host: str
    port: int
    log_level: str = "warning"
    _server: _QuietSignalServer | None = field(default=None, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    async def start(self) -> None:
        """Return once the socket is bound; raise ``OSError`` if it cannot be."""
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level=self.log_level,
                                access_log=False, lifespan="off")
        self._server = _QuietSignalServer(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # re-raise why it stopped
                raise OSError(f"HTTP server on {self.host}:{self.port} stopped before starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._server = self._task = None
