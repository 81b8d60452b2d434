"""Live membership through the transport-free core: ``Membership`` diffs,
and ``PodRegistry`` applying them to pools, watcher and channels while
requests run over real gRPC against fake Engine pods (test doubles)."""
from __future__ import annotations

import asyncio

import pytest
from test_router_membership_fakes import LONG, LiveRouter, add_pod, no_leaks, request, until, cluster, live_router_fixture  # noqa: F401 - cluster is a fixture
from test_router_orchestrator_fakes import FakeCluster, reference

from splitserve.engine.block_hash import hash_prompt_blocks
from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.router.membership import DiscoveredPod, Membership, Snapshot

BLOCK = 4


def pods(*entries: tuple[str, str, str]) -> Snapshot:
    return Snapshot.of(DiscoveredPod(role, address, state) for role, address, state in entries)


def kinds(events) -> list[tuple[str, str]]:
    return [(e.kind, e.pod.address) for e in events]


def test_membership_diffs_full_snapshots() -> None:
    m = Membership()
    assert kinds(m.apply(pods(("prefill", "a:1", "ready"), ("decode", "b:1", "ready")))) == [
        ("added", "a:1"), ("added", "b:1")]
    assert m.apply(pods(("prefill", "a:1", "ready"), ("decode", "b:1", "ready"))) == []
    assert kinds(m.apply(pods(("prefill", "a:1", "draining"), ("decode", "b:1", "ready")))) == [
        ("draining", "a:1")]
    assert kinds(m.apply(pods(("prefill", "a:1", "ready"), ("decode", "b:1", "ready")))) == [("ready", "a:1")]
    # a role change is a removal then an addition; removals come first
    events = m.apply(pods(("decode", "a:1", "ready"), ("decode", "c:1", "ready")))
    assert kinds(events) == [("removed", "a:1"), ("removed", "b:1"), ("added", "a:1"), ("added", "c:1")]
    assert events[0].pod.role == "prefill" and events[2].pod.role == "decode"
    assert kinds(m.apply(Snapshot.of([]))) == [("removed", "a:1"), ("removed", "c:1")]


