"""The router's API-key check: one ASGI middleware in front of every route.

A middleware rather than a call in each route, so a route added later (or
FastAPI's own ``/openapi.json``) cannot be left open by forgetting it; only
``OPEN_PATHS`` (probes and Prometheus) skip it, as in vLLM.
"""
from __future__ import annotations

import hmac
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from splitserve.router.errors import unauthorized

OPEN_PATHS = frozenset({"/health", "/metrics"})


def bearer_problem(authorization: bytes | None, api_key: bytes) -> str | None:
    """Why ``authorization`` (the raw header value) does not carry ``api_key``,
    or None when it does. The key is compared in constant time
    (``hmac.compare_digest``), so response timing tells nothing about it."""
    scheme, _, token = (authorization or b"").partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return "missing API key: send 'Authorization: Bearer <key>'"
    if not hmac.compare_digest(token, api_key):
        return "incorrect API key provided"
    return None


class ApiKeyMiddleware:
    """Answers 401 (OpenAI's ``AuthenticationError`` body) to every HTTP
    request without ``Authorization: Bearer <api_key>``, except on
    ``open_paths``; a websocket without it is closed (policy violation);
    lifespan events pass through."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        if not api_key:
            raise ValueError("ApiKeyMiddleware needs a non-empty key")
        self.app = app
        self._key = api_key.encode()
        self._open = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or scope.get("path") in self._open:
            await self.app(scope, receive, send)
            return
        problem = bearer_problem(_header(scope, b"authorization"), self._key)
        if problem is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":  # no route takes one; refuse before accepting
            await send({"type": "websocket.close", "code": 1008})
            return
        error = unauthorized(problem)
        response = JSONResponse(error.body(), status_code=error.status_code,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> bytes | None:
    headers: Any = scope.get("headers") or ()
    for key, value in headers:
        if key.lower() == name:
            return value
    return None
