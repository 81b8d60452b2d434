"""Scale from zero at the HTTP edge: requests held while no decode pod is
ready, 503 + Retry-After over the bound and past the timeout, a client that
hangs up frees its slot, a queued request completes once a pod is ready.
Real sockets (uvicorn, gRPC) to fake Engine pods (test doubles)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from test_router_membership_fakes import add_pod, http_router, no_leaks, until
from test_router_orchestrator_fakes import FakeCluster
from test_router_support import tokenizer

from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.router.membership import DiscoveredPod, Snapshot

pytestmark = pytest.mark.asyncio

BODY = {"model": "tiny", "prompt": "hello there, router", "max_tokens": 4, "temperature": 0}


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[FakeCluster]:
    c = FakeCluster()
    yield c
    await c.stop()


def queued(parts, pool: str = "decode") -> float:
    return parts.metrics.registry.get_sample_value("splitserve:router_queued_requests", {"pool": pool}) or 0.0


def snapshot(*pods: tuple[str, object]) -> Snapshot:
    return Snapshot.of(DiscoveredPod(role, engine.address) for role, engine in pods)


def assert_retry_503(response: httpx.Response, words: str) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["type"] == "ServiceUnavailableError" and error["code"] == 503 and words in error["message"]


async def test_a_queued_request_completes_once_a_decode_pod_is_ready(cluster: FakeCluster) -> None:
    p = await add_pod(cluster, "p0", pb.ROLE_PREFILL)
    d = await add_pod(cluster, "d0", pb.ROLE_DECODE, answering=False)  # scaled from zero: starting
    async with http_router(tokenizer()) as (parts, url), httpx.AsyncClient(base_url=url, timeout=30) as client:
        parts.registry.apply(snapshot(("prefill", p), ("decode", d)))
        health = await client.get("/health")
        assert health.status_code == 200, "a pool at zero can still queue: the router takes requests"
        plain = asyncio.create_task(client.post("/v1/completions", json=BODY))
        streamed = asyncio.create_task(client.post("/v1/completions", json={**BODY, "stream": True}))
        await until(lambda: queued(parts) == 2, "both requests queued")
        assert not plain.done() and not streamed.done() and d.decodes == []
        d.answering = True
        response, stream = await plain, await streamed
        assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length"
        assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
        assert queued(parts) == 0
        assert parts.metrics.registry.get_sample_value("splitserve:router_queue_wait_seconds_count") == 2
        await no_leaks(p, d)


async def test_over_the_bound_is_a_503_with_retry_after(cluster: FakeCluster) -> None:
    d = await add_pod(cluster, "d0", pb.ROLE_DECODE, answering=False)
    p = await add_pod(cluster, "p0", pb.ROLE_PREFILL)
    async with http_router(tokenizer(), max_queued_requests=1) as (parts, url), \
            httpx.AsyncClient(base_url=url, timeout=30) as client:
        parts.registry.apply(snapshot(("prefill", p), ("decode", d)))
        first = asyncio.create_task(client.post("/v1/completions", json=BODY))
        await until(lambda: queued(parts) == 1, "the first request queued")
        assert (await client.get("/health")).status_code == 503, "no pod and no room: not ready"
        assert_retry_503(await client.post("/v1/completions", json=BODY), "--max-queued-requests")
        d.answering = True
        assert (await first).status_code == 200
        assert (await client.get("/health")).status_code == 200
        await no_leaks(p, d)


async def test_past_the_timeout_is_a_503_with_retry_after(cluster: FakeCluster) -> None:
    d = await add_pod(cluster, "d0", pb.ROLE_DECODE, answering=False)
    async with http_router(tokenizer(), queue_timeout_s=0.2) as (parts, url), \
            httpx.AsyncClient(base_url=url, timeout=30) as client:
        parts.registry.apply(snapshot(("decode", d)))
        assert_retry_503(await client.post("/v1/completions", json=BODY), "--queue-timeout-seconds")
        assert queued(parts) == 0 and d.decodes == []


async def test_a_client_that_disconnects_while_queued_frees_its_slot(cluster: FakeCluster) -> None:
    d = await add_pod(cluster, "d0", pb.ROLE_DECODE, answering=False)
    async with http_router(tokenizer(), max_queued_requests=1) as (parts, url):
        parts.registry.apply(snapshot(("decode", d)))
        leaving = httpx.AsyncClient(base_url=url, timeout=30)
        gone = asyncio.create_task(leaving.post("/v1/completions", json=BODY))
        await until(lambda: queued(parts) == 1, "queued")
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        await leaving.aclose()  # the socket closes: the router sees the disconnect
        await until(lambda: queued(parts) == 0, "the slot is freed")
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            waiting = asyncio.create_task(client.post("/v1/completions", json=BODY))
            await until(lambda: queued(parts) == 1, "a new request takes the freed slot")
            d.answering = True
            assert (await waiting).status_code == 200
        assert len(d.decodes) == 1, "the departed client's request never ran"
        await no_leaks(d)


async def test_no_queue_means_an_immediate_503(cluster: FakeCluster) -> None:
    d = await add_pod(cluster, "d0", pb.ROLE_DECODE, answering=False)
    async with http_router(tokenizer(), max_queued_requests=0) as (parts, url), \
            httpx.AsyncClient(base_url=url, timeout=30) as client:
        parts.registry.apply(snapshot(("decode", d)))
        assert (await client.get("/health")).status_code == 503
        assert_retry_503(await client.post("/v1/completions", json=BODY), "no decode pod is ready")