@pytest.mark.parametrize("role, address, state, message", [
    ("prefil", "a:1", "ready", "role"),
    ("decode", "a", "ready", "HOST:PORT"),
    ("decode", "a:99999", "ready", "HOST:PORT"),
    ("decode", "::1:80", "ready", "IPv6"),
    ("decode", "a:1", "gone", "state"),
])
def test_bad_pods_are_rejected_with_a_message(role: str, address: str, state: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiscoveredPod(role, address, state)


def test_an_address_twice_with_different_roles_is_rejected() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        pods(("prefill", "a:1", "ready"), ("decode", "a:1", "ready"))
    assert DiscoveredPod("decode", "[fd00::1]:50051").address == "[fd00::1]:50051"


live = live_router_fixture()



@pytest.mark.asyncio
async def test_a_joining_pod_gets_traffic_only_once_its_getload_answers(cluster: FakeCluster,
                                                                       live: LiveRouter) -> None:
    p = await add_pod(cluster, "p0", pb.ROLE_PREFILL)
    d0 = await add_pod(cluster, "d0", pb.ROLE_DECODE)
    live.apply(("prefill", p), ("decode", d0))
    await until(lambda: live.ready_ids("decode") == [d0.address], "d0 ready")
    d1 = await add_pod(cluster, "d1", pb.ROLE_DECODE, answering=False)
    events = live.apply(("prefill", p), ("decode", d0), ("decode", d1))
    assert [(e.kind, e.pod.address) for e in events] == [("added", d1.address)]
    assert d1.address in live.router.pools["decode"] and live.watcher.watching(d1.address)
    for i in range(8):  # d1 is known but not ready: every request goes to d0
        await live.run(request(LONG[i:] + LONG[:i], rid=f"r{i}"))
    assert d1.decodes == [] and len(d0.decodes) == 8
    assert live.sample("splitserve:router_pods", pool="decode", state="not_ready") == 1
    d1.answering = True
    await until(lambda: d1.address in live.ready_ids("decode"), "d1 ready after its GetLoad answers")
    assert live.sample("splitserve:router_pods", pool="decode", state="ready") == 2
    assert live.sample("splitserve:discovery_events_total", source="test", kind="added") == 3
    for i in range(8):  # fresh prompts: no prefix on d0 draws them there
        await live.run(request(tuple(range(100 + 40 * i, 140 + 40 * i)), rid=f"s{i}"))
    assert d1.decodes, "the joined pod takes work once ready"
    await no_leaks(p, d0, d1)


@pytest.mark.asyncio
async def test_a_draining_pod_gets_no_new_work_and_its_stream_finishes(cluster: FakeCluster,
                                                                      live: LiveRouter) -> None:
    p = await add_pod(cluster, "p0", pb.ROLE_PREFILL)
    d0 = await add_pod(cluster, "d0", pb.ROLE_DECODE)
    d1 = await add_pod(cluster, "d1", pb.ROLE_DECODE)
    for d in (d0, d1):
        d.token_delay_s = 0.02
    live.apply(("prefill", p), ("decode", d0), ("decode", d1))
    await until(lambda: len(live.ready_ids("decode")) == 2, "both decode pods ready")
    first = asyncio.create_task(live.run(request(max_tokens=20)))
    await until(lambda: bool(d0.running or d1.running), "the first stream runs")
    busy, other = (d0, d1) if d0.running else (d1, d0)
    live.apply(("prefill", p), ("decode", busy, "draining"), ("decode", other))
    assert live.ready_ids("decode") == [other.address]
    assert live.sample("splitserve:router_pods", pool="decode", state="draining") == 1
    await asyncio.sleep(0.1)  # a few polls: GetLoad answering must not bring it back
    assert live.ready_ids("decode") == [other.address]
    second = await live.run(request(LONG[::-1], max_tokens=3, rid="r2"))
    assert [t for c in second for t in c.token_ids] == reference(LONG[::-1], 7, 3)
    assert [d.request_id for d in other.decodes] == ["r2"]
    chunks = await first
    assert [t for c in chunks for t in c.token_ids] == reference(LONG, 7, 20)
    assert chunks[-1].finish_reason == "length"
    assert busy.cancelled == [] and "r1" not in busy.aborts
    live.apply(("prefill", p), ("decode", busy), ("decode", other))  # back in rotation
    await until(lambda: len(live.ready_ids("decode")) == 2, "undrained pod ready again")
    await no_leaks(p, busy, other)


@pytest.mark.asyncio
async def test_a_removed_pod_loses_its_index_and_watcher_and_closes_after_its_stream(
        cluster: FakeCluster, live: LiveRouter) -> None:
    p = await add_pod(cluster, "p0", pb.ROLE_PREFILL)
    d0 = await add_pod(cluster, "d0", pb.ROLE_DECODE)
    d1 = await add_pod(cluster, "d1", pb.ROLE_DECODE)
    d0.token_delay_s = d1.token_delay_s = 0.02
    live.apply(("prefill", p), ("decode", d0), ("decode", d1))
    await until(lambda: len(live.ready_ids("decode")) == 2, "decode pods ready")
    hashes = hash_prompt_blocks(LONG, BLOCK)
    running = asyncio.create_task(live.run(request(max_tokens=20)))
    await until(lambda: bool(d0.running or d1.running), "the stream runs")
    gone, stays = (d0, d1) if d0.running else (d1, d0)
    live.router.on_kv_events("decode", gone.address, stored=hashes)
    assert live.router.indexes["decode"].match_length(gone.address, hashes) == len(hashes)
    live.apply(("prefill", p), ("decode", stays))
    assert gone.address not in live.router.pools["decode"]
    assert live.router.indexes["decode"].match_length(gone.address, hashes) == 0
    assert not live.watcher.watching(gone.address) and gone.address not in live.channels
    assert live.closed == [] and live.channels.num_retiring == 1  # held by the running stream
    chunks = await running
    assert [t for c in chunks for t in c.token_ids] == reference(LONG, 7, 20)
    await until(lambda: live.closed == [gone.address], "the departed pod's channel closes")
    assert live.channels.num_retiring == 0
    polls_after = len(gone.decodes)
    await live.run(request(LONG[::-1], max_tokens=2, rid="r2"))
    assert len(gone.decodes) == polls_after and stays.decodes
    # it comes back under the same address: a fresh channel, watched again
    live.apply(("prefill", p), ("decode", stays), ("decode", gone))
    await until(lambda: gone.address in live.ready_ids("decode"), "re-joined pod ready")
    assert live.sample("splitserve:discovery_events_total", source="test", kind="removed") == 1
    await no_leaks(p, gone, stays)


@pytest.mark.asyncio
async def test_a_pod_removed_between_routing_and_its_call_is_retried_elsewhere(
        cluster: FakeCluster, live: LiveRouter) -> None:
    p = await add_pod(cluster, "p0", pb.ROLE_PREFILL)
    d0 = await add_pod(cluster, "d0", pb.ROLE_DECODE)
    d1 = await add_pod(cluster, "d1", pb.ROLE_DECODE)
    p.prefill_delay_s = 0.2
    live.apply(("prefill", p), ("decode", d0), ("decode", d1))
    await until(lambda: len(live.ready_ids("decode")) == 2 and live.ready_ids("prefill"), "pods ready")
    task = asyncio.create_task(live.run(request()))
    await p.prefill_started.wait()  # the decode pod is chosen before the prefill
    chosen = max((d0, d1), key=lambda d: live.router.pools["decode"].get(d.address).load.num_requests)
    other = d1 if chosen is d0 else d0
    live.apply(("prefill", p), ("decode", other))
    chunks = await task
    assert [t for c in chunks for t in c.token_ids] == reference(LONG, 7, 6)
    assert chosen.decodes == [] and len(other.decodes) == 1
    assert live.sample("splitserve:router_retries_total", role="decode", reason="unavailable") == 1
    await no_leaks(p, d0, d1)


@pytest.mark.asyncio
async def test_unified_pods_serve_when_no_decode_pool_exists(cluster: FakeCluster, live: LiveRouter) -> None:
    u = await add_pod(cluster, "u0", pb.ROLE_UNIFIED)
    live.apply(("unified", u))
    await until(lambda: live.ready_ids("unified") == [u.address], "unified pod ready")
    chunks = await live.run(request())
    assert [t for c in chunks for t in c.token_ids] == reference(LONG, 7, 6)
    assert len(u.decodes) == 1 and not u.decodes[0].HasField("kv_handle")
    assert live.sample("splitserve:pd_decisions_total", path="unified") == 1
    await no_leaks(u)
