"""The API key guards every route the router app registers except /health and
/metrics (found by walking ``app.routes``, so a route added later is covered
without editing this test). The backend is ``FakeBackend``, a test double of
the pods."""
from __future__ import annotations

import hmac
from typing import Any

import httpx
import pytest
from starlette.routing import Route
from test_router_support import MODEL, make_serving

from splitserve.router import auth
from splitserve.router.app import create_app
from splitserve.router.auth import OPEN_PATHS, bearer_problem

KEY = "sk-right-key"
BODIES = {"/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 2},
          "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 2},
          "/tokenize": {"model": MODEL, "prompt": "hi"}, "/detokenize": {"model": MODEL, "tokens": [104]}}
WRONG = [None, "Bearer sk-wrong-key", "Bearer " + KEY[:-1], "Bearer " + KEY + "x", "Basic " + KEY,
         "bearer", "Bearer ", KEY, b"Bearer \xff\xfe" + KEY.encode(), "Bearer " + KEY + ", Bearer x"]


def _routes(app: Any) -> list[tuple[str, str]]:
    out = []
    for route in app.routes:
        assert isinstance(route, Route), f"unexpected route kind {route!r}: teach this test about it"
        for method in sorted(route.methods or ()):
            out.append((method, route.path.replace("{", "").replace("}", "")))
    return out


@pytest.mark.asyncio
async def test_every_registered_route_but_health_and_metrics_needs_the_key() -> None:
    serving = make_serving(api_key=KEY)
    app = create_app(serving)
    routes = _routes(app)
    paths = {path for _, path in routes}
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/openapi.json"} <= paths
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
        for method, path in routes:
            body = BODIES.get(path)
            for header in WRONG:
                headers = {"Authorization": header} if header is not None else {}
                r = await client.request(method, path, json=body, headers=headers)
                if path in OPEN_PATHS:
                    assert r.status_code == 200, (method, path, header, r.text)
                    continue
                assert r.status_code == 401, (method, path, header, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                if method != "HEAD":
                    error = r.json()["error"]
                    assert error["type"] == "AuthenticationError" and error["code"] == 401
            ok = await client.request(method, path, json=body, headers={"Authorization": f"Bearer {KEY}"})
            assert ok.status_code == 200, (method, path, ok.text)
        # A path no route serves is not an oracle for which routes exist.
        assert (await client.get("/v1/secret")).status_code == 401
        assert (await client.get("/v1/secret", headers={"Authorization": f"Bearer {KEY}"})).status_code == 404
    assert len(serving.backend.requests) == 2  # only the two keyed generation calls reached it


def test_the_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert bearer_problem(b"Bearer abc", b"abd") == "incorrect API key provided"
    assert bearer_problem(b"Bearer abd", b"abd") is None
    assert calls == [(b"abc", b"abd"), (b"abd", b"abd")]
    assert bearer_problem(None, b"k") and bearer_problem(b"Token k", b"k")


@pytest.mark.asyncio
async def test_without_a_key_the_api_is_open_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        app = create_app(make_serving())
    assert "no API key" in caplog.text
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
        assert (await client.get("/v1/models")).status_code == 200
