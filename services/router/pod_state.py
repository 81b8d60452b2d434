"""What the router knows about each pod: identity and load."""
from __future__ import annotations

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
    """One pod of a role (prefill, decode or unified)."""

    pod_id: str
    load: PodLoad = field(default_factory=PodLoad)
    ready: bool = True


class PodPool:
    """The pods of one role, keyed by id; the order of ``ready_pods`` is by id
    so every router replica sees the same list."""

    def __init__(self, pod_ids: list[str] | None = None) -> None:
        self._pods: dict[str, PodState] = {}
        for pod_id in pod_ids or []:
            self.add(pod_id)

    def add(self, pod_id: str) -> PodState:
        if not pod_id:
            raise ValueError("pod id must be a non-empty string")
        return self._pods.setdefault(pod_id, PodState(pod_id))

    def remove(self, pod_id: str) -> None:
        self._pods.pop(pod_id, None)

    def get(self, pod_id: str) -> PodState:
        try:
            return self._pods[pod_id]
        except KeyError:
            raise KeyError(f"unknown pod {pod_id!r}; known: {sorted(self._pods)}") from None

    def set_ready(self, pod_id: str, ready: bool) -> None:
        self.get(pod_id).ready = ready

    def update_load(self, pod_id: str, load: PodLoad) -> None:
        self.get(pod_id).load = load

    def note_assigned(self, pod_id: str, num_prompt_tokens: int) -> None:
        """Count a request the router just sent, until the next poll says better."""
        load = self.get(pod_id).load
        load.waiting_seqs += 1
        load.queued_prompt_tokens += num_prompt_tokens

    def note_done(self, pod_id: str, num_prompt_tokens: int) -> None:
        """Undo ``note_assigned`` once the router sees the work end (a Prefill
        answered, a Decode stream closed), so a stale count does not push the
        next request away before the next poll. Unknown pods are ignored."""
        state = self._pods.get(pod_id)
        if state is None:
            return
        state.load.waiting_seqs = max(0, state.load.waiting_seqs - 1)
        state.load.queued_prompt_tokens = max(0, state.load.queued_prompt_tokens - num_prompt_tokens)

    def ready_pods(self) -> list[PodState]:
        return [self._pods[k] for k in sorted(self._pods) if self._pods[k].ready]

    def __len__(self) -> int:
        return len(self._pods)
