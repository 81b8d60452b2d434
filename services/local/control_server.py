"""The control endpoint of a running ``splitserve up`` (its local kubectl API).

A small HTTP/JSON server on 127.0.0.1 (an ephemeral port, written to the
up's ``control.json``), thin over the ``DeploymentController``:

    GET  /v1/status            pools and pods
    POST /v1/scale             {"replicas": {"decode": 3, "prefill": 0}}
    POST /v1/rollout/restart   {"pool": "decode"}

A refused request answers 400 ``{"error": "..."}``; scale and rollout return
at once (the controller acts on its next pass) with the new status.
Runs on its own daemon thread; ``close`` stops it.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from splitserve.local.controller import ControlError, DeploymentController

_MAX_BODY = 64 * 1024


class ControlServer:
    def __init__(self, controller: DeploymentController, status: Callable[[], dict[str, Any]] | None = None,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.controller = controller
        self._status = status or controller.status
        handler = _handler_class(self)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="up-control", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def handle(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Route one request; returns (HTTP status, JSON body)."""
        try:
            if method == "GET" and path == "/v1/status":
                return HTTPStatus.OK, self._status()
            if method == "POST" and path == "/v1/scale":
                replicas = body.get("replicas")
                if not isinstance(replicas, dict) or not replicas:
                    raise ControlError('send {"replicas": {"POOL": N, ...}}')
                self.controller.scale({str(k): v for k, v in replicas.items()})
                return HTTPStatus.OK, self._status()
            if method == "POST" and path == "/v1/rollout/restart":
                pool = body.get("pool")
                if not isinstance(pool, str):
                    raise ControlError('send {"pool": "prefill|decode|unified"}')
                self.controller.rollout_restart(pool)
                return HTTPStatus.OK, self._status()
        except ControlError as exc:
            return HTTPStatus.BAD_REQUEST, {"error": str(exc)}
        return HTTPStatus.NOT_FOUND, {"error": f"no route {method} {path}"}


def _handler_class(server: ControlServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self._answer(*server.handle("GET", self.path, {}))

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY:
                self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError as exc:
                self._answer(HTTPStatus.BAD_REQUEST, {"error": f"body is not JSON: {exc}"})
                return
            if not isinstance(body, dict):
                self._answer(HTTPStatus.BAD_REQUEST, {"error": "body must be a JSON object"})
                return
            self._answer(*server.handle("POST", self.path, body))

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            pass

    return Handler
