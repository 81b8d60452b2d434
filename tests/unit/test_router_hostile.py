"""Hand-picked hostile request bodies: each gets an OpenAI-shaped 4xx (never a
500, never a hang), reaches no backend, and the router serves a normal request
right after. The backend is ``FakeBackend``, a test double of the pods."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from test_router_support import MODEL, make_client, make_serving

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
COMP = {"model": MODEL, "prompt": "hi"}
LIMITS = dict(max_prompt_tokens=512, max_tokens_limit=256, max_n=4, max_request_body_bytes=1 << 20)


def _j(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def _chat_with(raw_field: bytes) -> bytes:
    """A chat body with ``raw_field`` (already JSON text) spliced in."""
    return b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], ' + raw_field + b"}"


HOSTILE: list[tuple[str, str, bytes, int]] = [
    # (name, path, raw body, status)
    ("huge body", "/v1/completions", _j({**COMP, "prompt": "x" * (2 << 20)}), 413),
    ("huge prompt, under the body limit", "/v1/completions", _j({**COMP, "prompt": "ab " * 100_000}), 400),
    ("n far over the limit", "/v1/chat/completions", _j({**CHAT, "n": 10**9}), 400),
    ("n a 400-digit integer", "/v1/chat/completions", _j({**CHAT, "n": 10**400}), 400),
    ("n negative", "/v1/completions", _j({**COMP, "n": -3}), 400),
    ("max_tokens far over the limit", "/v1/chat/completions", _j({**CHAT, "max_tokens": 2**63}), 400),
    ("max_completion_tokens far over", "/v1/chat/completions", _j({**CHAT, "max_completion_tokens": 10**30}), 400),
    ("min_tokens far over", "/v1/completions", _j({**COMP, "min_tokens": 2**70}), 400),
    ("temperature NaN", "/v1/chat/completions", _chat_with(b'"temperature": NaN'), 400),
    ("temperature Infinity", "/v1/chat/completions", _chat_with(b'"temperature": Infinity'), 400),
    ("temperature 1e400 (inf as a float)", "/v1/chat/completions", _chat_with(b'"temperature": 1e400'), 400),
    ("top_p -Infinity", "/v1/completions", b'{"model": "tiny", "prompt": "hi", "top_p": -Infinity}', 400),
    ("penalties NaN", "/v1/chat/completions", _chat_with(b'"frequency_penalty": NaN'), 400),
    ("top_k past int32", "/v1/chat/completions", _j({**CHAT, "top_k": 2**40}), 400),
    ("seed past int64", "/v1/chat/completions", _j({**CHAT, "seed": 2**64}), 400),
    ("stop_token_ids past uint32", "/v1/completions", _j({**COMP, "stop_token_ids": [2**40]}), 400),
    ("token ids past the vocabulary", "/v1/completions", _j({**COMP, "prompt": [1, 2**40]}), 400),
    ("invalid UTF-8 bytes", "/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", '
                                                    b'"content": "\xc3\x28\xff"}]}', 400),
    ("a lone UTF-16 surrogate", "/v1/chat/completions", _chat_with(b'"stop": ["\\ud800"]'), 400),
    ("lone surrogate in a prompt", "/v1/completions", b'{"model": "tiny", "prompt": "a\\udfffb"}', 400),
    ("deeply nested JSON (arrays)", "/v1/chat/completions", _chat_with(b'"x": ' + b"[" * 50_000 + b"]" * 50_000), 400),
    ("deeply nested JSON (objects)", "/v1/completions",
     b'{"model": "tiny", "prompt": "hi", "user": ' + b'{"a": ' * 20_000 + b"1" + b"}" * 20_000 + b"}", 400),
    ("100k stop strings", "/v1/chat/completions", _j({**CHAT, "stop": ["ab"] * 100_000}), 400),
    ("a 100k-character stop string", "/v1/chat/completions", _j({**CHAT, "stop": "s" * 100_000}), 200),
    ("unknown role", "/v1/chat/completions", _j({**CHAT, "messages": [{"role": "root", "content": "x"}]}), 400),
    ("role of the wrong type", "/v1/chat/completions", _j({**CHAT, "messages": [{"role": 7, "content": "x"}]}), 400),
    ("empty messages", "/v1/chat/completions", _j({**CHAT, "messages": []}), 400),
    ("messages not a list", "/v1/chat/completions", _j({**CHAT, "messages": "hi"}), 400),
    ("a message that is not an object", "/v1/chat/completions", _j({**CHAT, "messages": [None]}), 400),
    ("content parts of an unknown type", "/v1/chat/completions",
     _j({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}), 400),
    ("empty prompt list", "/v1/completions", _j({**COMP, "prompt": []}), 400),
    ("empty token list", "/v1/completions", _j({**COMP, "prompt": [[]]}), 400),
    ("body is a JSON array", "/v1/completions", b"[1, 2, 3]", 400),
    ("body is a JSON string", "/v1/completions", b'"hello"', 400),
    ("body is empty", "/v1/completions", b"", 400),
    ("truncated JSON", "/v1/completions", b'{"model": "tiny", "prompt": "hi', 400),
    ("duplicate keys, last one bad", "/v1/completions", b'{"model": "tiny", "prompt": "hi", "n": 1, "n": 99}', 400),
    ("model of the wrong type", "/v1/completions", _j({**COMP, "model": ["tiny"]}), 400),
    ("unknown model", "/v1/completions", _j({**COMP, "model": "gpt-9"}), 404),
    ("stream not a bool", "/v1/completions", _j({**COMP, "stream": "yes"}), 400),
    ("cache_salt empty", "/v1/completions", _j({**COMP, "cache_salt": ""}), 400),
]


def _check_error(status: int, text: str, want: int) -> None:
    assert status == want, text[:300]
    if want >= 400:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == want
        assert error["message"] and len(error["message"]) < 2000  # no echo of a huge input


@pytest.mark.parametrize(("name", "path", "raw", "status"), HOSTILE, ids=[h[0] for h in HOSTILE])
@pytest.mark.asyncio
async def test_hostile_body_gets_a_clean_4xx_and_the_router_keeps_serving(
        name: str, path: str, raw: bytes, status: int) -> None:
    serving = make_serving(**LIMITS)
    async with make_client(serving) as client:
        r = await asyncio.wait_for(client.post(path, content=raw, headers={"content-type": "application/json"}),
                                   timeout=30)
        _check_error(r.status_code, r.text, status)
        if status != 200:
            assert serving.backend.requests == []
        ok = await client.post("/v1/completions", json={**COMP, "max_tokens": 2})
        assert ok.status_code == 200, ok.text


@pytest.mark.asyncio
async def test_hostile_streaming_requests_refuse_before_any_event() -> None:
    """With stream=true a refusal is still a plain 4xx response, not an SSE
    stream that starts and then fails."""
    serving = make_serving(**LIMITS)
    async with make_client(serving) as client:
        for body in ({**CHAT, "stream": True, "n": 10**6}, {**COMP, "stream": True, "max_tokens": 10**9},
                     {**CHAT, "stream": True, "messages": [{"role": "wizard", "content": "x"}]}):
            r = await client.post("/v1/chat/completions" if "messages" in body else "/v1/completions", json=body)
            _check_error(r.status_code, r.text, 400)
            assert r.headers["content-type"].startswith("application/json")
    assert serving.backend.requests == []
