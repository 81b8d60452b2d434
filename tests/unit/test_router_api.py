"""The OpenAI API over a FakeBackend: shapes, streaming, stop strings, n, logprobs, usage."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from test_router_support import MODEL, encode, make_client, make_serving, sse_events, text_script, tokenizer

from splitserve.router.app import create_app
from splitserve.router.fake_backend import FakeBackend
from splitserve.router.protocol import ChatCompletionRequest

pytestmark = pytest.mark.asyncio

ANSWER = "hello wörld 🙂 STOP here"
CHAT = {"model": MODEL, "messages": [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": "hi"}]}


def backend(**kw: Any) -> FakeBackend:
    kw.setdefault("script", text_script(ANSWER))
    return FakeBackend(vocab_size=len(tokenizer()), eos_token_id=tokenizer().eos_token_id, **kw)


async def post(serving: Any, path: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
    async with make_client(serving) as client:
        return await client.post(path, json=body, **kw)


async def test_chat_non_streaming_shape_and_usage() -> None:
    be = backend()
    r = await post(make_serving(be), "/v1/chat/completions", CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": ANSWER},
                      "logprobs": None, "finish_reason": "stop"}
    prompt = tokenizer().apply_chat_template(CHAT["messages"], add_generation_prompt=True, tokenize=False)
    prompt_ids = encode(prompt)
    assert list(be.requests[0].prompt_token_ids) == prompt_ids
    n_out = len(encode(ANSWER)) + 1  # + EOS
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": n_out,
                             "total_tokens": len(prompt_ids) + n_out}


async def test_completions_prompt_forms_and_length_finish() -> None:
    be = backend()
    r = await post(make_serving(be), "/v1/completions",
                   {"model": MODEL, "prompt": ["a b", "c"], "max_tokens": 3})
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["choices"][0]["text"] == tokenizer().decode(encode(ANSWER)[:3])
    assert [list(r.prompt_token_ids) for r in be.requests] == [encode("a b"), encode("c")]
    assert body["usage"]["prompt_tokens"] == len(encode("a b")) + len(encode("c"))
    assert body["usage"]["completion_tokens"] == 6
    for prompt, expected in (([5, 6, 7], [[5, 6, 7]]), ([[5, 6], [7]], [[5, 6], [7]])):
        be.requests.clear()
        r = await post(make_serving(be), "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1})
        assert r.status_code == 200 and [list(q.prompt_token_ids) for q in be.requests] == expected


async def test_chat_streaming_chunks_and_include_usage() -> None:
    r = await post(make_serving(backend()), "/v1/chat/completions",
                   {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "DONE"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1])
    assert content == ANSWER
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(encode(ANSWER)) + 1
    assert all("usage" not in c for c in chunks[:-1])


async def test_stop_string_split_across_tokens_cancels_backend() -> None:
    be = backend(script=text_script(ANSWER + " and more and more", eos=False))
    body = {"model": MODEL, "prompt": "x", "stop": "lo wö", "max_tokens": 50}
    r = await post(make_serving(be), "/v1/completions", body)
    assert r.json()["choices"][0]["text"] == "hel"
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert be.cancelled == [be.requests[0].request_id]


async def test_streaming_holds_back_a_possible_stop_string() -> None:
    be = backend()
    r = await post(make_serving(be), "/v1/completions",
                   {"model": MODEL, "prompt": "x", "stop": ["STOP here"], "stream": True})
    texts = [e["choices"][0]["text"] for e in sse_events(r.text)[:-1]]
    assert "".join(texts) == "hello wörld 🙂 "
    assert not any("STOP" in t for t in texts)
    assert sse_events(r.text)[-2]["choices"][0]["finish_reason"] == "stop"


async def test_stop_token_ids_and_vllm_extensions_reach_the_engine() -> None:
    be = backend()
    stop_id = encode(" 🙂")[0]
    r = await post(make_serving(be), "/v1/chat/completions",
                   {**CHAT, "stop_token_ids": [stop_id], "ignore_eos": True, "min_tokens": 1, "top_k": 5,
                    "min_p": 0.1, "repetition_penalty": 1.1, "skip_special_tokens": False, "seed": 3,
                    "max_completion_tokens": 20, "max_tokens": 99})
    params = be.requests[0].sampling_params
    assert params.stop_token_ids == [stop_id] and params.ignore_eos and params.min_tokens == 1
    assert (params.top_k, params.min_p, params.repetition_penalty, params.seed) == (5, 0.1, 1.1, 3)
    assert params.max_tokens == 20 and params.skip_special_tokens is False
    assert r.json()["choices"][0]["message"]["content"] == "hello wörld"  # stop token not in text


async def test_n_fans_out_with_derived_seeds() -> None:
    be = backend(script=None)
    r = await post(make_serving(be), "/v1/completions",
                   {"model": MODEL, "prompt": "x", "n": 3, "seed": 42, "max_tokens": 5})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    seeds = [req.sampling_params.seed for req in be.requests]
    assert seeds[0] == 42 and len(set(seeds)) == 3
    assert all(req.sampling_params.n == 1 for req in be.requests)
    assert len({c["text"] for c in body["choices"]}) > 1
    assert body["usage"]["completion_tokens"] == 15
    again = (await post(make_serving(backend(script=None)), "/v1/completions",
                        {"model": MODEL, "prompt": "x", "n": 3, "seed": 42, "max_tokens": 5})).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in body["choices"]]


async def test_n_streaming_interleaves_choices() -> None:
    r = await post(make_serving(backend()), "/v1/chat/completions", {**CHAT, "n": 2, "stream": True})
    chunks = sse_events(r.text)[:-1]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content", "") for c in mine) == ANSWER
        assert mine[-1]["finish_reason"] == "stop"


async def test_chat_logprobs_shape() -> None:
    r = await post(make_serving(backend()), "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 2})
    content = r.json()["choices"][0]["logprobs"]["content"]
    ids = encode(ANSWER)
    assert len(content) == len(ids) + 1
    first = content[0]
    assert set(first) == {"token", "logprob", "bytes", "top_logprobs"}
    assert first["token"] == tokenizer().decode([ids[0]])
    assert first["bytes"] == list(first["token"].encode())
    assert [t["logprob"] for t in first["top_logprobs"]] == [-0.5, -1.5]
    assert set(first["top_logprobs"][0]) == {"token", "logprob", "bytes"}


async def test_completion_logprobs_shape_and_offsets() -> None:
    r = await post(make_serving(backend()), "/v1/completions",
                   {"model": MODEL, "prompt": "x", "logprobs": 1, "max_tokens": 4})
    lp = r.json()["choices"][0]["logprobs"]
    ids = encode(ANSWER)[:4]
    assert lp["tokens"] == [tokenizer().decode([i]) for i in ids]
    assert lp["token_logprobs"] == [-0.5] * 4
    assert all(len(top) <= 2 and lp["tokens"][k] in top for k, top in enumerate(lp["top_logprobs"]))
    offsets = [0]
    for token in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp["text_offset"] == offsets


async def test_client_disconnect_cancels_the_backend_request() -> None:
    be = backend(script=None, token_delay_s=0.01)
    serving = make_serving(be)
    app = create_app(serving)
    body = json.dumps({**CHAT, "stream": True, "max_tokens": 1000}).encode()
    enough = asyncio.Event()
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    bodies: list[bytes] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await enough.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            bodies.append(message["body"])
            if len(bodies) >= 4:
                enough.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("test", 1), "server": ("router", 80),
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    start = time.monotonic()
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    assert time.monotonic() - start < 5
    assert be.cancelled == [be.requests[0].request_id] and not be.finished


async def test_closing_the_core_stream_cancels_every_choice() -> None:
    be = backend(script=None, token_delay_s=0.005)
    serving = make_serving(be)
    inp = serving.chat_input(ChatCompletionRequest.model_validate(
        {**CHAT, "n": 3, "stream": True, "max_tokens": 1000}), time.monotonic())
    stream = serving.generate_stream(inp)
    for _ in range(6):
        await stream.__anext__()
    await stream.aclose()
    assert sorted(be.cancelled) == sorted(r.request_id for r in be.requests) and len(be.cancelled) == 3


async def test_backend_failure_is_500_or_stream_error() -> None:
    r = await post(make_serving(backend(fail_after=2)), "/v1/chat/completions", CHAT)
    assert r.status_code == 500 and r.json()["error"]["type"] == "InternalServerError"
    r = await post(make_serving(backend(fail_after=2)), "/v1/chat/completions", {**CHAT, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "DONE" and events[-2]["error"]["code"] == 500


async def test_models_health_metrics() -> None:
    serving = make_serving(backend())
    async with make_client(serving) as client:
        models = (await client.get("/v1/models")).json()
        assert models["object"] == "list" and models["data"][0]["id"] == MODEL
        assert (await client.get("/health")).status_code == 200
        await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        text = (await client.get("/metrics")).text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "pd_decisions_total", "router_retries_total"):
        assert f"splitserve:{name}" in text
    assert 'splitserve:router_requests_total{endpoint="chat",status="success"} 1.0' in text


async def test_openai_sdk_against_the_app() -> None:
    openai = pytest.importorskip("openai")
    serving = make_serving(backend(), api_key="sk-test")
    http_client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(serving)))
    client = openai.AsyncOpenAI(base_url="http://router/v1", api_key="sk-test", http_client=http_client)
    chat = await client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=30)
    assert chat.choices[0].message.content == ANSWER and chat.usage.total_tokens > 0
    stream = await client.completions.create(model=MODEL, prompt="x", stream=True,
                                             stream_options={"include_usage": True})
    parts = [c async for c in stream]
    assert "".join(c.choices[0].text for c in parts if c.choices) == ANSWER
    assert parts[-1].usage.completion_tokens == len(encode(ANSWER)) + 1
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=CHAT["messages"])
    bad = openai.AsyncOpenAI(base_url="http://router/v1", api_key="wrong", http_client=http_client)
    with pytest.raises(openai.AuthenticationError):
        await bad.models.list()
    await http_client.aclose()
