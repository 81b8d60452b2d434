"""What the router knows about each pod: identity, readiness and load."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class PodLoad:
    """A pod's load, as last polled plus the router's own assignments since.

    Updated by whoever polls the pods (``PodPool.update_load``) and
    optimistically by the router on each assignment (``PodPool.note_assigned``).
    """

    queued_prompt_tokens: int = 0
    running_seqs: int = 0
    waiting_seqs: int = 0
    free_blocks: int = 0
    total_blocks: int = 0

    @property
    def num_requests(self) -> int:
        """Requests in flight: the unit of the bounded-load rule."""
        return self.running_seqs + self.waiting_seqs


@dataclass
class PodState:
    """One pod of a role (prefill, decode or unified).

    ``ready``: its last ``GetLoad`` answered (set by the pod watcher).
    ``draining``: discovery says it is leaving; it gets no new work but what
    it runs finishes. Only ready, non-draining pods are routed to.
    """

    pod_id: str
    load: PodLoad = field(default_factory=PodLoad)
    ready: bool = True
    draining: bool = False

    @property
    def state(self) -> str:
        """``ready``, ``draining`` or ``not_ready`` (the ``router_pods`` label)."""
        if self.draining:
            return "draining"
        return "ready" if self.ready else "not_ready"


class ReadyPods(tuple):  # type: ignore[type-arg]  # tuple[PodState, ...]
    """``PodPool.ready_pods``: the routable pods by id, plus ``in_flight``,
    the requests in flight on all of them, which the pool keeps current as
    loads change (the load bound needs it per decision; summing it over
    hundreds of pods each time was most of a decision's cost)."""

    in_flight: int = 0


class PodPool:
    """The pods of one role, keyed by id; the order of ``ready_pods`` is by id
    so every router replica sees the same list.

    Pods come and go while the router serves (discovery), so the setters
    ignore ids the pool no longer holds: a request still running on a removed
    pod may report back after the pod left. ``subscribe`` registers a callback
    run (synchronously, on the caller's thread) whenever a pod joins, leaves
    or changes routability. Loads change only through the pool
    (``update_load``, ``note_assigned``, ``note_done``): it keeps their
    total over the ready pods.
    """

    def __init__(self, pod_ids: list[str] | None = None) -> None:
        self._pods: dict[str, PodState] = {}
        self._listeners: list[Callable[[], None]] = []
        # ready_pods() is asked two or three times per request; at hundreds of
        # pods sorting them each time showed in the router's profile.
        self._ready: ReadyPods | None = None
        for pod_id in pod_ids or []:
            self.add(pod_id)

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def _changed(self) -> None:
        self._ready = None
        for callback in self._listeners:
            callback()

    def add(self, pod_id: str, ready: bool = True, draining: bool = False) -> PodState:
        if not pod_id:
            raise ValueError("pod id must be a non-empty string")
        state = self._pods.get(pod_id)
        if state is None:
            state = self._pods[pod_id] = PodState(pod_id, ready=ready, draining=draining)
            self._changed()
        return state

    def remove(self, pod_id: str) -> None:
        if self._pods.pop(pod_id, None) is not None:
            self._changed()

    def get(self, pod_id: str) -> PodState:
        try:
            return self._pods[pod_id]
        except KeyError:
            raise KeyError(f"unknown pod {pod_id!r}; known: {sorted(self._pods)}") from None

    def __contains__(self, pod_id: object) -> bool:
        return pod_id in self._pods

    def set_ready(self, pod_id: str, ready: bool) -> None:
        state = self._pods.get(pod_id)
        if state is not None and state.ready != ready:
            state.ready = ready
            self._changed()

    def set_draining(self, pod_id: str, draining: bool) -> None:
        state = self._pods.get(pod_id)
        if state is not None and state.draining != draining:
            state.draining = draining
            self._changed()

    def update_load(self, pod_id: str, load: PodLoad) -> None:
        state = self._pods.get(pod_id)
        if state is not None:
            self._count(state, load.num_requests - state.load.num_requests)
            state.load = load

    def _count(self, state: PodState, change: int) -> None:
        ready = self._ready
        if ready is not None and change and state.ready and not state.draining:
            ready.in_flight += change

    def note_assigned(self, pod_id: str, num_prompt_tokens: int) -> None:
        """Count a request the router just sent, until the next poll says better."""
        state = self._pods.get(pod_id)
        if state is None:
            return
        load = state.load
        load.waiting_seqs += 1
        load.queued_prompt_tokens += num_prompt_tokens
        self._count(state, 1)

    def note_done(self, pod_id: str, num_prompt_tokens: int) -> None:
        """Undo ``note_assigned`` once the router sees the work end (a Prefill
        answered, a Decode stream closed), so a stale count does not push the
        next request away before the next poll. Unknown pods are ignored."""
        state = self._pods.get(pod_id)
        if state is None:
            return
        if state.load.waiting_seqs > 0:
            state.load.waiting_seqs -= 1
            self._count(state, -1)
        state.load.queued_prompt_tokens = max(0, state.load.queued_prompt_tokens - num_prompt_tokens)

    def ready_pods(self) -> ReadyPods:
        """Pods that may take new work (ready and not draining), by id: the
        same tuple object until the pool's membership or a pod's readiness or
        draining changes (load updates do not)."""
        if self._ready is None:
            ready = ReadyPods(self._pods[k] for k in sorted(self._pods)
                              if self._pods[k].ready and not self._pods[k].draining)
            ready.in_flight = sum(p.load.num_requests for p in ready)
            self._ready = ready
        return self._ready

    def pods(self) -> list[PodState]:
        """Every pod of the pool, whatever its state, by id."""
        return [self._pods[k] for k in sorted(self._pods)]

    def __len__(self) -> int:
        return len(self._pods)
