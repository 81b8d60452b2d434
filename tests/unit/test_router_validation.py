"""Auth, limits and bad input: OpenAI-shaped 4xx bodies, and the backend sees nothing."""
from __future__ import annotations

from typing import Any

import pytest
from test_router_support import MODEL, make_client, make_serving

from splitserve.router.settings import API_KEY_ENV, RouterSettings, settings_from_env

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
COMP = {"model": MODEL, "prompt": "hi"}
LIMITS = dict(max_prompt_tokens=50, max_tokens_limit=100, max_n=4, max_request_body_bytes=2000)


def _assert_error(r: Any, status: int, type_: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_ and error["code"] == status and error["message"]
    return error


BAD_REQUESTS = [
    ("/v1/chat/completions", {**CHAT, "max_tokens": "5"}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 101}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 500}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "n": 5}, "n"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, "n"),
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, None),
    ("/v1/chat/completions", {**CHAT, "top_p": 0}, None),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 3}, None),
    ("/v1/chat/completions", {**CHAT, "seed": -1}, None),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, None),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {**CHAT, "stop": 3}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stop": ["a"] * 17}, "stop"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, None),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 60}]}, "prompt"),
    ("/v1/chat/completions", {"messages": CHAT["messages"]}, "model"),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
    ("/v1/completions", {**COMP, "echo": True, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {**COMP, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {**COMP, "prompt": ""}, "prompt"),
    ("/v1/completions", {**COMP, "prompt": []}, "prompt"),
    ("/v1/completions", {**COMP, "prompt": [1, 10**6]}, "prompt"),
    ("/v1/completions", {**COMP, "prompt": [[1, 2], "x"]}, None),
    ("/v1/completions", {**COMP, "min_tokens": 10, "max_tokens": 5}, None),
    ("/v1/completions", {**COMP, "stop_token_ids": [-1]}, None),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS)
@pytest.mark.asyncio
async def test_bad_requests_are_400_and_never_reach_the_backend(path: str, body: dict[str, Any],
                                                                param: str | None) -> None:
    serving = make_serving(**LIMITS)
    async with make_client(serving) as client:
        r = await client.post(path, json=body)
    error = _assert_error(r, 400, "BadRequestError")
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param)
    assert serving.backend.requests == []


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
@pytest.mark.asyncio
async def test_malformed_json_is_400(raw: bytes) -> None:
    serving = make_serving()
    async with make_client(serving) as client:
        r = await client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    _assert_error(r, 400, "BadRequestError")
    assert serving.backend.requests == []


@pytest.mark.asyncio
async def test_unknown_model_is_404_like_vllm() -> None:
    serving = make_serving()
    async with make_client(serving) as client:
        r = await client.post("/v1/completions", json={**COMP, "model": "gpt-9"})
    error = _assert_error(r, 404, "NotFoundError")
    assert error["message"] == "The model `gpt-9` does not exist."
    assert serving.backend.requests == []


@pytest.mark.asyncio
async def test_body_too_large_is_413_by_header_and_by_body() -> None:
    serving = make_serving(**LIMITS)
    big = {**COMP, "prompt": "x" * 5000}
    async with make_client(serving) as client:
        _assert_error(await client.post("/v1/completions", json=big), 413, "RequestEntityTooLargeError")

        async def chunks():  # no Content-Length: counted while reading
            for _ in range(10):
                yield b" " * 500

        r = await client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        _assert_error(r, 413, "RequestEntityTooLargeError")
    assert serving.backend.requests == []


@pytest.mark.parametrize("path,method", [("/v1/chat/completions", "post"), ("/v1/completions", "post"),
                                         ("/v1/models", "get")])
@pytest.mark.asyncio
async def test_api_key_required_on_v1(path: str, method: str) -> None:
    serving = make_serving(api_key="sk-right")
    body = CHAT if "chat" in path else COMP
    async with make_client(serving) as client:
        call = getattr(client, method)
        kw = {"json": body} if method == "post" else {}
        _assert_error(await call(path, **kw), 401, "AuthenticationError")
        _assert_error(await call(path, headers={"Authorization": "Bearer sk-wrong"}, **kw),
                      401, "AuthenticationError")
        _assert_error(await call(path, headers={"Authorization": "Basic sk-right"}, **kw),
                      401, "AuthenticationError")
        assert serving.backend.requests == []
        ok = await call(path, headers={"Authorization": "Bearer sk-right"}, **kw)
        assert ok.status_code == 200, ok.text
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


def test_settings_read_the_key_from_env_and_warn_when_open(caplog: pytest.LogCaptureFixture) -> None:
    assert settings_from_env({API_KEY_ENV: "k1"}).api_key == "k1"
    with caplog.at_level("WARNING"):
        assert settings_from_env({}).api_key is None
    assert API_KEY_ENV in caplog.text
    with pytest.raises(ValueError, match="max_n"):
        RouterSettings(max_n=0)
    assert settings_from_env({}, max_n=3, api_key="x").max_n == 3
