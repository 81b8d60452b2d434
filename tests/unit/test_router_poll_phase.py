"""Pods found together are polled one by one across the period, not in one burst."""
from __future__ import annotations

import asyncio

import pytest

from splitserve.router.pd_client import LoadSnapshot
from splitserve.router.pod_state import PodLoad, PodPool
from splitserve.router.pod_watcher import PodWatcher, WatcherConfig, poll_phase
from splitserve.router.policies import DecodePolicy, make_policy
from splitserve.router.routing import PodRouter


def test_phases_are_fractions_spread_over_the_period() -> None:
    pods = [f"10.0.{i // 250}.{i % 250}:50051" for i in range(256)]
    phases = [poll_phase(p) for p in pods]
    assert all(0.0 <= f < 1.0 for f in phases)
    assert poll_phase(pods[0]) == phases[0]  # the same on every replica
    tenths = {int(f * 10) for f in phases}
    assert tenths == set(range(10)), "256 pods must land in every tenth of the period"
    assert max(phases.count(f) for f in phases) == 1


class _CountingClient:
    """A PodClient double whose GetLoad answers at once and records when."""

    def __init__(self, times: list[float]) -> None:
        self.times = times

    async def get_load(self, timeout: float = 1.0) -> LoadSnapshot:
        self.times.append(asyncio.get_running_loop().time())
        return LoadSnapshot("prefill", "inc", PodLoad(free_blocks=10, total_blocks=10), 0.0, 16, 0, 0)

    async def kv_events(self):  # never sends; the watcher's KV task just waits
        await asyncio.Event().wait()
        yield  # pragma: no cover


@pytest.mark.asyncio
async def test_second_polls_of_pods_found_together_are_spread() -> None:
    interval = 0.2
    pods = [f"10.1.0.{i}:50051" for i in range(32)]
    times: dict[str, list[float]] = {p: [] for p in pods}
    clients = {p: _CountingClient(times[p]) for p in pods}
    router = PodRouter(make_policy("kv_affinity", 16), DecodePolicy(16), PodPool(list(pods)), PodPool())
    watcher = PodWatcher(router, clients, {p: "prefill" for p in pods}, WatcherConfig(poll_interval_s=interval))
    watcher.start()
    await asyncio.sleep(2.5 * interval)
    await watcher.stop()
    first = min(t[0] for t in times.values())
    seconds = sorted(t[1] - first for t in times.values())
    assert seconds[0] >= interval * 0.9
    assert seconds[-1] - seconds[0] > interval * 0.5, f"second polls bunched: {seconds}"
