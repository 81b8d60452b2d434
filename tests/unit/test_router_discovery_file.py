"""``--discovery file``: the JSON ``splitserve up`` rewrites, re-read on
change (atomic rewrites), garbage and half-written files keeping the last
good view, and the periodic re-read repairing a change the poll missed.
Pods are fake Engine servers (test doubles)."""
from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import pytest
from test_router_membership_fakes import LiveRouter, add_pod, until, cluster, live_router_fixture  # noqa: F401 - cluster is a fixture
from test_router_orchestrator_fakes import FakeCluster

from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.router.discovery import DiscoveryConfig, DiscoveryFeed
from splitserve.router.discovery_file import FileDiscovery, parse_discovery_file


def write_atomically(path: Path, pods: list[dict[str, str]] | str) -> None:
    text = pods if isinstance(pods, str) else json.dumps({"version": 1, "pods": pods})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def entry(role: str, address: str, state: str = "ready") -> dict[str, str]:
    return {"role": role, "address": address, "state": state}


def test_parse_reads_the_contract_format() -> None:
    snap = parse_discovery_file(json.dumps({"version": 1, "pods": [
        entry("prefill", "127.0.0.1:50051"), entry("decode", "127.0.0.1:50052", "draining"),
        {"role": "unified", "address": "[::1]:50053", "name": "extra keys are ignored"}]}))
    assert {a: (p.role, p.state) for a, p in snap.pods.items()} == {
        "127.0.0.1:50051": ("prefill", "ready"), "127.0.0.1:50052": ("decode", "draining"),
        "[::1]:50053": ("unified", "ready")}


@pytest.mark.parametrize("text, message", [
    ('{"version": 1, "pods": [', "not valid JSON"),
    ("[]", "object"),
    ('{"version": 2, "pods": []}', "version"),
    ('{"version": 1}', "list"),
    ('{"version": 1, "pods": ["x"]}', r"pods\[0\]"),
    ('{"version": 1, "pods": [{"role": "decode", "address": 5}]}', "strings"),
    ('{"version": 1, "pods": [{"role": "decoder", "address": "a:1"}]}', "role"),
    ('{"version": 1, "pods": [{"role": "decode", "address": "a:1", "state": "up"}]}', "state"),
])
def test_parse_rejects_garbage_with_a_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_discovery_file(text)


def test_config_needs_the_file_flag() -> None:
    with pytest.raises(ValueError, match="--discovery-file"):
        DiscoveryConfig("file")
    with pytest.raises(ValueError, match="static"):
        DiscoveryConfig("file", file="x.json", decode=("a:1",))
    assert DiscoveryConfig("file", file="x.json").configured_roles() == frozenset()


live = live_router_fixture("file")


async def run_source(source: FileDiscovery, feed: DiscoveryFeed) -> asyncio.Task[None]:
    return asyncio.create_task(source.run(feed))


@pytest.mark.asyncio
async def test_atomic_rewrites_join_drain_and_remove_pods(tmp_path: Path, cluster: FakeCluster,
                                                          live: LiveRouter) -> None:
    p = await add_pod(cluster, "p0", pb.ROLE_PREFILL)
    d0 = await add_pod(cluster, "d0", pb.ROLE_DECODE)
    d1 = await add_pod(cluster, "d1", pb.ROLE_DECODE)
    path = tmp_path / "pods.json"
    write_atomically(path, [entry("prefill", p.address), entry("decode", d0.address)])
    feed = DiscoveryFeed(live.registry, live.metrics, "file")
    task = await run_source(FileDiscovery(str(path), poll_s=0.01, reconcile_s=60), feed)
    try:
        await until(lambda: live.ready_ids("decode") == [d0.address], "d0 from the file, ready")
        assert live.registry.roles == {"prefill", "decode"}
        write_atomically(path, [entry("prefill", p.address), entry("decode", d0.address, "draining"),
                                entry("decode", d1.address)])
        await until(lambda: live.ready_ids("decode") == [d1.address], "d1 joins, d0 drains")
        assert live.router.pools["decode"].get(d0.address).draining
        write_atomically(path, [entry("prefill", p.address), entry("decode", d1.address)])
        await until(lambda: d0.address not in live.router.pools["decode"], "d0 removed")
        assert live.sample("splitserve:discovery_events_total", source="file", kind="draining") == 1
        assert live.sample("splitserve:discovery_events_total", source="file", kind="removed") == 1
        assert live.sample("splitserve:discovery_errors_total", source="file") == 0
    finally:
        task.cancel()


