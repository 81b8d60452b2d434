"""``--discovery dns`` with an injected resolver (a TEST DOUBLE of DNS: a
dict of names to addresses, or an exception) feeding the real registry;
pods are fake Engine servers (test doubles) on 127.0.0.x sharing a port."""
from __future__ import annotations

import logging
import socket

import pytest
from test_router_membership_fakes import LiveRouter, add_pod, until, cluster, live_router_fixture  # noqa: F401 - cluster is a fixture
from test_router_orchestrator_fakes import FakeCluster

from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.router.discovery import DiscoveryConfig, DiscoveryFeed, make_source
from splitserve.router.discovery_dns import DnsDiscovery, NoRecords, system_resolver


class FakeDNS:
    """Answers from ``records``; a name mapped to an exception raises it."""

    def __init__(self) -> None:
        self.records: dict[str, list[str] | Exception] = {}
        self.queries: list[str] = []

    async def __call__(self, host: str) -> list[str]:
        self.queries.append(host)
        answer = self.records.get(host, NoRecords(host))
        if isinstance(answer, Exception):
            raise answer
        return list(answer)


def test_config_needs_host_port_service_names() -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        DiscoveryConfig("dns", prefill_service="sp-prefill", decode_service="sp-decode:50051")
    source = make_source(DiscoveryConfig("dns", unified_service="sp-unified.ns.svc:50051"))
    assert isinstance(source, DnsDiscovery) and source.services == {"unified": "sp-unified.ns.svc:50051"}


@pytest.mark.asyncio
async def test_the_system_resolver_reads_localhost_and_reports_no_records() -> None:
    assert "127.0.0.1" in await system_resolver("localhost")
    with pytest.raises((NoRecords, socket.gaierror)):
        await system_resolver("no-such-name.invalid")


live = live_router_fixture("dns")


@pytest.mark.asyncio
async def test_records_join_and_leave_and_failures_keep_the_last_view(
        cluster: FakeCluster, live: LiveRouter, caplog: pytest.LogCaptureFixture) -> None:
    d0 = await add_pod(cluster, "d0", pb.ROLE_DECODE, host="127.0.0.2")
    port = int(d0.address.rsplit(":", 1)[1])
    try:
        d1 = await add_pod(cluster, "d1", pb.ROLE_DECODE, host="127.0.0.3", port=port)
        p = await add_pod(cluster, "p0", pb.ROLE_PREFILL, host="127.0.0.4", port=port)
    except RuntimeError:
        pytest.skip("the port is taken on another loopback address")
    dns = FakeDNS()
    source = DnsDiscovery({"prefill": f"sp-prefill:{port}", "decode": f"sp-decode:{port}"}, resolver=dns)
    feed = DiscoveryFeed(live.registry, live.metrics, "dns")
    errors = lambda: live.sample("splitserve:discovery_errors_total", source="dns")  # noqa: E731

    dns.records = {"sp-prefill": ["127.0.0.4"], "sp-decode": ["127.0.0.2"]}
    await source.resolve_once(feed)
    await until(lambda: live.ready_ids("decode") == [d0.address], "d0 resolved and ready")
    dns.records["sp-decode"] = ["127.0.0.2", "127.0.0.3"]
    await source.resolve_once(feed)
    await until(lambda: sorted(live.ready_ids("decode")) == sorted([d0.address, d1.address]), "d1 joins")

    caplog.set_level(logging.INFO, logger="splitserve.router.discovery")
    dns.records["sp-decode"] = TimeoutError("resolver timed out")
    for _ in range(3):
        await source.resolve_once(feed)
    assert errors() == 3 and len(live.ready_ids("decode")) == 2 and live.ready_ids("prefill") == [p.address]
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 1, "logged once, counted thrice"

    dns.records["sp-decode"] = ["127.0.0.3"]
    await source.resolve_once(feed)
    assert live.router.pools["decode"].pods()[0].pod_id == d1.address and feed.failing is None
    assert d0.address not in live.router.pools["decode"]
    del dns.records["sp-decode"]  # NXDOMAIN: the headless Service has no ready pod (scaled to zero)
    await source.resolve_once(feed)
    assert len(live.router.pools["decode"]) == 0 and errors() == 3
    assert live.sample("splitserve:discovery_events_total", source="dns", kind="removed") == 2
    assert dns.queries.count("sp-prefill") == 7
