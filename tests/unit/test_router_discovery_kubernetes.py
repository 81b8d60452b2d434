"""``--discovery kubernetes`` through the REAL ``kubernetes`` client, over a
socket, against a TEST DOUBLE of the API server (tests/unit/
kubernetes_api_double.py; not a cluster), pointed at by a
generated kubeconfig. Pods are fake Engine servers (test doubles) on
127.0.0.2.. sharing one port, as a Service's endpoints do.

Covered: join via watch, a terminating endpoint that drains then leaves, a
DELETE lost across a watch reconnect repaired by the next full LIST, 410
Gone -> relist, API errors and garbage keeping the last good view. Plus the
pure EndpointSlice -> pod rules."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes_api_double import FakeKubernetesAPI, endpoint
from test_router_membership_fakes import LONG, LiveRouter, add_pod, no_leaks, request, until, cluster, live_router_fixture  # noqa: F401 - cluster is a fixture
from test_router_orchestrator_fakes import FakeCluster, reference

from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.router.discovery import DiscoveryConfig, DiscoveryFeed
from splitserve.router.discovery_kubernetes import KubernetesDiscovery, default_namespace
from splitserve.router.endpoint_slices import endpoint_state, merge_pods, slice_pods
from splitserve.router.membership import DiscoveredPod, Snapshot

SERVICES = {"prefill": "sp-prefill", "decode": "sp-decode"}


@pytest.mark.parametrize("conditions, state", [
    ({"ready": True}, "ready"),
    ({}, "ready"),  # unknown reads as ready, as the API says
    ({"ready": False}, None),
    ({"ready": False, "serving": False}, None),
    ({"ready": False, "serving": True, "terminating": True}, "draining"),
    ({"ready": False, "serving": False, "terminating": True}, None),
    ({"terminating": True}, "draining"),
])
def test_endpoint_conditions(conditions: dict, state: str | None) -> None:
    assert endpoint_state(conditions) == state


def test_slice_pods_take_the_named_port_and_first_addresses() -> None:
    base = {"addressType": "IPv4", "metadata": {"name": "s"},
            "ports": [{"name": "http", "port": 8081}, {"name": "grpc", "port": 50051}],
            "endpoints": [endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False),
                          {"addresses": ["10.0.0.3", "10.0.0.9"], "conditions": {"ready": True}},
                          endpoint("10.0.0.4", ready=False, serving=True, terminating=True)]}
    assert slice_pods("decode", base, "grpc") == [
        DiscoveredPod("decode", "10.0.0.1:50051"), DiscoveredPod("decode", "10.0.0.3:50051"),
        DiscoveredPod("decode", "10.0.0.4:50051", "draining")]
    assert slice_pods("decode", base, "kv") == []  # no such port: no pods
    v6 = {**base, "addressType": "IPv6", "endpoints": [endpoint("fd00::7")]}
    assert slice_pods("prefill", v6, "grpc") == [DiscoveredPod("prefill", "[fd00::7]:50051")]
    with pytest.raises(ValueError, match="addressType"):
        slice_pods("decode", {**base, "addressType": "Unix"}, "grpc")
    with pytest.raises(ValueError, match="port"):
        slice_pods("decode", {**base, "ports": [{"name": "grpc", "port": "x"}]}, "grpc")


def test_a_pod_in_two_slices_is_ready_if_either_says_so() -> None:
    merged = merge_pods([DiscoveredPod("decode", "a:1", "draining"), DiscoveredPod("decode", "a:1"),
                         DiscoveredPod("decode", "b:1", "draining")])
    assert sorted((p.address, p.state) for p in merged) == [("a:1", "ready"), ("b:1", "draining")]


def test_namespace_defaults_to_the_service_account_s(tmp_path: Path) -> None:
    (tmp_path / "namespace").write_text("serving\n")
    assert default_namespace(tmp_path / "namespace") == "serving"
    assert default_namespace(tmp_path / "missing") == "default"
    with pytest.raises(ValueError, match="--decode-service"):
        DiscoveryConfig("kubernetes", prefill_service="p")
    config = DiscoveryConfig("kubernetes", prefill_service="p", decode_service="d", namespace="ns")
    source = KubernetesDiscovery.from_config(config)
    assert source.services == {"prefill": "p", "decode": "d"} and source.namespace == "ns"


# -- through the real client --------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubernetesAPI]:
    double = FakeKubernetesAPI()
    double.start()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a cluster: use the kubeconfig
    monkeypatch.setenv("KUBECONFIG", str(double.write_kubeconfig(tmp_path / "kubeconfig")))
    yield double
    double.stop()


live = live_router_fixture("kubernetes")


async def pods_on_one_port(cluster: FakeCluster, *specs: tuple[str, int]) -> tuple[int, list]:
    """Fake pods on 127.0.0.2, .3, ... all on the same port (one Service port)."""
    for _ in range(5):
        engines = []
        try:
            first = await add_pod(cluster, specs[0][0], specs[0][1], host="127.0.0.2")
            port = int(first.address.rsplit(":", 1)[1])
            engines.append(first)
            for i, (name, role) in enumerate(specs[1:], start=3):
                engines.append(await add_pod(cluster, name, role, host=f"127.0.0.{i}", port=port))
            return port, engines
        except RuntimeError:  # that port is taken on another loopback address: try another
            continue
    raise RuntimeError("no port free on every loopback address")


def ip(engine) -> str:
    return engine.address.rsplit(":", 1)[0]


class RecordingFeed(DiscoveryFeed):
    """The real feed, also recording each publish's origin and pod addresses."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[str, frozenset[str], int]] = []
        self.api: FakeKubernetesAPI | None = None

    def publish(self, snapshot: Snapshot, origin: str = "watch") -> None:
        lists = self.api.count(self.api.lists, "sp-decode") if self.api else 0
        self.log.append((origin, frozenset(snapshot.pods), lists))
        super().publish(snapshot, origin)


