"""The KEDA external scaler: the core's metrics and activity, the measured
prefill rate, and the gRPC service over a real port with a client generated
from the same proto/externalscaler.proto (KEDA's side, played by the test).
Pods are fake Engine servers (test doubles)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
import pytest_asyncio
from test_router_membership_fakes import add_pod, http_router, no_leaks, until
from test_router_orchestrator_fakes import BLOCK, FakeCluster
from test_router_support import tokenizer

from splitserve.proto import externalscaler_pb2 as es
from splitserve.proto import externalscaler_pb2_grpc as es_grpc
from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.router.membership import DiscoveredPod, Snapshot
from splitserve.router.metrics import RouterMetrics
from splitserve.router.pod_state import PodLoad, PodPool
from splitserve.router.policies import DecodePolicy, make_policy
from splitserve.router.prefill_rate import DEFAULT_PREFILL_TOKENS_PER_S, PrefillRate
from splitserve.router.request_queue import QueuedRequest
from splitserve.router.routing import PodRouter
from splitserve.router.scaler_core import ScalerConfig, ScalerCore
from splitserve.router.scaler_probe import measure_push_latency
from splitserve.router.scaler_servicer import ScalerServer


def test_the_prefill_rate_is_measured_over_busy_time_with_a_stated_default() -> None:
    rate = PrefillRate(half_life_s=1e9)
    assert not rate.measured and rate.tokens_per_s() == DEFAULT_PREFILL_TOKENS_PER_S
    # two overlapping prefills on one pod: 3000 tokens in 1.0 s of busy time (not 1.5 s of calls)
    rate.prefill_started("p0", 10.0)
    rate.prefill_started("p0", 10.5)
    rate.prefill_finished("p0", 1000, 10.75)
    rate.prefill_finished("p0", 2000, 11.0)
    assert rate.measured and rate.tokens_per_s() == pytest.approx(3000.0)
    rate.prefill_started("p1", 20.0)  # a second pod at 1000 tokens/s
    rate.prefill_finished("p1", 1000, 21.0)
    assert rate.tokens_per_s() == pytest.approx(2000.0)
    rate.prefill_finished("p2", 5, 30.0)  # never started: ignored
    assert rate.tokens_per_s() == pytest.approx(2000.0)


def test_old_measurements_fade() -> None:
    rate = PrefillRate(half_life_s=10.0)
    rate.prefill_started("p0", 0.0)
    rate.prefill_finished("p0", 1000, 1.0)  # 1000 tokens/s
    rate.prefill_started("p0", 100.0)  # much later, the pod got 10x faster
    rate.prefill_finished("p0", 10000, 101.0)
    assert rate.tokens_per_s() > 9000


def core_with(pods: dict[str, list[tuple[str, PodLoad]]], queued: list[QueuedRequest] | None = None,
              rate: PrefillRate | None = None) -> ScalerCore:
    pools = {role: PodPool() for role in ("prefill", "decode", "unified")}
    for role, entries in pods.items():
        for pod_id, load in entries:
            pools[role].add(pod_id)
            pools[role].update_load(pod_id, load)
    router = PodRouter(make_policy("kv_affinity", BLOCK), DecodePolicy(BLOCK), pools["prefill"], pools["decode"],
                       RouterMetrics(), unified_pods=pools["unified"])
    return ScalerCore(router, rate or PrefillRate(), router.metrics, lambda: list(queued or []),
                      ScalerConfig(max_num_seqs=10, activation_hold_s=5.0), clock=lambda: 100.0)


def test_metrics_follow_load_and_include_the_router_s_queue() -> None:
    rate = PrefillRate(half_life_s=1e9)
    rate.prefill_started("p0", 0.0)
    rate.prefill_finished("p0", 4000, 1.0)  # measured: 4000 tokens/s
    queued = [QueuedRequest("decode", 2000, True, 0.0), QueuedRequest("decode", 10, False, 0.0)]
    core = core_with({
        "prefill": [("p0", PodLoad(queued_prompt_tokens=6000)), ("p1", PodLoad(queued_prompt_tokens=0))],
        "decode": [("d0", PodLoad(running_seqs=5, free_blocks=90, total_blocks=100)),     # 0.5 by sequences
                   ("d1", PodLoad(running_seqs=1, free_blocks=10, total_blocks=100))],   # 0.9 by KV
    }, queued, rate)
    assert core.metric_value("prefill") == pytest.approx((6000 + 2000) / 4000)  # seconds of work
    assert core.metric_value("decode") == pytest.approx(0.5 + 0.9 + 2 / 10)
    assert core.metric_value("unified") == 0.0
    assert core.metrics.registry.get_sample_value("splitserve:scaler_metric_value", {"pool": "decode"}) == \
        pytest.approx(1.6)
    assert core.is_active("prefill") and core.is_active("decode") and not core.is_active("unified")
    core.router.pools["decode"].set_draining("d0", True)  # a leaving pod's load is not the pool's
    assert core.metric_value("decode") == pytest.approx(0.9 + 2 / 10)


def test_demand_at_an_empty_pool_keeps_it_active_for_the_hold() -> None:
    now = [100.0]
    core = core_with({})
    core.clock = lambda: now[0]
    assert not core.is_active("prefill")
    core.demand("prefill", arrival=99.0)
    assert core.is_active("prefill")
    now[0] += 6.0
    assert not core.is_active("prefill")


@pytest.mark.parametrize("metadata, message", [
    ({}, "pool"), ({"pool": "gpu"}, "pool"), ({"pool": "decode", "target": "lots"}, "number"),
    ({"pool": "decode", "target": "-1"}, "> 0"), ({"pool": "decode", "target": "nan"}, "> 0"),
])
def test_bad_scaler_metadata_is_refused_with_a_message(metadata: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScalerCore.query(metadata)
    assert ScalerCore.query({"pool": "prefill"}).target == 2.0
    assert ScalerCore.query({"pool": "decode", "target": "0.5"}).target == 0.5


# -- over a real gRPC port -----------------------------------------------------------


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[FakeCluster]:
    c = FakeCluster()
    yield c
    await c.stop()


def ref(pool: str, **extra: str) -> es.ScaledObjectRef:
    return es.ScaledObjectRef(name=f"sp-{pool}", namespace="default", scalerMetadata={"pool": pool, **extra})


BODY = {"model": "tiny", "prompt": "scale me up, " * 8, "max_tokens": 20, "temperature": 0}


@pytest.mark.asyncio
async def test_the_scaler_service_answers_keda_over_grpc(cluster: FakeCluster) -> None:
    p = await add_pod(cluster, "p0", pb.ROLE_PREFILL)
    d = await add_pod(cluster, "d0", pb.ROLE_DECODE)
    d.token_delay_s = 0.05
    p.prefill_delay_s = 0.06  # long enough to measure a rate (PrefillRate.min_busy_s)
    async with http_router(tokenizer()) as (parts, url):
        server = ScalerServer(parts.scaler, "127.0.0.1", 0)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = es_grpc.ExternalScalerStub(channel)
                spec = await stub.GetMetricSpec(ref("decode", target="0.6"))
                assert [(m.metricName, m.targetSizeFloat, m.targetSize) for m in spec.metricSpecs] == [
                    ("splitserve-decode", 0.6, 1)]
                streamed = stub.StreamMetricSpec(ref("prefill"))
                assert (await streamed.read()).metricSpecs[0].targetSizeFloat == 2.0
                streamed.cancel()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.IsActive(ref("gpu"))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pool" in info.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetMetrics(es.GetMetricsRequest(scaledObjectRef=ref("decode"), metricName="x"))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

                parts.registry.apply(Snapshot.of([DiscoveredPod("prefill", p.address),
                                                  DiscoveredPod("decode", d.address)]))
                await until(lambda: parts.queue.can_start() and parts.registry.router.has_ready("prefill"),
                            "pods ready")
                assert not (await stub.IsActive(ref("decode"))).result, "idle"
                idle = await stub.GetMetrics(es.GetMetricsRequest(scaledObjectRef=ref("decode"),
                                                                  metricName="splitserve-decode"))
                assert idle.metricValues[0].metricValueFloat == 0.0

                async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                    running = [asyncio.create_task(client.post("/v1/completions", json=BODY)) for _ in range(2)]
                    await until(lambda: len(d.running) == 2, "two streams on the decode pod")
                    await asyncio.sleep(0.1)  # a poll or two: GetLoad reports them
                    busy = await stub.GetMetrics(es.GetMetricsRequest(scaledObjectRef=ref("decode")))
                    value = busy.metricValues[0]
                    assert value.metricName == "splitserve-decode" and value.metricValueFloat > 0
                    assert value.metricValue == round(value.metricValueFloat)
                    assert (await stub.IsActive(ref("decode"))).result
                    assert all(r.status_code == 200 for r in await asyncio.gather(*running))
                await until(lambda: not d.running, "streams done")
                await asyncio.sleep(0.1)
                after = await stub.GetMetrics(es.GetMetricsRequest(scaledObjectRef=ref("decode")))
                assert after.metricValues[0].metricValueFloat == 0.0
                assert parts.scaler.rate.measured, "the prefill rate was measured from real Prefill calls"
        finally:
            await server.stop()
        await no_leaks(p, d)


@pytest.mark.asyncio
async def test_stream_is_active_pushes_true_when_a_request_meets_an_empty_pool(
        cluster: FakeCluster, record_property, capsys: pytest.CaptureFixture) -> None:
    p = await add_pod(cluster, "p0", pb.ROLE_PREFILL)
    d = await add_pod(cluster, "d0", pb.ROLE_DECODE, answering=False)  # the decode pool is at zero
    async with http_router(tokenizer()) as (parts, url):
        server = ScalerServer(parts.scaler, "127.0.0.1", 0)
        await server.start()
        try:
            parts.registry.apply(Snapshot.of([DiscoveredPod("prefill", p.address),
                                              DiscoveredPod("decode", d.address)]))
            await until(lambda: parts.registry.router.has_ready("prefill"), "prefill ready")
            address = f"127.0.0.1:{server.port}"
            async with grpc.aio.insecure_channel(address) as channel:
                stub = es_grpc.ExternalScalerStub(channel)
                assert not (await stub.IsActive(ref("decode"))).result, "nothing wants decode yet"
            timings = []
            for i in range(3):
                started = time.monotonic()
                timing = await measure_push_latency(address, url, "decode", {**BODY, "prompt": f"wake {i}"})
                assert started <= timing.sent_at <= timing.received_at
                timings.append(timing.latency_s)
                await until(lambda: parts.queue.waiting() == [], "the abandoned request leaves the queue")
            async with grpc.aio.insecure_channel(address) as channel:
                stub = es_grpc.ExternalScalerStub(channel)
                assert (await stub.IsActive(ref("decode"))).result, "recent demand keeps it active"
            # the pod comes up: a queued request completes
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                waiting = asyncio.create_task(client.post("/v1/completions", json=BODY))
                await until(lambda: len(parts.queue.waiting()) == 1, "queued")
                d.answering = True
                assert (await waiting).status_code == 200
        finally:
            await server.stop()
        ms = ", ".join(f"{t * 1e3:.2f}" for t in timings)
        record_property("push_latency_ms", ms)
        with capsys.disabled():
            print(f"\nStreamIsActive push latency (request sent -> true received), ms: {ms}")
        await no_leaks(p, d)
