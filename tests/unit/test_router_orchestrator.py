"""The P/D orchestrator over real gRPC against fake Engine pods: paths,
seeds, logprobs, retries, failover, cancellation, error mapping, watcher."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc
import pytest
import pytest_asyncio
from test_router_orchestrator_fakes import BLOCK, EOS, FakeCluster, FakeEngine, reference

from splitserve.engine.block_hash import hash_prompt_blocks
from splitserve.engine.sampling_params import SamplingParams
from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.router.backend import BackendError, BackendRequest, BackendUnavailableError, TokenChunk
from splitserve.router.errors import OpenAIError
from splitserve.router.metrics import RouterMetrics
from splitserve.router.orchestrator import Orchestrator, OrchestratorConfig
from splitserve.router.pd_client import PodClient
from splitserve.router.pod_state import PodPool
from splitserve.router.pod_watcher import PodWatcher, WatcherConfig
from splitserve.router.policies import DecodePolicy, RouteRequest, make_policy
from splitserve.router.routing import PodRouter

pytestmark = pytest.mark.asyncio

LONG = tuple(range(1, 41))  # 40 tokens: 10 blocks
SHORT = (5, 6, 7)


class Setup:
    def __init__(self, cluster: FakeCluster, prefill: list[FakeEngine], decode: list[FakeEngine],
                 unified: bool = False, **config: Any) -> None:
        self.cluster = cluster
        self.metrics = RouterMetrics()
        pre = [e.address for e in prefill]
        dec = [e.address for e in decode]
        self.router = PodRouter(make_policy("kv_affinity", BLOCK), DecodePolicy(BLOCK), PodPool(pre),
                                PodPool(dec), self.metrics)
        self.clients = {a: PodClient(a) for a in pre + dec}
        config.setdefault("pd_threshold_tokens", 16)
        self.orch = Orchestrator(self.router, self.clients, OrchestratorConfig(
            block_size=BLOCK, unified=unified, eos_token_ids=frozenset({EOS}), **config), self.metrics,
            seed_source=lambda: 1234)

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def run(self, request: BackendRequest) -> list[TokenChunk]:
        async with aclosing(self.orch.generate(request)) as chunks:
            return [c async for c in chunks]


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[FakeCluster]:
    c = FakeCluster()
    yield c
    await c.stop()


def request(prompt: tuple[int, ...] = LONG, max_tokens: int = 6, seed: int | None = 7,
            logprobs: int | None = None, rid: str = "r1") -> BackendRequest:
    params = SamplingParams(max_tokens=max_tokens, seed=seed, logprobs=logprobs, temperature=1.0)
    return BackendRequest(rid, prompt, params, tuple(hash_prompt_blocks(prompt, BLOCK)))


def tokens(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def test_disaggregated_path_streams_first_token_then_decode(cluster: FakeCluster) -> None:
    p = await cluster.add("p0", pb.ROLE_PREFILL)
    d = await cluster.add("d0", pb.ROLE_DECODE)
    s = Setup(cluster, [p], [d])
    chunks = await s.run(request(logprobs=2))
    assert tokens(chunks) == reference(LONG, 7, 6)
    assert chunks[0].token_ids == (reference(LONG, 7, 1)[0],) and chunks[0].finish_reason is None
    assert all(c.logprobs is not None and len(c.logprobs) == len(c.token_ids) for c in chunks)
    assert chunks[-1].finish_reason == "length" and chunks[-1].token_ids  # last token rides with it
    (dec,) = d.decodes
    assert tuple(dec.token_ids) == LONG + (chunks[0].token_ids[0],) and dec.num_prompt_tokens == len(LONG)
    assert dec.kv_handle.peer_address == p.address and not p.leases
    assert s.count("splitserve:pd_decisions_total", path="disaggregated") == 1
    for role, pod in (("prefill", p), ("decode", d)):  # the router's own in-flight count is undone
        load = s.router.pools[role].get(pod.address).load
        assert load.num_requests == 0 and load.queued_prompt_tokens == 0


async def test_short_uncached_prompt_goes_decode_only_and_seed_is_drawn(cluster: FakeCluster) -> None:
    p = await cluster.add("p0", pb.ROLE_PREFILL)
    d = await cluster.add("d0", pb.ROLE_DECODE)
    s = Setup(cluster, [p], [d])
    chunks = await s.run(request(SHORT, seed=None))
    assert tokens(chunks) == reference(SHORT, 1234, 6)
    assert not p.prefills and not d.decodes[0].HasField("kv_handle")
    assert d.decodes[0].sampling.seed == 1234
    assert s.count("splitserve:pd_decisions_total", path="decode_only") == 1


async def test_prefix_cached_on_decode_pod_skips_prefill(cluster: FakeCluster) -> None:
    p = await cluster.add("p0", pb.ROLE_PREFILL)
    d = await cluster.add("d0", pb.ROLE_DECODE)
    s = Setup(cluster, [p], [d])
    s.router.on_kv_events("decode", d.address, stored=hash_prompt_blocks(LONG, BLOCK)[:8])
    await s.run(request())  # 8 of 10 blocks there: 8 tokens missing < 16
    assert not p.prefills
    assert s.count("splitserve:pd_decisions_total", path="decode_only") == 1


async def test_seed_is_shared_by_prefill_and_decode(cluster: FakeCluster) -> None:
    p = await cluster.add("p0", pb.ROLE_PREFILL)
    d = await cluster.add("d0", pb.ROLE_DECODE)
    s = Setup(cluster, [p], [d])
    chunks = await s.run(request(seed=None))
    assert p.prefills[0].sampling.seed == d.decodes[0].sampling.seed == 1234
    assert tokens(chunks) == reference(LONG, 1234, 6)


async def test_first_token_ending_the_request_skips_decode(cluster: FakeCluster) -> None:
    p = await cluster.add("p0", pb.ROLE_PREFILL)
    d = await cluster.add("d0", pb.ROLE_DECODE)
    s = Setup(cluster, [p], [d])
    chunks = await s.run(request(max_tokens=1))
    assert len(chunks) == 1 and chunks[0].finish_reason == "length" and not d.decodes


async def test_eos_token_arrives_with_the_stop_reason(cluster: FakeCluster) -> None:
    p = await cluster.add("p0", pb.ROLE_PREFILL)
    d = await cluster.add("d0", pb.ROLE_DECODE)
    d.eos_at = 3
    s = Setup(cluster, [p], [d])
    chunks = await s.run(request(max_tokens=10))
    assert chunks[-1].token_ids == (EOS,) and chunks[-1].finish_reason == "stop"
    assert len(tokens(chunks)) == 4


async def test_prefill_failure_retries_on_another_pod(cluster: FakeCluster) -> None:
    p0 = await cluster.add("p0", pb.ROLE_PREFILL)
    p1 = await cluster.add("p1", pb.ROLE_PREFILL)
    d = await cluster.add("d0", pb.ROLE_DECODE)
    s = Setup(cluster, [p0, p1], [d])
    route = RouteRequest.from_prompt(LONG, BLOCK)
    first = s.router.policies["prefill"].choose(route, s.router.pools["prefill"].ready_pods(),
                                                s.router.indexes["prefill"]).pod_id
    failing, other = (p0, p1) if first == p0.address else (p1, p0)
    failing.prefill_failures = [grpc.StatusCode.UNAVAILABLE]
    chunks = await s.run(request())
    assert tokens(chunks) == reference(LONG, 7, 6)
    assert len(failing.prefills) == 1 and len(other.prefills) == 1
    assert d.decodes[0].kv_handle.peer_address == other.address
    assert s.count("splitserve:router_retries_total", role="prefill", reason="unavailable") == 1


async def test_all_prefill_pods_failing_falls_back_to_decode_only(cluster: FakeCluster) -> None:
    p = await cluster.add("p0", pb.ROLE_PREFILL)
    d = await cluster.add("d0", pb.ROLE_DECODE)
    p.prefill_failures = [grpc.StatusCode.INTERNAL] * 5
    s = Setup(cluster, [p], [d])
    chunks = await s.run(request())
    assert tokens(chunks) == reference(LONG, 7, 6)
    assert s.count("splitserve:pd_decisions_total", path="decode_only") == 1
    assert s.count("splitserve:router_retries_total", role="prefill", reason="fallback_decode_only") == 1


async def test_invalid_argument_becomes_a_400(cluster: FakeCluster) -> None:
    p = await cluster.add("p0", pb.ROLE_PREFILL)
    d = await cluster.add("d0", pb.ROLE_DECODE)
    p.prefill_failures = [grpc.StatusCode.INVALID_ARGUMENT]
    s = Setup(cluster, [p], [d])
    with pytest.raises(OpenAIError) as info:
        await s.run(request())
    assert info.value.status_code == 400 and len(p.prefills) == 1


async def test_other_errors_are_backend_errors(cluster: FakeCluster) -> None:
    p = await cluster.add("p0", pb.ROLE_PREFILL)
    d = await cluster.add("d0", pb.ROLE_DECODE)
    d.decode_failures = [grpc.StatusCode.FAILED_PRECONDITION]
    s = Setup(cluster, [p], [d])
    with pytest.raises(BackendError, match="FAILED_PRECONDITION"):
        await s.run(request(SHORT))


async def test_no_ready_pod_is_unavailable(cluster: FakeCluster) -> None:
    p = await cluster.add("p0", pb.ROLE_PREFILL)
    d = await cluster.add("d0", pb.ROLE_DECODE)
    s = Setup(cluster, [p], [d])
    s.router.pools["decode"].set_ready(d.address, False)
    with pytest.raises(BackendUnavailableError):
        await s.run(request())


async def test_expired_handle_makes_decode_compute_the_prompt(cluster: FakeCluster) -> None:
    p = await cluster.add("p0", pb.ROLE_PREFILL)
    d = await cluster.add("d0", pb.ROLE_DECODE)
    s = Setup(cluster, [p], [d])
    p.expire_leases = True
    chunks = await s.run(request())
    assert tokens(chunks) == reference(LONG, 7, 6)
    assert len(d.decodes) == 2 and not d.decodes[1].HasField("kv_handle")
    assert s.count("splitserve:router_retries_total", role="decode", reason="kv_handle_not_found") == 1


async def test_recomputed_kv_is_counted(cluster: FakeCluster) -> None:
    p = await cluster.add("p0", pb.ROLE_PREFILL)
    d = await cluster.add("d0", pb.ROLE_DECODE)
    d.kv_source = pb.KV_SOURCE_RECOMPUTED
    s = Setup(cluster, [p], [d])
    await s.run(request())
    assert s.count("splitserve:router_retries_total", role="decode", reason="kv_pull_recomputed") == 1


async def test_decode_pod_lost_mid_stream_fails_over(cluster: FakeCluster) -> None:
    p = await cluster.add("p0", pb.ROLE_PREFILL)
    d0 = await cluster.add("d0", pb.ROLE_DECODE)
    d1 = await cluster.add("d1", pb.ROLE_DECODE)
    for d in (d0, d1):
        d.decode_fail_after = 2
    s = Setup(cluster, [p], [d0, d1])
    chunks = await s.run(request(max_tokens=5))
    assert tokens(chunks) == reference(LONG, 7, 5)
    first, second = sorted(d0.decodes + d1.decodes, key=lambda r: len(r.token_ids))
    assert len(first.token_ids) == len(LONG) + 1 and len(second.token_ids) == len(LONG) + 3
    assert not second.HasField("kv_handle")
    assert s.count("splitserve:router_retries_total", role="decode", reason="unavailable") == 1


async def test_closing_mid_stream_cancels_decode_and_aborts(cluster: FakeCluster) -> None:
    p = await cluster.add("p0", pb.ROLE_PREFILL)
    d = await cluster.add("d0", pb.ROLE_DECODE)
    d.token_delay_s = 0.02
    s = Setup(cluster, [p], [d])
    async with aclosing(s.orch.generate(request(max_tokens=100))) as chunks:
        seen = 0
        async for _ in chunks:
            seen += 1
            if seen == 3:
                break
    await s.orch.aclose()
    for _ in range(100):
        if not d.running:
            break
        await asyncio.sleep(0.01)
    assert not d.running and not p.leases
    assert "r1" in d.aborts and "r1" in p.aborts


async def test_cancel_during_prefill_aborts_the_prefill_pod(cluster: FakeCluster) -> None:
    p = await cluster.add("p0", pb.ROLE_PREFILL)
    d = await cluster.add("d0", pb.ROLE_DECODE)
    p.prefill_delay_s = 10
    s = Setup(cluster, [p], [d])
    task = asyncio.create_task(s.run(request()))
    await p.prefill_started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await s.orch.aclose()
    assert p.aborts == ["r1"] and not d.decodes


async def test_unified_pods_decode_without_handle(cluster: FakeCluster) -> None:
    u0 = await cluster.add("u0", pb.ROLE_UNIFIED)
    u1 = await cluster.add("u1", pb.ROLE_UNIFIED)
    s = Setup(cluster, [u0, u1], [], unified=True)
    chunks = await s.run(request(logprobs=0))
    assert tokens(chunks) == reference(LONG, 7, 6)
    (dec,) = u0.decodes + u1.decodes
    assert not dec.HasField("kv_handle") and not u0.prefills and not u1.prefills
    assert s.count("splitserve:pd_decisions_total", path="unified") == 1


async def test_watcher_tracks_readiness_load_and_kv_events(cluster: FakeCluster) -> None:
    p = await cluster.add("p0", pb.ROLE_PREFILL)
    d = await cluster.add("d0", pb.ROLE_DECODE)
    s = Setup(cluster, [p], [d])
    watcher = PodWatcher(s.router, s.clients, {p.address: "prefill", d.address: "decode"},
                         WatcherConfig(poll_interval_s=0.02, backoff_min_s=0.02))
    watcher.start()
    try:
        assert not watcher.ready()
        for _ in range(200):
            if watcher.ready():
                break
            await asyncio.sleep(0.01)
        assert watcher.ready()
        await p.events.put(hash_prompt_blocks(SHORT * 4, BLOCK))
        for _ in range(200):
            if s.router.indexes["prefill"].match_length(p.address, hash_prompt_blocks(SHORT * 4, BLOCK)):
                break
            await asyncio.sleep(0.01)
        assert s.router.indexes["prefill"].match_length(p.address, hash_prompt_blocks(SHORT * 4, BLOCK)) == 3
        assert s.router.pools["decode"].get(d.address).load.total_blocks == 100
        await cluster.servers[1].stop(grace=None)  # the decode pod goes away
        for _ in range(300):
            if not watcher.ready():
                break
            await asyncio.sleep(0.01)
        assert not watcher.ready()
    finally:
        await watcher.stop()
