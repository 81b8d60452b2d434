"""The generation routes skip FastAPI's middleware stack (DirectRoutes);
every other path, method and the API-key check behave as before."""
from __future__ import annotations

from typing import Any

import httpx
import pytest

from splitserve.router.app import create_app
from splitserve.router.direct_routes import DirectRoutes
from splitserve.router.errors import bad_request
from starlette.responses import PlainTextResponse

from tests.unit.test_router_support import MODEL, make_serving

pytestmark = pytest.mark.asyncio


class _Seen:
    """An inner ASGI middleware of the FastAPI app: records every path it sees."""

    def __init__(self, app: Any, paths: list[str]) -> None:
        self.app, self.paths = app, paths

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.paths.append(f"{scope['method']} {scope['path']}")
        await self.app(scope, receive, send)


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")


async def test_generation_routes_bypass_the_stack_and_the_rest_does_not() -> None:
    app = create_app(make_serving())
    seen: list[str] = []
    app.add_middleware(_Seen, paths=seen)
    async with _client(app) as client:
        done = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        chat = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True})
        wrong_method = await client.get("/v1/completions")
        models = await client.get("/v1/models")
    assert done.status_code == 200 and done.json()["object"] == "text_completion"
    assert chat.status_code == 200 and chat.text.rstrip().endswith("data: [DONE]")
    assert wrong_method.status_code == 405
    assert models.status_code == 200
    assert seen == ["GET /v1/completions", "GET /v1/models"]


async def test_direct_route_errors_keep_openai_shape() -> None:
    async with _client(create_app(make_serving())) as client:
        not_json = await client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
        nan = await client.post("/v1/completions", content=b'{"model": "tiny", "prompt": "a", "temperature": NaN}')
        deep = await client.post("/v1/completions", content=b"[" * 5000 + b"]" * 5000)
        bad_field = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": -1})
    for response in (not_json, nan, deep, bad_field):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "BadRequestError"
    assert "not valid JSON" in not_json.json()["error"]["message"]
    assert "not valid JSON" in nan.json()["error"]["message"]
    assert "nested too deeply" in deep.json()["error"]["message"]
    assert bad_field.json()["error"]["param"] == "max_tokens"


async def test_direct_routes_still_need_the_api_key() -> None:
    async with _client(create_app(make_serving(api_key="k"))) as client:
        refused = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1})
        allowed = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1},
                                    headers={"Authorization": "Bearer k"})
    assert refused.status_code == 401
    assert allowed.status_code == 200


async def test_dispatcher_answers_handler_errors_and_passes_the_rest() -> None:
    async def refuse(request: Any) -> Any:
        raise bad_request("no", "prompt")

    fallback = PlainTextResponse("fallback")
    async with _client(DirectRoutes(fallback, {"/x": refuse})) as client:
        refused = await client.post("/x")
        other_path = await client.post("/y")
        other_method = await client.put("/x")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt"
    assert other_path.text == other_method.text == "fallback"
