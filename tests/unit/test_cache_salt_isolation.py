"""``cache_salt`` isolates tenants: the same prompt under two salts never hits
the other's prefix blocks, on real pod engines (prefill and decode, tiny
model; ``FakeTransport`` is a test double of NIXL) and in the router's
affinity index, which here is fed only by the prefill pod's own KV events and
queried with the hashes the router computes for a request (``FakeBackend``,
a test double of the pods, is never called)."""
from __future__ import annotations

import asyncio
import time

import pytest
from test_router_support import MODEL, make_serving

from pod_fixtures import GREEDY, Cluster, collect, wait_clean
from splitserve.pod.messages import Role
from splitserve.router.prefix_index import PrefixIndex
from splitserve.router.protocol import CompletionRequest

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(180)]
PROMPT = list(range(40, 67))  # 27 tokens: 3 full blocks of 8
FULL_BLOCKS = 3
SALTS = ("tenant-a", "tenant-b", None)


def _router_hashes(salt: str | None) -> tuple:
    """The block hashes the router's OpenAI core gives this prompt and salt."""
    serving = make_serving(block_size=8)
    inp = serving.completion_input(CompletionRequest(model=MODEL, prompt=PROMPT, cache_salt=salt), 0.0)
    (request,) = serving.backend_requests(inp, "cmpl-x")
    return request.block_hashes


async def _until(check, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def test_same_prompt_two_salts_no_cross_hits_on_pods_and_in_the_router_index(tiny_checkpoints: dict) -> None:
    cluster = Cluster(tiny_checkpoints["llama"])
    prefill = await cluster.pod(Role.PREFILL, "p:1")
    decode = await cluster.pod(Role.DECODE, "d:1")
    index = PrefixIndex()  # the router's view of the prefill pod, from its KV events only

    async def feed() -> None:
        async for batch in prefill.kv_events():
            index.evicted(batch.removed_block_hashes)
            index.stored(batch.stored_block_hashes)

    feeder = asyncio.create_task(feed())
    await asyncio.sleep(0)  # subscribed before the first step
    hashes = {salt: _router_hashes(salt) for salt in SALTS}
    assert len({h[0] for h in hashes.values()}) == len(SALTS)  # three chains from the first block on

    hit = FULL_BLOCKS * 8  # the prompt's full blocks (one token is always left to compute)
    pod_hits: list[tuple[str | None, int]] = []
    for step, salt in enumerate(("tenant-a", "tenant-a", "tenant-b", "tenant-b", None, None)):
        result = await prefill.prefill(f"r{step}", PROMPT, GREEDY, salt)
        assert prefill.release_kv(f"r{step}")
        pod_hits.append((salt, result.num_cached_tokens))
        await _until(lambda: index.match_length(hashes[salt]) == FULL_BLOCKS, f"KV events of step {step}")
        if step == 1:  # only tenant-a's blocks exist: the router sees no hit for the others
            assert [index.match_length(hashes[t]) for t in SALTS] == [FULL_BLOCKS, 0, 0]
        if step == 3:
            assert [index.match_length(hashes[t]) for t in SALTS] == [FULL_BLOCKS, FULL_BLOCKS, 0]
    # Each salt's first request misses although the same prompt is cached under another salt.
    assert pod_hits == [("tenant-a", 0), ("tenant-a", hit), ("tenant-b", 0), ("tenant-b", hit),
                        (None, 0), (None, hit)], pod_hits

    # The router's index now knows the three chains apart: each salt matches its
    # own blocks only; a salt never seen matches nothing.
    for salt in SALTS:
        assert index.match_length(hashes[salt]) == FULL_BLOCKS
    assert index.match_length(_router_hashes("tenant-c")) == 0

    # The decode pod's own prefix cache (prompt computed locally) is salted the same way.
    _, warm = await collect(decode, "d-warm", PROMPT, cache_salt="tenant-a")
    _, same = await collect(decode, "d-same", PROMPT, cache_salt="tenant-a")
    _, other = await collect(decode, "d-other", PROMPT, cache_salt="tenant-b")
    assert (warm.num_cached_tokens, same.num_cached_tokens, other.num_cached_tokens) == (0, hit, 0)
    assert (await collect(decode, "d-other-again", PROMPT, cache_salt="tenant-b"))[1].num_cached_tokens == hit

    feeder.cancel()
    await asyncio.gather(feeder, return_exceptions=True)
    await wait_clean(prefill, decode)
    await cluster.close()
