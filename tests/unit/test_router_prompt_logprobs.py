"""Prompt logprobs in the router's responses, over a FakeBackend (a test
double: scripted tokens, synthetic logprobs -- prompt token ``i`` at
``-1 - i``, rank 2). Shapes as vLLM's server: completions put
``prompt_logprobs`` in each choice, chat at the top level; ``echo`` with
``logprobs`` leads ``tokens``/``token_logprobs``/``top_logprobs``/
``text_offset`` with the prompt's tokens (the first without logprobs),
streamed or not; a stream refuses ``prompt_logprobs`` > 0."""
from __future__ import annotations

from typing import Any

import httpx
import pytest
from test_router_support import MODEL, encode, make_client, make_serving, sse_events, text_script, tokenizer

from splitserve.router.fake_backend import FakeBackend

PROMPT = "hi there"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def backend() -> FakeBackend:
    return FakeBackend(vocab_size=len(tokenizer()), eos_token_id=tokenizer().eos_token_id,
                       script=text_script(" ok"))


async def post(be: FakeBackend, path: str, body: dict[str, Any]) -> httpx.Response:
    async with make_client(make_serving(be)) as client:
        return await client.post(path, json=body)


def check_prompt_logprobs(body: list[Any], prompt: list[int], k: int) -> None:
    decode = tokenizer().decode
    vocab = len(tokenizer())
    assert body[0] is None and len(body) == len(prompt)
    for i, token in enumerate(prompt[1:], start=1):
        entry = body[i]
        ids = list(entry)
        assert ids[0] == str(token)  # the prompt token first, then the top-k in rank order
        assert entry[str(token)] == {"logprob": -1.0 - i, "rank": 2, "decoded_token": decode([token])}
        alts = [str((token + 1 + j) % vocab) for j in range(k)]
        assert ids[1:] == alts
        assert [entry[a]["rank"] for a in alts] == list(range(1, k + 1))


@pytest.mark.asyncio
async def test_completions_prompt_logprobs_per_choice() -> None:
    be = backend()
    r = await post(be, "/v1/completions", {"model": MODEL, "prompt": [PROMPT, "yo"], "n": 2,
                                           "prompt_logprobs": 2, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert all(req.sampling_params.prompt_logprobs == 2 for req in be.requests)
    for index, choice in enumerate(r.json()["choices"]):
        check_prompt_logprobs(choice["prompt_logprobs"], encode([PROMPT, "yo"][index // 2]), 2)


@pytest.mark.asyncio
async def test_chat_prompt_logprobs_at_the_top_level() -> None:
    be = backend()
    r = await post(be, "/v1/chat/completions", {**CHAT, "prompt_logprobs": 1})
    assert r.status_code == 200, r.text
    assert "prompt_logprobs" not in r.json()["choices"][0]
    check_prompt_logprobs(r.json()["prompt_logprobs"], list(be.requests[0].prompt_token_ids), 1)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.asyncio
async def test_streams_refuse_prompt_logprobs_above_zero_and_show_none(path: str) -> None:
    """As vLLM: > 0 with a stream is a 400 naming the field; 0 is accepted and shows nothing."""
    body = CHAT if path.endswith("chat/completions") else {"model": MODEL, "prompt": PROMPT, "max_tokens": 3}
    be = backend()
    r = await post(be, path, {**body, "stream": True, "prompt_logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    assert "stream=True" in r.json()["error"]["message"] and not be.requests
    r = await post(be, path, {**body, "stream": True, "prompt_logprobs": 0})
    assert r.status_code == 200 and "prompt_logprobs" not in r.text
    assert be.requests[0].sampling_params.prompt_logprobs is None  # nothing computed that nobody sees


@pytest.mark.asyncio
async def test_no_prompt_logprobs_unless_asked() -> None:
    be = backend()
    r = await post(be, "/v1/chat/completions", CHAT)
    assert "prompt_logprobs" not in r.json() and be.requests[0].sampling_params.prompt_logprobs is None
    r = await post(be, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "echo": True, "max_tokens": 2})
    assert "prompt_logprobs" not in r.json()["choices"][0]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.asyncio
async def test_echo_with_logprobs_leads_with_the_prompt_tokens(stream: bool) -> None:
    be = backend()
    r = await post(be, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "echo": True, "logprobs": 1,
                                           "max_tokens": 3, "stream": stream})
    assert r.status_code == 200, r.text
    assert be.requests[0].sampling_params.prompt_logprobs == 1  # as vLLM: echo asks prompt logprobs
    if stream:
        lp: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        text = ""
        for event in sse_events(r.text)[:-1]:
            for choice in event["choices"]:
                text += choice["text"]
                for key in lp:
                    lp[key] += (choice["logprobs"] or {}).get(key, [])
    else:
        choice = r.json()["choices"][0]
        text, lp = choice["text"], choice["logprobs"]
        check_prompt_logprobs(choice["prompt_logprobs"], encode(PROMPT), 1)
    decode = tokenizer().decode
    prompt = encode(PROMPT)
    outputs = [t for t in text_script(" ok")(be.requests[0])][:3]
    assert text.startswith(PROMPT)
    assert lp["tokens"] == [decode([t]) for t in prompt + outputs]
    assert lp["token_logprobs"][:len(prompt)] == [None] + [-1.0 - i for i in range(1, len(prompt))]
    assert lp["token_logprobs"][len(prompt):] == [-0.5] * len(outputs)
    assert lp["top_logprobs"][0] is None
    assert lp["top_logprobs"][1] == {decode([prompt[1]]): -2.0, decode([(prompt[1] + 1) % len(tokenizer())]): -0.25}
    offsets = [0]
    for token in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp["text_offset"] == offsets
