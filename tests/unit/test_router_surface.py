"""The rest of the OpenAI surface vLLM users send, over a FakeBackend (a test
double: scripted tokens, no model): tool_choice required / named / auto
(Hermes), echo, cached_tokens, /tokenize, /detokenize, /v1/models fields."""
from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from test_router_support import MODEL, encode, make_client, make_serving, sse_events, text_script, tokenizer

from splitserve.engine.structured import Constraint
from splitserve.router.fake_backend import FakeBackend
from splitserve.router.protocol import ChatTool
from splitserve.router.tool_calls import hermes_safe_prefix, parse_hermes, required_schema

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "weather in Paris?"}], "tools": [WEATHER, TIME]}


def backend(answer: str, **kw: Any) -> FakeBackend:
    return FakeBackend(vocab_size=len(tokenizer()), eos_token_id=tokenizer().eos_token_id,
                       script=text_script(answer), **kw)


async def post(be: FakeBackend, path: str, body: dict[str, Any], **settings: Any) -> httpx.Response:
    async with make_client(make_serving(be, **settings)) as client:
        return await client.post(path, json=body)


def joined_tool_calls(events: list[Any]) -> tuple[list[dict[str, Any]], str, str | None]:
    """Stream deltas joined as the OpenAI SDK does: calls by index
    (arguments concatenated), content, the last finish_reason."""
    calls: dict[int, dict[str, Any]] = {}
    content, finish = "", None
    for event in events[:-1]:
        for choice in event["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for call in delta.get("tool_calls", []):
                slot = calls.setdefault(call["index"], {"id": call.get("id"), "function": {"arguments": ""}})
                slot["function"]["name"] = call.get("function", {}).get("name") or slot["function"].get("name")
                slot["function"]["arguments"] += call.get("function", {}).get("arguments", "")
            finish = choice["finish_reason"] or finish
    return [calls[i] for i in sorted(calls)], content, finish


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.asyncio
async def test_named_tool_choice_is_the_functions_parameters_schema(stream: bool) -> None:
    args = '{"city": "Paris"}'
    be = backend(args)
    r = await post(be, "/v1/chat/completions", {**CHAT, "stream": stream, "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}})
    assert r.status_code == 200, r.text
    assert be.requests[0].sampling_params.constraint == Constraint.json_schema(WEATHER["function"]["parameters"])
    if stream:
        calls, content, finish = joined_tool_calls(sse_events(r.text))
        assert content == ""
    else:
        message = r.json()["choices"][0]["message"]
        calls, finish = message["tool_calls"], r.json()["choices"][0]["finish_reason"]
        assert message["content"] == ""
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert calls[0]["function"]["arguments"] == args and calls[0]["id"].startswith("chatcmpl-tool-")
    assert finish == "stop"  # as OpenAI and vLLM: a forced function keeps the engine's reason


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.asyncio
async def test_required_tool_choice_answers_a_list_of_calls(stream: bool) -> None:
    be = backend('[{"name": "get_weather", "parameters": {"city": "Nice"}}, {"name": "get_time", "parameters": {}}]')
    r = await post(be, "/v1/chat/completions", {**CHAT, "stream": stream, "tool_choice": "required"})
    assert r.status_code == 200, r.text
    schema = json.loads(be.requests[0].sampling_params.constraint.spec)
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert [v["properties"]["name"]["enum"] for v in schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    if stream:
        calls, _, finish = joined_tool_calls(sse_events(r.text))
    else:
        calls, finish = r.json()["choices"][0]["message"]["tool_calls"], r.json()["choices"][0]["finish_reason"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Nice"}), ("get_time", {})]
    assert finish == "stop"  # as vLLM: only auto-parsed calls finish with "tool_calls"


HERMES = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.asyncio
async def test_auto_tool_choice_parses_hermes_tags_when_enabled(stream: bool) -> None:
    r = await post(backend(HERMES), "/v1/chat/completions", {**CHAT, "stream": stream, "tool_choice": "auto"},
                   tool_call_parser="hermes")
    assert r.status_code == 200, r.text
    if stream:
        events = sse_events(r.text)
        calls, content, finish = joined_tool_calls(events)
        assert not any("<tool" in (e["choices"][0]["delta"].get("content") or "") for e in events[:-1] if e["choices"])
    else:
        choice = r.json()["choices"][0]
        calls, content, finish = choice["message"]["tool_calls"], choice["message"]["content"], choice["finish_reason"]
    assert content == "Let me look.\n" and finish == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"})]


@pytest.mark.asyncio
async def test_auto_without_a_parser_none_and_unknown_names_as_vllm() -> None:
    be = backend("plain words")
    r = await post(be, "/v1/chat/completions", CHAT)  # tools given: auto by default, as vLLM
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in r.json()["error"]["message"]
    r = await post(be, "/v1/chat/completions", {**CHAT, "tool_choice": {"type": "function",
                                                                        "function": {"name": "nope"}}})
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]
    r = await post(be, "/v1/chat/completions", {**CHAT, "tool_choice": "required",
                                                "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert be.requests == []
    r = await post(be, "/v1/chat/completions", {**CHAT, "tool_choice": "none"})
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "plain words"}
    assert be.requests[0].sampling_params.constraint is None
    r = await post(be, "/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, tool_call_parser="hermes")
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "plain words" and choice["finish_reason"] == "stop"


def test_hermes_parser_and_stream_prefix() -> None:
    assert parse_hermes("no calls").tool_calls == ()
    unclosed = parse_hermes('<tool_call>{"name": "f", "arguments": {"a": 1}}')
    assert unclosed.content is None and unclosed.tool_calls[0]["function"]["arguments"] == '{"a": 1}'
    broken = parse_hermes("hi <tool_call>{not json</tool_call>")
    assert broken.content == "hi <tool_call>{not json</tool_call>" and broken.tool_calls == ()
    assert hermes_safe_prefix("abc <tool") == 4 and hermes_safe_prefix("abc <tool_call>x") == 4
    assert hermes_safe_prefix("a < b") == 5
    defs = {"$defs": {"P": {"type": "string"}}, "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}}
    tool = ChatTool.model_validate({"type": "function", "function": {"name": "f", "parameters": defs}})
    schema = required_schema([tool])
    assert schema["$defs"] == {"P": {"type": "string"}} and "$defs" not in schema["items"]["anyOf"][0]
    assert "$defs" in defs  # the request's tool is not modified


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.asyncio
async def test_echo_puts_each_prompt_before_its_choices(stream: bool) -> None:
    be = backend(" world")
    r = await post(be, "/v1/completions", {"model": MODEL, "prompt": ["hello", "bye"], "n": 2,
                                           "echo": True, "stream": stream})
    assert r.status_code == 200, r.text
    if stream:
        texts = ["", "", "", ""]
        for event in sse_events(r.text)[:-1]:
            for choice in event["choices"]:
                texts[choice["index"]] += choice["text"]
    else:
        texts = [c["text"] for c in r.json()["choices"]]
    assert texts == ["hello world", "hello world", "bye world", "bye world"]
    r = await post(be, "/v1/completions", {"model": MODEL, "prompt": encode("ids"), "echo": True})
    assert r.json()["choices"][0]["text"] == "ids world"  # token ids echo decoded


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.asyncio
async def test_cached_tokens_in_usage_only_when_enabled(stream: bool) -> None:
    body = {"model": MODEL, "prompt": ["a b c", "d e"], "n": 2, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}
    for enabled, cached in ((False, 3), (True, 3), (True, 0)):
        r = await post(backend("x", num_cached_tokens=cached), "/v1/completions", body,
                       enable_prompt_tokens_details=enabled)
        usage = sse_events(r.text)[-2]["usage"] if stream else r.json()["usage"]
        # Counted once per prompt (the n choices share it), summed over prompts;
        # left out at 0, as vLLM.
        assert usage.get("prompt_tokens_details") == ({"cached_tokens": 6} if enabled and cached else None)


@pytest.mark.asyncio
async def test_tokenize_and_detokenize_as_vllm() -> None:
    be = backend("x")
    async with make_client(make_serving(be, max_prompt_tokens=300)) as client:
        r = await client.post("/tokenize", json={"model": MODEL, "prompt": "hi there"})
        ids = tokenizer().encode("hi there", add_special_tokens=True)
        assert r.json() == {"count": len(ids), "max_model_len": 300, "tokens": ids, "token_strs": None}
        messages = [{"role": "user", "content": "hi"}]
        r = await client.post("/tokenize", json={"messages": messages, "return_token_strs": True})
        text = tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        want = encode(text)
        assert r.json()["tokens"] == want and r.json()["token_strs"] == tokenizer().convert_ids_to_tokens(want)
        r = await client.post("/detokenize", json={"model": MODEL, "tokens": want})
        assert r.json() == {"prompt": text}
        for path, body, param in (("/tokenize", {"model": "nope", "prompt": "x"}, "model"),
                                  ("/tokenize", {"prompt": "x", "messages": messages}, "prompt"),
                                  ("/tokenize", {"messages": messages, "continue_final_message": True},
                                   "continue_final_message"),
                                  ("/detokenize", {"tokens": [10**7]}, "tokens")):
            r = await client.post(path, json=body)
            assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text
    assert be.requests == []


@pytest.mark.asyncio
async def test_models_list_has_vllms_fields() -> None:
    async with make_client(make_serving(model_root="/models/tiny", max_prompt_tokens=512)) as client:
        (entry,) = (await client.get("/v1/models")).json()["data"]
    assert entry["id"] == MODEL and entry["root"] == "/models/tiny" and entry["parent"] is None
    assert entry["max_model_len"] == 512 and entry["object"] == "model"
    (perm,) = entry["permission"]
    assert perm["object"] == "model_permission" and perm["allow_sampling"] is True
