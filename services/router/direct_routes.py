"""The generation routes, dispatched before FastAPI.

FastAPI runs every request through its telemetry check and about ten ASGI
layers (server-error and telemetry middleware, body limit, exception
middleware, exit stack, router matching, dependency solving) before a
route's code starts: about a tenth of the router's CPU per short streamed
completion. The two routes every client calls (``POST /v1/completions`` and
``/v1/chat/completions``) need none of it: they read and bound their own
body, answer their own errors in OpenAI's shape and stream with
``EventStreamResponse``. ``DirectRoutes`` sends exactly
those (path and method) to their handler and everything else to the app, so
OpenAPI, 404/405s and the other routes behave as before. The API-key check
stays in front of both (``RouterApp`` wraps it outside this dispatcher).
FastAPI's native OpenTelemetry spans do not cover these two routes; the
router's Prometheus metrics do.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from splitserve.router.errors import OpenAIError

Handler = Callable[[Request], Awaitable[Response]]


def error_response(error: OpenAIError) -> JSONResponse:
    """``error`` as its HTTP answer: OpenAI's body, its status and headers."""
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


class DirectRoutes:
    """ASGI app: ``POST`` to a path of ``routes`` runs its handler, anything
    else goes to ``app``. A handler's ``OpenAIError`` becomes its JSON body
    and status; any other exception propagates to the server, which logs it
    and answers 500 if no response has started (as FastAPI's own error
    middleware does)."""

    def __init__(self, app: ASGIApp, routes: Mapping[str, Handler]) -> None:
        self.app = app
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            response = await handler(Request(scope, receive))
        except OpenAIError as exc:
            response = error_response(exc)
        await response(scope, receive, send)
