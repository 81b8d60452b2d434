"""The Deployment rules of ``splitserve up``'s pools (pure bookkeeping, a
simulated clock, no processes): scale, rolling restart with maxSurge 1 /
maxUnavailable 0, crash back-off."""
from __future__ import annotations

import pytest

from splitserve.local.pod_pool import CrashBackoff, LocalPod, PodPhase, PodPool

MIN_READY = 1.0


class Sim:
    """Drives a pool as the controller would: pods get ready ``start_s``
    after they start, drained pods exit ``drain_s`` after being marked."""

    def __init__(self, pool: PodPool, start_s: float = 3.0, drain_s: float = 2.0) -> None:
        self.pool = pool
        self.now = 0.0
        self.start_s = start_s
        self.drain_s = drain_s
        self.history: list[tuple[int, int]] = []  # (available, active) after each tick

    def tick(self, dt: float = 0.5) -> None:
        self.now += dt
        for pod in list(self.pool.pods):
            if pod.phase is PodPhase.STARTING and self.now - pod.started_at >= self.start_s:
                self.pool.mark_ready(pod, self.now)
            if pod.phase is PodPhase.DRAINING and self.now - pod.terminate_at >= self.drain_s:
                assert self.pool.remove(pod, self.now) is None  # drained: not a crash
        plan = self.pool.plan(self.now)
        for _ in range(plan.start):
            self.pool.new_pod("127.0.0.1", 1000 + self.pool.next_index, 2000 + self.pool.next_index, self.now)
        for name in plan.drain:
            pod = next(p for p in self.pool.pods if p.name == name)
            self.pool.mark_draining(pod, self.now, notice_s=0.0, grace_s=60.0)
        active = self.pool.active
        self.history.append((sum(p.available(self.now, MIN_READY) for p in active), len(active)))

    def run_until_converged(self, limit_s: float = 300.0) -> None:
        while not self.pool.converged():
            assert self.now < limit_s, f"not converged: {self.pool.pods}"
            self.tick()
        for _ in range(4):  # settle: every pod past min_ready_seconds
            self.tick()

    def names(self, phase: PodPhase | None = None) -> list[str]:
        return [p.name for p in self.pool.pods if phase is None or p.phase is phase]


def test_scale_up_starts_pods_and_down_drains_newest_first() -> None:
    sim = Sim(PodPool("decode", 1, MIN_READY))
    sim.run_until_converged()
    assert sim.names() == ["decode-0"]
    sim.pool.scale(3)
    sim.run_until_converged()
    assert sim.names() == ["decode-0", "decode-1", "decode-2"]
    sim.pool.scale(1)
    sim.tick()
    assert sim.names(PodPhase.DRAINING) == ["decode-1", "decode-2"]
    sim.run_until_converged()
    assert sim.names() == ["decode-0"]


def test_scale_down_drains_a_starting_pod_before_a_ready_one() -> None:
    sim = Sim(PodPool("decode", 2, MIN_READY), start_s=3.0)
    sim.run_until_converged()
    sim.pool.scale(3)
    sim.tick()  # decode-2 starting
    sim.pool.scale(2)
    sim.tick()
    assert sim.names(PodPhase.DRAINING) == ["decode-2"]
    sim.pool.scale(1)
    sim.tick()
    assert sim.names(PodPhase.DRAINING) == ["decode-1", "decode-2"]  # then the newest ready one
    assert sim.names(PodPhase.READY) == ["decode-0"]


def test_scale_to_zero_and_back() -> None:
    sim = Sim(PodPool("prefill", 1, MIN_READY))
    sim.run_until_converged()
    sim.pool.scale(0)
    sim.run_until_converged()
    assert sim.pool.pods == []
    sim.pool.scale(1)
    sim.run_until_converged()
    assert sim.names() == ["prefill-1"]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="replicas"):
            sim.pool.scale(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_rolling_restart_never_loses_capacity_and_surges_by_one(replicas: int) -> None:
    sim = Sim(PodPool("decode", replicas, MIN_READY))
    sim.run_until_converged()
    old = set(sim.names())
    sim.history.clear()
    sim.pool.restart()
    sim.run_until_converged()
    assert not old & set(sim.names()) and len(sim.names()) == replicas
    assert all(p.revision == 1 for p in sim.pool.pods)
    assert min(available for available, _ in sim.history) >= replicas  # maxUnavailable 0
    assert max(active for _, active in sim.history) <= replicas + 1   # maxSurge 1


def test_rollout_drains_one_old_pod_at_a_time_only_after_the_new_one_has_been_ready() -> None:
    sim = Sim(PodPool("prefill", 2, MIN_READY), start_s=3.0, drain_s=5.0)
    sim.run_until_converged()
    sim.pool.restart()
    sim.tick()
    assert sim.names(PodPhase.STARTING) == ["prefill-2"] and not sim.names(PodPhase.DRAINING)
    while not sim.names(PodPhase.DRAINING):
        sim.tick()
    new = next(p for p in sim.pool.pods if p.name == "prefill-2")
    assert new.ready_at is not None and sim.now - new.ready_at >= MIN_READY
    assert sim.names(PodPhase.DRAINING) == ["prefill-0"]  # the oldest goes first
    while sim.names(PodPhase.DRAINING):  # no second surge while one is leaving
        assert len(sim.pool.active) <= 2 and len(sim.names(PodPhase.DRAINING)) == 1
        sim.tick()
    sim.run_until_converged()


def test_scale_down_during_a_rollout_drains_old_pods_first() -> None:
    sim = Sim(PodPool("decode", 3, MIN_READY))
    sim.run_until_converged()
    sim.pool.restart()
    sim.tick()  # one new pod surging: 4 active
    sim.pool.scale(1)
    sim.tick()
    draining = sim.pool.draining
    assert draining and all(p.revision == 0 for p in draining)
    sim.run_until_converged()
    assert [p.revision for p in sim.pool.pods] == [1]


def test_crashes_back_off_exponentially_and_reset_after_a_long_ready_life() -> None:
    backoff = CrashBackoff(base_s=1.0, max_s=8.0, reset_after_s=60.0)
    assert [backoff.on_crash(0.0, None) for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert backoff.on_crash(100.0, ready_for_s=61.0) == 1.0
    assert backoff.on_crash(101.0, ready_for_s=0.5) == 2.0


def test_a_crashed_pod_is_replaced_after_its_back_off() -> None:
    sim = Sim(PodPool("decode", 2, MIN_READY, CrashBackoff(base_s=4.0, max_s=60.0)))
    sim.run_until_converged()
    victim: LocalPod = sim.pool.pods[0]
    assert sim.pool.remove(victim, sim.now) == 4.0  # a crash: the delay is returned
    crashed_at = sim.now
    while len(sim.pool.pods) < 2:
        sim.tick()
    assert sim.now - crashed_at >= 4.0 and sim.pool.restarts == 1
    sim.run_until_converged()
    assert sim.names() == ["decode-1", "decode-2"]