def start(live: LiveRouter, api: FakeKubernetesAPI, reconcile_s: float) -> tuple[asyncio.Task, RecordingFeed]:
    feed = RecordingFeed(live.registry, live.metrics, "kubernetes")
    feed.api = api
    source = KubernetesDiscovery(SERVICES, "default", "grpc", reconcile_s=reconcile_s, watch_timeout_s=5,
                                 backoff_min_s=0.05, backoff_max_s=0.2, request_timeout_s=5)
    return asyncio.create_task(source.run(feed)), feed


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.asyncio
async def test_watch_joins_pods_and_a_terminating_endpoint_drains_then_leaves(
        api: FakeKubernetesAPI, cluster: FakeCluster, live: LiveRouter) -> None:
    port, (p, d0, d1, d2) = await pods_on_one_port(
        cluster, ("p0", pb.ROLE_PREFILL), ("d0", pb.ROLE_DECODE), ("d1", pb.ROLE_DECODE), ("d2", pb.ROLE_DECODE))
    d0.token_delay_s = d1.token_delay_s = 0.02
    api.put("sp-prefill-x", "sp-prefill", [endpoint(ip(p))], port)
    api.put("sp-decode-x", "sp-decode", [endpoint(ip(d0))], port)
    api.put("other-svc-x", "unrelated", [endpoint("127.0.0.9")], port)  # another Service: ignored
    task, feed = start(live, api, reconcile_s=30)
    try:
        await until(lambda: live.ready_ids("decode") == [d0.address], "d0 listed and ready")
        api.bookmark()
        api.put("sp-decode-x", "sp-decode", [endpoint(ip(d0)), endpoint(ip(d1)), endpoint(ip(d2), ready=False)], port)
        await until(lambda: live.ready_ids("decode") == sorted([d0.address, d1.address]), "d1 joins by watch")
        assert d2.address not in live.router.pools["decode"], "a not-ready endpoint is no candidate"
        running = asyncio.create_task(live.run(request(max_tokens=20)))
        await until(lambda: bool(d0.running or d1.running), "a stream runs")
        busy, other = (d0, d1) if d0.running else (d1, d0)
        api.put("sp-decode-x", "sp-decode", [
            endpoint(ip(busy), ready=False, serving=True, terminating=True), endpoint(ip(other))], port)
        await until(lambda: live.ready_ids("decode") == [other.address], "the terminating pod drains")
        assert live.router.pools["decode"].get(busy.address).draining
        await live.run(request(LONG[::-1], max_tokens=2, rid="r2"))
        assert [r.request_id for r in other.decodes] == ["r2"]
        chunks = await running
        assert [t for c in chunks for t in c.token_ids] == reference(LONG, 7, 20)
        assert busy.cancelled == []
        api.put("sp-decode-x", "sp-decode", [
            endpoint(ip(busy), ready=False, serving=False, terminating=True), endpoint(ip(other))], port)
        await until(lambda: busy.address not in live.router.pools["decode"], "then it leaves")
        assert live.sample("splitserve:discovery_repairs_total", source="kubernetes") == 0
        assert live.sample("splitserve:discovery_errors_total", source="kubernetes") == 0
        assert api.count(api.lists, "sp-decode") == 1, "one LIST, then the watch did the rest"
        assert all(o == "watch" for o, _, _ in feed.log)
        await no_leaks(p, d0, d1)
    finally:
        await stop(task)


