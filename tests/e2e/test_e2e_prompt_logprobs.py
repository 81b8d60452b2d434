"""Prompt logprobs through `splitserve up`, unified (1 pod) and
disaggregated (1 prefill + 1 decode, every request split): chat
``prompt_logprobs``, completions ``prompt_logprobs`` and ``echo`` with
``logprobs`` answer in vLLM's shapes, and the prompt logprobs are the same in
both topologies (the prefill pod computes them in one, the unified pod in the
other). A repeated prompt still gets them (prefix-cache hits are skipped for
it). Every run ends with no KV block or lease held."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_support import running_cluster, wait_until_idle

from splitserve.local.launcher import LocalCluster

pytestmark = pytest.mark.e2e

TOPOLOGIES: dict[str, dict[str, Any]] = {
    "unified": dict(prefill=0, decode=0, unified=1),
    "1p1d": dict(prefill=1, decode=1),
}
PROMPT = "Ada Lovelace wrote notes on the Analytical Engine. " * 2


@pytest.fixture(scope="module", params=list(TOPOLOGIES))
def cluster(request: pytest.FixtureRequest, tiny_model: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, LocalCluster]]:
    with running_cluster(tiny_model, max_model_len=512, **TOPOLOGIES[request.param],
                         router_args=["--pd-threshold-tokens", "0"],
                         log_dir=tmp_path_factory.mktemp(f"logs-prompt-logprobs-{request.param}")) as c:
        yield request.param, c


@pytest.fixture(scope="module")
def seen() -> dict[str, dict[str, Any]]:
    """Answers by topology, compared once both ran."""
    return {}


def test_prompt_logprobs_equal_unified_and_disaggregated(cluster: tuple[str, LocalCluster],
                                                         seen: dict[str, dict[str, Any]]) -> None:
    name, c = cluster
    model = c.config.model
    with httpx.Client(base_url=c.base_url, timeout=120) as client:
        completions = [client.post("/completions", json={
            "model": model, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "prompt_logprobs": 2}).json()
            for _ in range(2)]  # the second finds the prompt in a prefix cache
        echo = client.post("/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 3,
                                                  "temperature": 0, "echo": True, "logprobs": 1}).json()
        chat = client.post("/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "temperature": 0, "prompt_logprobs": 0}).json()
        num_prompt = client.post(f"{c.base_url.removesuffix('/v1')}/tokenize",
                                 json={"model": model, "prompt": PROMPT}).json()["count"]
    body = completions[0]["choices"][0]["prompt_logprobs"]
    assert completions[1]["choices"][0]["prompt_logprobs"] == body
    assert body[0] is None and len(body) == num_prompt
    assert all(1 <= len(entry) <= 3 for entry in body[1:])
    lp = echo["choices"][0]["logprobs"]
    assert echo["choices"][0]["text"].startswith(PROMPT)
    assert len(lp["tokens"]) == num_prompt + 3 and lp["token_logprobs"][0] is None
    first = [entry[next(iter(entry))]["logprob"] for entry in body[1:]]
    assert lp["token_logprobs"][1:num_prompt] == pytest.approx(first, abs=1e-5)
    assert chat["prompt_logprobs"][0] is None and all(len(e) == 1 for e in chat["prompt_logprobs"][1:])
    seen[name] = {"completion": body, "chat": chat["prompt_logprobs"], "echo": lp["token_logprobs"]}
    if len(seen) == len(TOPOLOGIES):
        a, b = seen.values()
        for key in a:
            _same(a[key], b[key])
    for pod, load in wait_until_idle(c).items():
        assert load.num_used_blocks == 0 and load.num_leased_blocks == 0, (pod, load)


def _same(a: Any, b: Any) -> None:
    """Equal up to float32 noise: same structure, ids and ranks; logprobs within 1e-4."""
    if isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-4)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b