@pytest.mark.asyncio
async def test_garbage_missing_and_half_written_files_keep_the_last_good_view(
        tmp_path: Path, cluster: FakeCluster, live: LiveRouter, caplog: pytest.LogCaptureFixture) -> None:
    d0 = await add_pod(cluster, "d0", pb.ROLE_DECODE)
    d1 = await add_pod(cluster, "d1", pb.ROLE_DECODE)
    path = tmp_path / "pods.json"
    write_atomically(path, [entry("decode", d0.address)])
    feed = DiscoveryFeed(live.registry, live.metrics, "file")
    task = await run_source(FileDiscovery(str(path), poll_s=0.01, reconcile_s=60), feed)
    errors = lambda: live.sample("splitserve:discovery_errors_total", source="file")  # noqa: E731
    try:
        await until(lambda: live.ready_ids("decode") == [d0.address], "d0 ready")
        caplog.set_level(logging.INFO, logger="splitserve.router.discovery")
        write_atomically(path, "this is not JSON")
        await until(lambda: errors() == 1, "garbage counted")
        write_atomically(path, '{"version": 1, "pods": [{"role": "decode"}]}')
        await until(lambda: errors() == 2, "a second bad version counted")
        path.unlink()
        await until(lambda: errors() == 3, "a missing file counted")
        await asyncio.sleep(0.1)  # ten polls of the same missing file: not counted again
        assert errors() == 3
        assert live.ready_ids("decode") == [d0.address] and feed.failing is not None
        # a writer that does not replace atomically: the half-written state is garbage too
        full = json.dumps({"version": 1, "pods": [entry("decode", d0.address), entry("decode", d1.address)]})
        with open(path, "w") as f:
            f.write(full[: len(full) // 2])
        await until(lambda: errors() == 4, "the half-written file counted")
        assert live.ready_ids("decode") == [d0.address]
        with open(path, "w") as f:
            f.write(full)
        await until(lambda: sorted(live.ready_ids("decode")) == sorted([d0.address, d1.address]),
                    "the completed file read")
        assert feed.failing is None
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, "one warning while failing, not one per bad read"
        assert any("recovered" in r.getMessage() for r in caplog.records)
    finally:
        task.cancel()


@pytest.mark.asyncio
async def test_the_periodic_reread_repairs_a_change_the_poll_could_not_see(
        tmp_path: Path, cluster: FakeCluster, live: LiveRouter) -> None:
    d0 = await add_pod(cluster, "d0", pb.ROLE_DECODE)
    path = tmp_path / "pods.json"
    before = json.dumps({"version": 1, "pods": [entry("decode", d0.address)]})
    after = json.dumps({"version": 1, "pods": [entry("decode", d0.address, "draining")]})
    after = after.replace(", ", ",") + " " * (len(before) - len(after.replace(", ", ",")))
    assert len(after) == len(before)
    path.write_text(before)
    feed = DiscoveryFeed(live.registry, live.metrics, "file")
    task = await run_source(FileDiscovery(str(path), poll_s=0.01, reconcile_s=0.3), feed)
    try:
        await until(lambda: live.ready_ids("decode") == [d0.address], "d0 ready")
        stat = os.stat(path)
        with open(path, "r+") as f:  # same inode, same size, same mtime: invisible to the poll
            f.write(after)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        await until(lambda: live.ready_ids("decode") == [], "the reconcile read sees the drain")
        assert live.sample("splitserve:discovery_repairs_total", source="file") == 1
    finally:
        task.cancel()