@pytest.mark.asyncio
async def test_a_delete_lost_across_a_watch_reconnect_is_repaired_by_the_next_full_list(
        api: FakeKubernetesAPI, cluster: FakeCluster, live: LiveRouter) -> None:
    port, (p, d0, d1) = await pods_on_one_port(
        cluster, ("p0", pb.ROLE_PREFILL), ("d0", pb.ROLE_DECODE), ("d1", pb.ROLE_DECODE))
    api.put("sp-prefill-x", "sp-prefill", [endpoint(ip(p))], port)
    api.put("sp-decode-a", "sp-decode", [endpoint(ip(d0))], port)
    api.put("sp-decode-b", "sp-decode", [endpoint(ip(d1))], port)
    task, feed = start(live, api, reconcile_s=0.5)
    try:
        await until(lambda: len(live.ready_ids("decode")) == 2, "both decode pods ready")
        watches = api.count(api.watches, "sp-decode")
        api.hold_watches(True)
        api.drop_watches()  # the client reconnects ...
        await until(lambda: api.count(api.watches, "sp-decode") > watches, "the decode watch reconnecting")
        lists_before = api.count(api.lists, "sp-decode")
        api.delete("sp-decode-b", lose_event=True)  # ... and the DELETE falls between the two watches
        api.hold_watches(False)
        await until(lambda: d1.address not in live.router.pools["decode"], "the ghost pod removed")
        origin, pods, lists = next(e for e in feed.log if d1.address not in e[1] and d0.address in e[1])
        assert origin == "reconcile", "the watch never told: only the full list could"
        assert lists == lists_before + 1, "repaired by the first full list after the loss"
        assert live.sample("splitserve:discovery_repairs_total", source="kubernetes") == 1
        assert live.ready_ids("decode") == [d0.address]
        assert live.sample("splitserve:router_pods", pool="decode", state="ready") == 1
    finally:
        await stop(task)


@pytest.mark.asyncio
async def test_410_gone_relists_at_once(api: FakeKubernetesAPI, cluster: FakeCluster, live: LiveRouter,
                                        caplog: pytest.LogCaptureFixture) -> None:
    port, (p, d0, d1) = await pods_on_one_port(
        cluster, ("p0", pb.ROLE_PREFILL), ("d0", pb.ROLE_DECODE), ("d1", pb.ROLE_DECODE))
    api.put("sp-prefill-x", "sp-prefill", [endpoint(ip(p))], port)
    api.put("sp-decode-x", "sp-decode", [endpoint(ip(d0))], port)
    caplog.set_level(logging.INFO, logger="splitserve.router.discovery_kubernetes")
    task, feed = start(live, api, reconcile_s=60)  # no periodic list in this test's time
    try:
        await until(lambda: live.ready_ids("decode") == [d0.address], "d0 ready")
        watches = api.count(api.watches, "sp-decode")
        api.hold_watches(True)
        api.drop_watches()
        await until(lambda: api.count(api.watches, "sp-decode") > watches, "the decode watch reconnecting")
        api.put("sp-decode-x", "sp-decode", [endpoint(ip(d0)), endpoint(ip(d1))], port)
        api.compact()  # the version the client resumes from is gone: ERROR 410 on the watch
        api.hold_watches(False)
        await until(lambda: d1.address in live.ready_ids("decode"), "d1 seen through the relist")
        assert api.count(api.lists, "sp-decode") == 2
        assert live.sample("splitserve:discovery_errors_total", source="kubernetes") == 0, "410 is routine"
        assert live.sample("splitserve:discovery_repairs_total", source="kubernetes") == 0
        assert any("410" in r.getMessage() for r in caplog.records)
    finally:
        await stop(task)


@pytest.mark.asyncio
async def test_api_errors_and_garbage_keep_the_last_good_view(
        api: FakeKubernetesAPI, cluster: FakeCluster, live: LiveRouter, caplog: pytest.LogCaptureFixture) -> None:
    port, (p, d0, d1) = await pods_on_one_port(
        cluster, ("p0", pb.ROLE_PREFILL), ("d0", pb.ROLE_DECODE), ("d1", pb.ROLE_DECODE))
    api.put("sp-prefill-x", "sp-prefill", [endpoint(ip(p))], port)
    api.put("sp-decode-x", "sp-decode", [endpoint(ip(d0))], port)
    task, feed = start(live, api, reconcile_s=0.3)
    errors = lambda: live.sample("splitserve:discovery_errors_total", source="kubernetes")  # noqa: E731
    try:
        await until(lambda: live.ready_ids("decode") == [d0.address], "d0 ready")
        caplog.set_level(logging.INFO, logger="splitserve.router.discovery")
        api.fail_next(500, "garbage", 503, 500)
        api.drop_watches()
        await until(lambda: errors() >= 4, "four failed requests counted")
        assert live.ready_ids("decode") == [d0.address] and live.ready_ids("prefill") == [p.address]
        api.put("sp-decode-x", "sp-decode", [endpoint(ip(d0)), endpoint(ip(d1))], port)
        await until(lambda: d1.address in live.ready_ids("decode"), "the source recovers")
        failed = [r for r in caplog.records if "failed, keeping the last good view" in r.getMessage()]
        assert len(failed) == 1, "one warning for the failing spell, not one per request"
        assert any("recovered" in r.getMessage() for r in caplog.records)
        api.stop()  # the API server goes away altogether: nothing changes
        await until(lambda: errors() >= 6, "unreachable API counted")
        assert sorted(live.ready_ids("decode")) == sorted([d0.address, d1.address])
    finally:
        await stop(task)
