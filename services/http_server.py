"""An HTTP server (uvicorn) that runs inside a process's own asyncio loop.

uvicorn normally takes over SIGINT/SIGTERM; pods and the router own those
signals themselves (to drain gracefully), so the embedded server never
installs handlers and is stopped by ``stop()``.
"""
from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from splitserve.coalesced_writes import CoalescingHttpProtocol


class _QuietSignalServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass(frozen=True)
class HTTPTLS:
    """HTTPS for an embedded server, as vLLM's ``--ssl-keyfile``,
    ``--ssl-certfile``, ``--ssl-ca-certs`` and ``--ssl-cert-reqs`` (an
    ``ssl.VerifyMode`` number: 0 none, 1 optional, 2 required client
    certificates, checked against ``ca_certs``)."""

    keyfile: str
    certfile: str
    ca_certs: str | None = None
    cert_reqs: int = int(ssl.CERT_NONE)

    def __post_init__(self) -> None:
        for flag, path in (("--ssl-keyfile", self.keyfile), ("--ssl-certfile", self.certfile),
                           ("--ssl-ca-certs", self.ca_certs)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")
        if self.cert_reqs not in (0, 1, 2):
            raise ValueError(f"--ssl-cert-reqs must be 0, 1 or 2 (ssl.CERT_*), got {self.cert_reqs}")
        if self.cert_reqs and not self.ca_certs:
            raise ValueError("--ssl-cert-reqs 1 or 2 verifies client certificates: give --ssl-ca-certs")

    def uvicorn_kwargs(self) -> dict[str, Any]:
        return {"ssl_keyfile": self.keyfile, "ssl_certfile": self.certfile, "ssl_ca_certs": self.ca_certs,
                "ssl_cert_reqs": self.cert_reqs}


@dataclass
class EmbeddedHTTPServer:
    """Serve an ASGI app on host:port as a task of the running loop (HTTPS
    when ``tls``). ``coalesce_writes``: what a response writes in one loop
    pass leaves as one socket send (``coalesced_writes``)."""

    app: Any
    host: str
    port: int
    log_level: str = "warning"
    tls: HTTPTLS | None = None
    coalesce_writes: bool = False
    _server: _QuietSignalServer | None = field(default=None, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    async def start(self) -> None:
        """Return once the socket is bound; raise ``OSError`` if it cannot be."""
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level=self.log_level,
                                # No X-Forwarded-* rewriting: nothing here reads the client's address,
                                # and the middleware is one more layer on every request.
                                access_log=False, lifespan="off", proxy_headers=False,
                                **({"http": CoalescingHttpProtocol} if self.coalesce_writes else {}),
                                **(self.tls.uvicorn_kwargs() if self.tls is not None else {}))
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
