"""Structured outputs at the router, over a FakeBackend (a test double: it
answers scripted tokens and does not itself honour constraints): the request
fields become one compiled ``Constraint`` on every choice's backend request;
bad ones are 400s naming the field and the problem, before any backend call."""
from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from test_router_support import MODEL, make_client, make_serving, sse_events, text_script, tokenizer

from splitserve.engine.structured import Constraint, ConstraintKind
from splitserve.router.constraints import ConstraintChecker
from splitserve.router.fake_backend import FakeBackend

SCHEMA = {"type": "object", "properties": {"entities": {"type": "array", "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "type": {"type": "string"}},
    "required": ["name", "type"]}}}, "required": ["entities"]}
ANSWER = '{"entities": [{"name": "Ada", "type": "person"}]}'
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "extract"}]}
COMP = {"model": MODEL, "prompt": "extract"}
GUIDE_FORMAT = {"type": "json_schema", "json_schema": {"name": "entities", "schema": SCHEMA, "strict": True}}


def backend() -> FakeBackend:
    return FakeBackend(vocab_size=len(tokenizer()), eos_token_id=tokenizer().eos_token_id,
                       script=text_script(ANSWER))


async def post(be: FakeBackend, path: str, body: dict[str, Any]) -> httpx.Response:
    async with make_client(make_serving(be)) as client:
        return await client.post(path, json=body)


@pytest.mark.parametrize(("path", "extra", "want"), [
    ("/v1/chat/completions", {"response_format": GUIDE_FORMAT}, Constraint.json_schema(SCHEMA)),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, Constraint.json_object()),
    ("/v1/chat/completions", {"response_format": {"type": "text"}}, None),
    ("/v1/completions", {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
     Constraint.json_schema(SCHEMA, disable_any_whitespace=True)),
    ("/v1/completions", {"structured_outputs": {"regex": "[a-z]{3}"}}, Constraint.regex("[a-z]{3}")),
    ("/v1/completions", {"structured_outputs": {"choice": ["yes", "no"]}}, Constraint.choice(["yes", "no"])),
    ("/v1/chat/completions", {"structured_outputs": {"grammar": 'start: "a" | "b"'}},
     Constraint.grammar('start: "a" | "b"')),
    ("/v1/chat/completions", {"structured_outputs": {"json_object": True, "whitespace_pattern": " ?"}},
     Constraint.json_object(whitespace_pattern=" ?")),
    ("/v1/chat/completions", {"structured_outputs": {"json": SCHEMA, "disable_additional_properties": True}},
     Constraint.json_schema(SCHEMA, disable_additional_properties=True)),
    # As vLLM: response_format gives the kind, structured_outputs may qualify it.
    ("/v1/chat/completions", {"response_format": GUIDE_FORMAT,
                              "structured_outputs": {"whitespace_pattern": "[ ]?", "disable_fallback": True}},
     Constraint.json_schema(SCHEMA, whitespace_pattern="[ ]?")),
    ("/v1/completions", {"response_format": {"type": "json_object"},
                         "structured_outputs": {"disable_any_whitespace": True}},
     Constraint.json_object(disable_any_whitespace=True)),
])
@pytest.mark.asyncio
async def test_request_fields_become_one_constraint_on_every_choice(path: str, extra: dict[str, Any],
                                                                    want: Constraint | None) -> None:
    be = backend()
    body = {**(CHAT if "chat" in path else COMP), **extra, "n": 3}
    r = await post(be, path, body)
    assert r.status_code == 200, r.text
    assert len(be.requests) == 3
    assert [q.sampling_params.constraint for q in be.requests] == [want] * 3


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.asyncio
async def test_guide_example_answers_parse_streamed_and_not(stream: bool) -> None:
    r = await post(backend(), "/v1/chat/completions", {**CHAT, "response_format": GUIDE_FORMAT, "stream": stream})
    assert r.status_code == 200, r.text
    if stream:
        events = sse_events(r.text)
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    else:
        text = r.json()["choices"][0]["message"]["content"]
    assert json.loads(text) == json.loads(ANSWER)


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "xml"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object", "minProperties": "a"}}}},
     "response_format", "minProperties"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strnig"}}}},
     "response_format", "strnig"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"grammar": "start: nothing_defined"}}, "structured_outputs", "nothing_defined"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "choice"),
    ({"structured_outputs": {"json": SCHEMA, "frobnicate": 1}}, "structured_outputs", "frobnicate"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "structural_tag"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
     "only one"),
    ({"response_format": "json"}, "response_format", None),
    ({"structured_outputs": {"disable_any_whitespace": True}}, "structured_outputs", "exactly one"),
    ({"response_format": GUIDE_FORMAT, "structured_outputs": {"disable_any_whitespace": True,
                                                             "whitespace_pattern": " "}},
     "structured_outputs", "whitespace_pattern"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias", "logit_bias"),
    ({"prompt_logprobs": 21}, "prompt_logprobs", "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs", "prompt_logprobs"),
    ({"use_beam_search": True}, "use_beam_search", "beam"),
    ({"best_of": 2}, "best_of", "best_of"),
    ({"bad_words": ["x"]}, "bad_words", "bad_words"),
    ({"allowed_token_ids": [1]}, "allowed_token_ids", "allowed_token_ids"),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(("extra", "param", "words"), BAD)
@pytest.mark.asyncio
async def test_bad_constraints_and_refused_fields_are_400s_naming_them(path: str, extra: dict[str, Any],
                                                                       param: str, words: str | None) -> None:
    be = backend()
    r = await post(be, path, {**(CHAT if "chat" in path else COMP), **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "BadRequestError" and error["param"] == param
    if words is not None:
        assert words in error["message"], error["message"]
    assert be.requests == []


@pytest.mark.asyncio
async def test_refused_fields_at_their_defaults_are_accepted() -> None:
    be = backend()
    r = await post(be, "/v1/completions", {**COMP, "logit_bias": None, "best_of": 1, "use_beam_search": False,
                                           "bad_words": [], "prompt_logprobs": None})
    assert r.status_code == 200, r.text


def test_checker_compiles_a_constraint_once_and_never_caches_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    from splitserve.router import constraints

    calls: list[Constraint] = []
    real = constraints.compile_check
    monkeypatch.setattr(constraints, "compile_check", lambda c: (calls.append(c), real(c))[1])
    checker = ConstraintChecker(max_cached=2)
    good = [Constraint.json_schema(SCHEMA), Constraint.regex("a+"), Constraint.choice(["x"])]
    for constraint in good + good[-1:]:
        checker.check(constraint, "response_format")
    assert calls == good  # the repeat hit the cache
    checker.check(good[0], None)  # evicted (bound 2): compiled again
    assert len(calls) == 4
    bad = Constraint(ConstraintKind.REGEX, "(x")
    for _ in range(2):
        with pytest.raises(Exception, match="regex"):
            checker.check(bad, "structured_outputs")
    assert len(calls) == 6
