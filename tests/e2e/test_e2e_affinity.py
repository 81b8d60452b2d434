"""KV-affinity routing through `splitserve up` with 2 prefill + 2 decode pods:
a shared system prompt stays on one prefill pod and hits its prefix cache; a
hot prefix under a burst spills within the bounded-load share; short prompts
skip prefill (conditional disaggregation); nothing leaks."""
from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from e2e_support import metric_values, pod_metric, running_cluster, wait_until_idle

from splitserve.local.launcher import LocalCluster

pytestmark = pytest.mark.e2e

LOAD_FACTOR = 1.25
SYSTEM = ("You are the support assistant of a river shipping company. " * 8).strip()  # ~470 tokens
# Long enough (> the 64-token default threshold) that the decode pod, which
# holds the system prompt after the first request, still lacks too much to skip prefill.
QUESTION = "please tell me where my parcel is, it was shipped last week from the northern port"


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(tiny_model, prefill=2, decode=2,
                         router_args=["--policy", "kv_affinity", "--load-factor", str(LOAD_FACTOR)],
                         log_dir=tmp_path_factory.mktemp("logs-affinity")) as c:
        yield c


def prefill_routing(cluster: LocalCluster) -> dict[str, float]:
    """Prefill decisions per pod name, from the router's metrics."""
    samples = metric_values(cluster.config.port, "splitserve:routing_decisions_total")
    by_address = {f'pod="{cluster.config.host}:{p.grpc_port}"': p.name for p in cluster.pods}
    out = {p.name: 0.0 for p in cluster.pods if p.role == "prefill"}
    for labels, value in samples.items():
        if 'role="prefill"' in labels:
            for needle, name in by_address.items():
                if needle in labels:
                    out[name] += value
    return out


def shared_prefix_tokens(cluster: LocalCluster, block_size: int = 16) -> int:
    """Full-block tokens two of the test's chat prompts have in common."""
    from splitserve.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(cluster.config.model)
    a, b = ([tok.encode(tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"question number {i}: {QUESTION}"}],
        add_generation_prompt=True, tokenize=False), add_special_tokens=False)] for i in (0, 1))
    a, b = a[0], b[0]
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return common // block_size * block_size


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def chat(client: openai.AsyncOpenAI, cluster: LocalCluster, user: str, max_tokens: int = 4):
    return client.chat.completions.create(
        model=cluster.config.model, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True},
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])


def test_shared_system_prompt_lands_on_one_prefill_pod_and_hits_its_cache(cluster: LocalCluster) -> None:
    routed_before = prefill_routing(cluster)
    hits_before = pod_metric(cluster, "splitserve:prefix_cache_hits_total")

    async def run() -> None:
        async with openai.AsyncOpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0) as client:
            for i in range(4):
                await chat(client, cluster, f"question number {i}: {QUESTION}")

    asyncio.run(run())
    routed = delta(prefill_routing(cluster), routed_before)
    assert sorted(routed.values()) == [0.0, 4.0], routed
    (pod,) = [name for name, count in routed.items() if count == 4]
    hits = delta(pod_metric(cluster, "splitserve:prefix_cache_hits_total"), hits_before)
    assert hits[pod] >= 3 * shared_prefix_tokens(cluster), hits  # requests 2..4 reuse the shared blocks
    assert hits[pod] == max(hits.values())


def test_hot_prefix_burst_stays_within_bounded_load(cluster: LocalCluster) -> None:
    n = 8
    routed_before = prefill_routing(cluster)

    async def run() -> None:
        async with openai.AsyncOpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0) as client:
            await asyncio.gather(*(chat(client, cluster, f"burst {i}: {QUESTION}", max_tokens=8) for i in range(n)))

    asyncio.run(run())
    routed = delta(prefill_routing(cluster), routed_before)
    assert sum(routed.values()) == n
    assert max(routed.values()) <= math.ceil(LOAD_FACTOR * n / len(routed)), routed


def test_short_prompts_skip_prefill(cluster: LocalCluster) -> None:
    before = metric_values(cluster.config.port, "splitserve:pd_decisions_total")
    client = openai.OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0)
    r = client.chat.completions.create(model=cluster.config.model, max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.usage.prompt_tokens < 64
    after = metric_values(cluster.config.port, "splitserve:pd_decisions_total")
    key = '{path="decode_only"}'
    assert after.get(key, 0) - before.get(key, 0) == 1


def test_no_blocks_held_after_the_traffic(cluster: LocalCluster) -> None:
    for name, load in wait_until_idle(cluster).items():
        assert load.num_used_blocks == 0 and load.num_leased_blocks == 0, (name, load)
