"""The OpenAI SDK against `splitserve up` (1 prefill + 1 decode, every request
disaggregated, API key set): exactness vs transformers, streaming, stop
strings, n, logprobs, usage, disconnects, and bad input next to valid traffic."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from e2e_support import HFReference, metric_values, pod_metric, running_cluster, wait_until_idle

from splitserve.local.launcher import LocalCluster

pytestmark = pytest.mark.e2e

KEY = "e2e-secret"
SYSTEM = "You are a terse assistant. Answer in one line."
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name three rivers."}]


@pytest.fixture(scope="module")
def cluster(llama_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(llama_model, max_model_len=512,
                         router_args=["--pd-threshold-tokens", "0", "--max-prompt-tokens", "400"],
                         env={"SPLITSERVE_API_KEY": KEY},
                         log_dir=tmp_path_factory.mktemp("logs-openai")) as c:
        yield c


@pytest.fixture(scope="module")
def hf(llama_model: Path) -> HFReference:
    return HFReference(llama_model)


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.base_url, api_key=KEY, max_retries=0, timeout=60)


def model_name(cluster: LocalCluster) -> str:
    return cluster.config.model


def test_chat_greedy_matches_transformers_streaming_or_not(cluster: LocalCluster, client: openai.OpenAI,
                                                            hf: HFReference) -> None:
    prompt_ids = hf.chat_ids(MESSAGES)
    expected_ids = hf.generate(prompt_ids, 12)
    assert len(hf.text(expected_ids)) >= 6, "the reference must produce text to compare"
    r = client.chat.completions.create(model=model_name(cluster), messages=MESSAGES, max_tokens=12,
                                       temperature=0)
    assert r.choices[0].message.content == hf.text(expected_ids)
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == len(expected_ids)
    assert r.choices[0].finish_reason == ("length" if len(expected_ids) == 12 else "stop")
    stream = client.chat.completions.create(model=model_name(cluster), messages=MESSAGES, max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == hf.text(expected_ids)
    assert chunks[-1].usage.completion_tokens == len(expected_ids)
    decisions = metric_values(cluster.config.port, "splitserve:pd_decisions_total")
    assert decisions.get('{path="disaggregated"}', 0) >= 2


def test_completions_greedy_matches_transformers(cluster: LocalCluster, client: openai.OpenAI,
                                                 hf: HFReference) -> None:
    prompt = "The quick brown fox jumps over the lazy dog and then"
    prompt_ids = hf.tokenizer.encode(prompt, add_special_tokens=True)
    expected = hf.text(hf.generate(prompt_ids, 10))
    r = client.completions.create(model=model_name(cluster), prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == expected and r.usage.prompt_tokens == len(prompt_ids)
    stream = client.completions.create(model=model_name(cluster), prompt=prompt, max_tokens=10,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected


def test_stop_string_truncates(cluster: LocalCluster, client: openai.OpenAI, hf: HFReference) -> None:
    full = hf.text(hf.generate(hf.chat_ids(MESSAGES), 16))
    stop = next((ch for ch in full[2:] if ch.isascii() and ch.isalnum()), None)
    assert stop is not None, f"no ASCII letter to stop on in {full!r}"
    r = client.chat.completions.create(model=model_name(cluster), messages=MESSAGES, max_tokens=16,
                                       temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_n_choices_with_seed_are_reproducible(cluster: LocalCluster, client: openai.OpenAI) -> None:
    def ask() -> Any:
        return client.chat.completions.create(model=model_name(cluster), messages=MESSAGES, max_tokens=8,
                                              temperature=1.0, n=3, seed=42, extra_body={"ignore_eos": True})

    first, second = ask(), ask()
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert len({c.message.content for c in first.choices}) > 1
    assert first.usage.completion_tokens == 24


def test_logprobs_of_every_token_match_transformers(cluster: LocalCluster, client: openai.OpenAI,
                                                    hf: HFReference) -> None:
    prompt_ids = hf.chat_ids(MESSAGES)
    expected = hf.generate(prompt_ids, 4)
    r = client.chat.completions.create(model=model_name(cluster), messages=MESSAGES, max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == len(expected)
    assert all(len(entry.top_logprobs) == 2 for entry in content)
    # token 0 comes from the prefill pod, token 1 from the decode pod
    for i in range(2):
        ref = hf.logprob(prompt_ids + expected[:i], expected[i])
        assert abs(content[i].logprob - ref) < 1e-3, (i, content[i].logprob, ref)
    stream = client.completions.create(model=model_name(cluster), prompt="abc def", max_tokens=5,
                                       temperature=0, logprobs=1, stream=True, extra_body={"ignore_eos": True})
    tokens = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert len(tokens) == 5


def test_client_disconnect_mid_stream_frees_every_block(cluster: LocalCluster) -> None:
    body = {"model": model_name(cluster), "messages": MESSAGES, "max_tokens": 400, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as http:
        for _ in range(2):
            with http.stream("POST", f"{cluster.base_url}/chat/completions", json=body) as response:
                assert response.status_code == 200
                lines = 0
                for line in response.iter_lines():
                    lines += bool(line.startswith("data: "))
                    if lines >= 4:
                        break  # leaving the block closes the connection mid-stream
    loads = wait_until_idle(cluster)
    for name, load in loads.items():
        assert load.num_used_blocks == 0 and load.num_leased_blocks == 0, (name, load)


BAD: list[tuple[str, Any, dict[str, str] | None, int]] = [
    ("malformed json", b"{not json", None, 400),
    ("wrong type", {"messages": "hi", "max_tokens": 4}, None, 400),
    ("unknown model", {"model": "nope", "messages": MESSAGES}, None, 404),
    ("negative max_tokens", {"messages": MESSAGES, "max_tokens": -1}, None, 400),
    ("huge max_tokens", {"messages": MESSAGES, "max_tokens": 10**9}, None, 400),
    ("empty messages", {"messages": []}, None, 400),
    ("prompt over limit", {"messages": [{"role": "user", "content": "x" * 1000}]}, None, 400),
    ("missing key", {"messages": MESSAGES}, {}, 401),
    ("wrong key", {"messages": MESSAGES}, {"Authorization": "Bearer wrong"}, 401),
    ("oversize body", {"messages": [{"role": "user", "content": "y" * (5 * 1024 * 1024)}]}, None, 413),
]


def test_bad_input_is_rejected_while_valid_traffic_flows(cluster: LocalCluster) -> None:
    url = f"{cluster.base_url}/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}"}
    before = pod_metric(cluster, "splitserve:prompt_tokens_total")

    async def valid(http: httpx.AsyncClient, i: int) -> str:
        messages = [{"role": "user", "content": f"valid request {i}"}]
        r = await http.post(url, headers=auth, json={"model": model_name(cluster), "messages": messages,
                                                     "max_tokens": 6, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    async def bad(http: httpx.AsyncClient, case: tuple[str, Any, dict[str, str] | None, int]) -> None:
        name, body, headers, status = case
        if isinstance(body, dict) and "model" not in body:
            body = {"model": model_name(cluster), **body}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = await http.post(url, content=content,
                            headers={"Content-Type": "application/json", **(auth if headers is None else headers)})
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        error = r.json()["error"]
        assert error["code"] == status and error["message"] and error["type"].endswith("Error"), (name, error)

    async def only_bad() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            await asyncio.gather(*(bad(http, case) for case in BAD))

    async def mixed() -> list[Any]:
        async with httpx.AsyncClient(timeout=60) as http:
            valids = [valid(http, i) for i in range(6)]
            bads = [bad(http, case) for case in BAD]
            return await asyncio.gather(*valids, *bads)

    asyncio.run(only_bad())
    assert pod_metric(cluster, "splitserve:prompt_tokens_total") == before  # no pod saw any of them
    results = asyncio.run(mixed())
    assert all(isinstance(text, str) for text in results[:6])
