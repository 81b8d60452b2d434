"""One pool of ``splitserve up`` (prefill, decode or unified) kept the way a
Kubernetes Deployment keeps its pods: the desired replica count, a revision
that ``rollout restart`` bumps, the pods, and the crash back-off.

Pure bookkeeping, no processes: ``plan(now)`` says which pods to start and
which to drain; the controller (``splitserve.local.controller``) carries it
out and reports back (``mark_ready``, ``remove``). Rules, as a Deployment:

- scale: start the missing pods; drain the surplus, not-ready ones first,
  then the newest;
- rolling update (pods of an older revision exist): maxSurge 1,
  maxUnavailable 0, one old pod leaving at a time — start one new pod, wait
  until it has been ready ``min_ready_seconds`` (so the router has seen it),
  drain one old pod, wait until it exited, repeat;
- a pod that exits without being drained is a crash: it is removed and its
  replacement waits an exponential back-off (CrashLoopBackOff).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

MAX_SURGE = 1


class PodPhase(enum.Enum):
    STARTING = "starting"  # process started, /health not yet ok
    READY = "ready"        # /health ok: listed in the pods file
    DRAINING = "draining"  # listed as draining; SIGTERM follows, then it exits


@dataclass
class LocalPod:
    """One pod process of a pool (the controller owns its process)."""

    name: str
    role: str
    index: int
    revision: int
    host: str
    grpc_port: int
    http_port: int
    started_at: float
    phase: PodPhase = PodPhase.STARTING
    ready_at: float | None = None
    terminate_at: float | None = None  # when SIGTERM is due (draining)
    terminated: bool = False
    kill_at: float | None = None       # when SIGKILL is due (draining past its grace)
    pid: int | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def available(self, now: float, min_ready_seconds: float) -> bool:
        return (self.phase is PodPhase.READY and self.ready_at is not None
                and now - self.ready_at >= min_ready_seconds)


@dataclass
class CrashBackoff:
    """CrashLoopBackOff: ``base_s * 2**(n-1)`` capped at ``max_s`` after the
    n-th crash in a row; a pod that had been ready ``reset_after_s`` before it
    crashed starts the count again."""

    base_s: float = 1.0
    max_s: float = 60.0
    reset_after_s: float = 60.0
    crashes: int = 0
    not_before: float = 0.0

    def on_crash(self, now: float, ready_for_s: float | None) -> float:
        """Record a crash at ``now``; returns the delay before the replacement."""
        if ready_for_s is not None and ready_for_s >= self.reset_after_s:
            self.crashes = 0
        self.crashes += 1
        delay = min(self.base_s * 2 ** (self.crashes - 1), self.max_s)
        self.not_before = now + delay
        return delay


@dataclass(frozen=True)
class PoolPlan:
    """What to do now: start ``start`` new pods, drain the pods named in ``drain``."""

    start: int = 0
    drain: tuple[str, ...] = ()


@dataclass
class PodPool:
    role: str
    replicas: int
    min_ready_seconds: float = 1.0
    backoff: CrashBackoff = field(default_factory=CrashBackoff)
    revision: int = 0
    pods: list[LocalPod] = field(default_factory=list)
    restarts: int = 0  # crashed pods replaced so far (``splitserve status``)
    next_index: int = 0

    def __post_init__(self) -> None:
        _check_replicas(self.role, self.replicas)

    # -- desired state -------------------------------------------------------

    def scale(self, replicas: int) -> None:
        _check_replicas(self.role, replicas)
        self.replicas = replicas

    def restart(self) -> None:
        """``rollout restart``: every pod of an older revision is replaced."""
        self.revision += 1

    # -- what is --------------------------------------------------------------

    @property
    def active(self) -> list[LocalPod]:
        return [p for p in self.pods if p.phase is not PodPhase.DRAINING]

    @property
    def draining(self) -> list[LocalPod]:
        return [p for p in self.pods if p.phase is PodPhase.DRAINING]

    def converged(self) -> bool:
        """Scaled and rolled out: ``replicas`` ready pods of the current
        revision and nothing starting, draining or old."""
        return (len(self.pods) == self.replicas
                and all(p.phase is PodPhase.READY and p.revision == self.revision for p in self.pods))

    def new_pod(self, host: str, grpc_port: int, http_port: int, now: float) -> LocalPod:
        pod = LocalPod(f"{self.role}-{self.next_index}", self.role, self.next_index, self.revision, host,
                       grpc_port, http_port, started_at=now)
        self.next_index += 1
        self.pods.append(pod)
        return pod

    def mark_ready(self, pod: LocalPod, now: float) -> None:
        if pod.phase is PodPhase.STARTING:
            pod.phase = PodPhase.READY
            pod.ready_at = now

    def mark_draining(self, pod: LocalPod, now: float, notice_s: float, grace_s: float) -> None:
        pod.phase = PodPhase.DRAINING
        pod.terminate_at = now + notice_s
        pod.kill_at = pod.terminate_at + grace_s

    def remove(self, pod: LocalPod, now: float) -> float | None:
        """The pod's process exited. Returns the back-off delay if it was a
        crash (not drained), else None."""
        self.pods.remove(pod)
        if pod.phase is PodPhase.DRAINING:
            return None
        self.restarts += 1
        return self.backoff.on_crash(now, now - pod.ready_at if pod.ready_at is not None else None)

    # -- what to do -----------------------------------------------------------

    def plan(self, now: float) -> PoolPlan:
        active = self.active
        current = [p for p in active if p.revision == self.revision]
        old = [p for p in active if p.revision != self.revision]
        may_start = now >= self.backoff.not_before
        if not old:
            if len(current) < self.replicas:
                return PoolPlan(start=self.replicas - len(current) if may_start else 0)
            surplus = _drain_order(current, newest_first=True)[:len(current) - self.replicas]
            return PoolPlan(drain=tuple(p.name for p in surplus))
        excess = len(active) - (self.replicas + MAX_SURGE)
        if excess > 0:  # scaled down during a rollout: old pods go first
            return PoolPlan(drain=tuple(p.name for p in _drain_order(old, newest_first=False)[:excess]))
        if self.draining:
            return PoolPlan()
        if len(current) < self.replicas and len(active) < self.replicas + MAX_SURGE:
            return PoolPlan(start=1 if may_start else 0)
        victim = _drain_order(old, newest_first=False)[0]
        available = sum(p.available(now, self.min_ready_seconds) for p in active)
        if victim.phase is not PodPhase.READY or available - 1 >= self.replicas:
            return PoolPlan(drain=(victim.name,))
        return PoolPlan()


def _drain_order(pods: list[LocalPod], newest_first: bool) -> list[LocalPod]:
    """Not-ready pods first (draining them costs no capacity), then by age."""
    by_age = sorted(pods, key=lambda p: p.index, reverse=newest_first)
    return sorted(by_age, key=lambda p: p.phase is PodPhase.READY)


def _check_replicas(role: str, replicas: int) -> None:
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise ValueError(f"{role}: replicas must be an integer >= 0, got {replicas!r}")
