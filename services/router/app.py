"""The router's FastAPI app: thin routes over ``OpenAIServing``.

Routes authenticate, bound and parse the body, convert errors to OpenAI's
shape, and delegate. Nothing here is module-level state: ``create_app``
builds everything.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from splitserve.router.auth import ApiKeyMiddleware
from splitserve.router.direct_routes import DirectRoutes, Handler, error_response
from splitserve.router.errors import OpenAIError, bad_request, body_too_large
from splitserve.router.event_stream import EventStreamResponse
from splitserve.router.metrics import CONTENT_TYPE
from splitserve.router.openapi import describe_request_bodies
from splitserve.router.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from splitserve.router.request_queue import ClientGone, RequestQueue
from splitserve.router.serving import SSE_DONE, OpenAIServing
from splitserve.router.settings import RouterSettings

logger = logging.getLogger(__name__)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class RouterApp(FastAPI):
    """FastAPI with the generation routes dispatched ahead of all of it
    (``DirectRoutes``: set ``direct_routes`` before the first request; FastAPI's
    own per-request telemetry check and middleware stack are skipped there)
    and the API-key check (``api_key``, if set) ahead of both."""

    direct_routes: dict[str, Handler]
    api_key: str | None = None
    _front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        front = self._front
        if front is None:
            front = DirectRoutes(functools.partial(FastAPI.__call__, self), self.direct_routes)
            if self.api_key is not None:
                front = ApiKeyMiddleware(front, api_key=self.api_key)
            self._front = front
        await front(scope, receive, send)


def create_app(serving: OpenAIServing, settings: RouterSettings | None = None,
               ready: Callable[[], bool] | None = None, admission: RequestQueue | None = None) -> FastAPI:
    """Build the OpenAI-compatible app on ``serving``.

    ``settings`` default to ``serving.settings``. ``/health`` and ``/metrics``
    are open; every other path (``/v1``, ``/openapi.json``, unknown ones)
    requires ``Authorization: Bearer <key>`` when ``settings.api_key`` is set
    (``ApiKeyMiddleware``). ``/health`` answers 503 while
    ``ready()`` is false (e.g. no pod of a needed role answers yet).
    ``admission`` (optional) holds a validated request until a pod can take
    it, before any response starts; its refusals are 503s with
    ``Retry-After``, and a client gone while queued frees its slot.
    """
    settings = settings or serving.settings
    app = RouterApp(title="splitserve router", docs_url=None, redoc_url=None)
    app.state.serving = serving
    app.api_key = settings.api_key
    if settings.api_key is None:
        logger.warning("router API is open: no API key configured")

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_to_openai(exc.errors()))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if ready is None or ready() else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(serving.list_models())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        body = await _parse(request, ChatCompletionRequest, settings.max_request_body_bytes)
        inp = serving.chat_input(body, arrival)
        return await _admit_and_respond(serving, admission, inp, request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        body = await _parse(request, CompletionRequest, settings.max_request_body_bytes)
        inp = serving.completion_input(body, arrival)
        return await _admit_and_respond(serving, admission, inp, request)

    # The same two handlers, past FastAPI's stack (their routes above stay for
    # OpenAPI and for what DirectRoutes does not take).
    app.direct_routes = {"/v1/chat/completions": chat_completions, "/v1/completions": completions}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await _parse(request, TokenizeRequest, settings.max_request_body_bytes)
        return JSONResponse(serving.tokenize(body))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        body = await _parse(request, DetokenizeRequest, settings.max_request_body_bytes)
        return JSONResponse(serving.detokenize(body))

    describe_request_bodies(app, {"/v1/chat/completions": ChatCompletionRequest,
                                  "/v1/completions": CompletionRequest,
                                  "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest})
    return app


async def _admit_and_respond(serving: OpenAIServing, admission: RequestQueue | None, inp: Any,
                             request: Request) -> Response:
    if admission is not None:
        tokens = sum(len(p) for p in inp.prompts) * inp.sampling_params.n
        try:
            await admission.admit(tokens, inp.arrival_time, lambda: _disconnected(request))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it: the client left while queued
    return await _respond(serving, inp)


async def _disconnected(request: Request) -> None:
    """Return when the client hangs up (the body is already read, so the
    next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _respond(serving: OpenAIServing, inp: Any) -> Response:
    if inp.stream:
        return EventStreamResponse(serving.generate_stream(inp), headers=_SSE_HEADERS, last_event=SSE_DONE)
    return JSONResponse(await serving.generate(inp))


async def _parse(request: Request, model: type[BaseModel], limit: int) -> Any:
    """Read at most ``limit`` bytes, then parse JSON and validate (400s in
    OpenAI's shape; 413 before any parsing)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        # orjson refuses what JSON does not allow and json.loads lets by:
        # NaN/Infinity, numbers that overflow a double, lone surrogates ("\\ud800").
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise bad_request("the request body is nested too deeply") from None
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_to_openai(exc.errors()) from None


def _validation_to_openai(errors: Any) -> OpenAIError:
    """The first validation error, as vLLM reports it: a 400 naming the field."""
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid")
    return bad_request(message, param)
