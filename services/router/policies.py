"""Pod choice policies. Deterministic: router replicas with the same view of
pods, loads and prefix indexes pick the same pod (no per-process randomness;
rendezvous weights come from BLAKE2b, never Python's ``hash()``)."""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

from splitserve.engine.block_hash import BlockHash, hash_prompt_blocks
from splitserve.router.backend import BackendUnavailableError
from splitserve.router.pod_state import PodState
from splitserve.router.prefix_index import PrefixIndexMap


class NoReadyPodError(BackendUnavailableError):
    """No ready pod of the needed role; the request cannot start now."""


@dataclass(frozen=True)
class RouteRequest:
    """What a policy sees of a request. ``affinity_key`` places cold prompts:
    the first block's hash, or for a prompt shorter than a block, a hash of
    its tokens (so equal short prompts also meet on one pod)."""

    block_hashes: tuple[BlockHash, ...]
    num_prompt_tokens: int
    affinity_key: bytes

    @classmethod
    def from_prompt(cls, token_ids: Sequence[int], block_size: int, salt: str | None = None,
                    block_hashes: Sequence[BlockHash] | None = None) -> RouteRequest:
        hashes = tuple(block_hashes if block_hashes is not None
                       else hash_prompt_blocks(token_ids, block_size, salt=salt))
        if hashes:
            key = hashes[0]
        elif token_ids:
            key = hash_prompt_blocks(token_ids, len(token_ids), salt=salt)[0]
        else:
            key = b""
        return cls(hashes, len(token_ids), key)


@dataclass(frozen=True)
class RouteDecision:
    """The chosen pod, the blocks believed cached there, and why (a bounded
    label: affinity, hash, bounded, least_loaded, round_robin, prefix)."""

    pod_id: str
    matched_blocks: int
    reason: str


class RoutingPolicy(Protocol):
    """Chooses one of ``pods`` (ready pods, sorted by id) for ``request``.

    Pure apart from the policy's own counters (round robin); the caller
    records the assignment (``PodPool.note_assigned``, prefix index).
    Raises ``NoReadyPodError`` when ``pods`` is empty.
    """

    name: str

    def choose(self, request: RouteRequest, pods: Sequence[PodState],
               index: PrefixIndexMap) -> RouteDecision: ...


def rendezvous_weight(key: bytes, pod_id: str) -> int:
    digest = hashlib.blake2b(key + b"\x00" + pod_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: bytes, pods: Sequence[PodState]) -> list[PodState]:
    """Pods by descending rendezvous weight for ``key`` (ties by id)."""
    return sorted(pods, key=lambda p: (-rendezvous_weight(key, p.pod_id), p.pod_id))


class RendezvousOrders:
    """``rendezvous_order``, remembered per affinity key while the pod set is
    the same: a system prompt's key comes back request after request, and at
    hundreds of pods its order costs a hash per pod plus a sort each time.
    At most ``max_keys`` keys, least recently used out."""

    def __init__(self, max_keys: int = 4096) -> None:
        self.max_keys = max_keys
        # key -> (pod ids, the pods sequence it was computed for, positions, the ordered pods, rank by id)
        self._orders: OrderedDict[bytes, tuple[tuple[str, ...], Sequence[PodState], list[int],
                                               tuple[PodState, ...], dict[str, int]]] = OrderedDict()

    def order(self, key: bytes, pods: Sequence[PodState]) -> tuple[PodState, ...]:
        return self.ranked(key, pods)[0]

    def ranked(self, key: bytes, pods: Sequence[PodState]) -> tuple[tuple[PodState, ...], dict[str, int]]:
        """The order and each pod id's place in it."""
        known = self._orders.get(key)
        if known is not None and isinstance(pods, tuple) and known[1] is pods:
            # The pool's cached ready tuple (immutable): same pods, same order, no pass over them.
            self._orders.move_to_end(key)
            return known[3], known[4]
        ids = tuple(p.pod_id for p in pods)
        if known is not None and known[0] == ids:
            positions = known[2]
        else:
            positions = sorted(range(len(ids)), key=lambda i: (-rendezvous_weight(key, ids[i]), ids[i]))
        ordered = tuple(pods[i] for i in positions)
        rank = {pod.pod_id: place for place, pod in enumerate(ordered)}
        self._orders[key] = (ids, pods, positions, ordered, rank)
        self._orders.move_to_end(key)
        if len(self._orders) > self.max_keys:
            self._orders.popitem(last=False)
        return ordered, rank


def load_bound(pods: Sequence[PodState], load_factor: Fraction) -> int:
    """Most requests one pod may hold after this assignment:
    ceil(c * (total in flight + 1) / pods). With c >= 1 some pod is always under it.
    The pool's ``ReadyPods`` carry that total; any other sequence is summed."""
    in_flight = getattr(pods, "in_flight", None)
    total = (sum(p.load.num_requests for p in pods) if in_flight is None else in_flight) + 1
    # ceil(c * total / n) in integers: the same value as with Fractions, a tenth of the time.
    return -(-load_factor.numerator * total // (load_factor.denominator * len(pods)))


def _first_under_bound(order: Sequence[PodState], cap: int) -> PodState:
    """The first pod of ``order`` under the load bound ``cap`` (nearly always
    the first one: the scan stops there)."""
    for pod in order:
        load = pod.load
        if load.running_seqs + load.waiting_seqs < cap:
            return pod
    return order[0]  # unreachable with load_factor >= 1 (some pod is always under the bound)


def _require(pods: Sequence[PodState], role: str = "prefill") -> None:
    if not pods:
        raise NoReadyPodError(f"no ready {role} pod; check that pods are up and pass readiness")


def _factor(load_factor: float) -> Fraction:
    if load_factor < 1:
        raise ValueError(f"load_factor must be >= 1 (1.25 is typical), got {load_factor}")
    return Fraction(load_factor).limit_denominator(1000)


class KvAffinityPolicy:
    """Most cached prefix, minus load; cold prompts by rendezvous hashing.

    score = matched_blocks * block_size * affinity_weight
            - queued_prompt_tokens * load_weight
    (both in tokens: with weights 1 this minimises the prompt tokens a pod has
    to compute before this request is done). Ties go by rendezvous order of
    ``affinity_key``; prompts no pod holds go to the first pod in that order.
    Bounded load: only pods under ``load_bound`` are candidates, so a hot
    prefix spills to the next pods in its rendezvous order.
    """

    name = "kv_affinity"

    def __init__(self, block_size: int, load_factor: float = 1.25,
                 affinity_weight: float = 1.0, load_weight: float = 1.0) -> None:
        if affinity_weight < 0 or load_weight < 0:
            raise ValueError(f"affinity_weight and load_weight must be >= 0, got {affinity_weight}, {load_weight}")
        self.block_size = block_size
        self.load_factor = _factor(load_factor)
        self._orders = RendezvousOrders()
        self.affinity_weight = affinity_weight
        self.load_weight = load_weight

    def choose(self, request: RouteRequest, pods: Sequence[PodState],
               index: PrefixIndexMap) -> RouteDecision:
        """The best score among pods under the load bound, the first in
        rendezvous order on ties. Only the pods holding the prompt's first
        block are walked, and pods without a match are scanned in order only
        while one of them could still win (its score is at most 0): the
        decision is the same as scoring every pod, at a few pods' cost."""
        _require(pods)
        order, rank = self._orders.ranked(request.affinity_key, pods)
        cap = load_bound(pods, self.load_factor)  # O(1) on the pool's ReadyPods
        best: PodState | None = None
        best_score = best_rank = best_match = 0
        block_size, affinity_weight, load_weight = self.block_size, self.affinity_weight, self.load_weight
        holders = index.holder_matches(request.block_hashes)
        for pod_id, matched in holders.items():
            place = rank.get(pod_id)
            if place is None:
                continue
            pod = order[place]
            load = pod.load
            if load.running_seqs + load.waiting_seqs >= cap:
                continue
            score = matched * block_size * affinity_weight - load.queued_prompt_tokens * load_weight
            if best is None or score > best_score or (score == best_score and place < best_rank):
                best, best_score, best_rank, best_match = pod, score, place, matched
        if best is None:  # no candidate holds the prompt's start: rendezvous order, bounded
            chosen = _first_under_bound(order, cap)
            return RouteDecision(chosen.pod_id, 0, "hash" if chosen is order[0] else "bounded")
        if best_score <= 0:
            # A pod without a match scores -queued * load_weight <= 0: it wins over a
            # best score it beats, or ties earlier in the order. The scan stops at
            # the first such pod scoring 0 (nothing later can beat it).
            for place, pod in enumerate(order):
                if place >= best_rank and best_score == 0:
                    break
                load = pod.load
                if pod.pod_id in holders or load.running_seqs + load.waiting_seqs >= cap:
                    continue  # a holder was scored above (or is over the bound)
                score = -load.queued_prompt_tokens * load_weight
                if score > best_score or (score == best_score and place < best_rank):
                    best, best_score, best_rank, best_match = pod, score, place, 0
                if score == 0:
                    break
        return RouteDecision(best.pod_id, best_match, "affinity")


class ConsistentHashPolicy:
    """Rendezvous hashing of ``affinity_key`` with bounded load."""

    name = "consistent_hash"

    def __init__(self, load_factor: float = 1.25) -> None:
        self.load_factor = _factor(load_factor)
        self._orders = RendezvousOrders()

    def choose(self, request: RouteRequest, pods: Sequence[PodState],
               index: PrefixIndexMap) -> RouteDecision:
        _require(pods)
        order = self._orders.order(request.affinity_key, pods)
        chosen = _first_under_bound(order, load_bound(pods, self.load_factor))
        return RouteDecision(chosen.pod_id, index.match_length(chosen.pod_id, request.block_hashes),
                             "hash" if chosen is order[0] else "bounded")


class LeastLoadedPolicy:
    """Fewest queued prompt tokens, then fewest requests in flight."""

    name = "least_loaded"

    def __init__(self) -> None:
        self._orders = RendezvousOrders()

    def choose(self, request: RouteRequest, pods: Sequence[PodState],
               index: PrefixIndexMap) -> RouteDecision:
        _require(pods)
        order = self._orders.order(request.affinity_key, pods)
        chosen = min(order, key=lambda p: (p.load.queued_prompt_tokens, p.load.num_requests))
        return RouteDecision(chosen.pod_id, index.match_length(chosen.pod_id, request.block_hashes),
                             "least_loaded")


class RoundRobinPolicy:
    """Ready pods in id order, in turn (the only policy with state: a counter)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: RouteRequest, pods: Sequence[PodState],
               index: PrefixIndexMap) -> RouteDecision:
        _require(pods)
        chosen = pods[self._next % len(pods)]
        self._next += 1
        return RouteDecision(chosen.pod_id, index.match_length(chosen.pod_id, request.block_hashes),
                             "round_robin")


class DecodePolicy:
    """Decode choice: a pod already holding the conversation's prefix first
    (multi-turn: less to pull), then fewest sequences in flight, then most
    free KV blocks. Pods over the load bound, or without room for the
    request's blocks (when their block counts are known), are skipped while
    any other pod qualifies."""

    name = "decode"

    def __init__(self, block_size: int, load_factor: float = 1.25) -> None:
        self.block_size = block_size
        self.load_factor = _factor(load_factor)
        self._orders = RendezvousOrders()

    def choose(self, request: RouteRequest, pods: Sequence[PodState],
               index: PrefixIndexMap) -> RouteDecision:
        _require(pods, "decode")
        order, rank = self._orders.ranked(request.affinity_key, pods)
        holders = index.holder_matches(request.block_hashes)
        needed = -(-(request.num_prompt_tokens + 1) // self.block_size)
        cap = load_bound(pods, self.load_factor)
        # The least key (-matched, in flight, -free blocks) among pods under the
        # bound with room, else among all under the bound; the first in
        # rendezvous order on ties. A pod holding the prefix with room beats
        # every pod without it, so the holders alone decide when one qualifies.
        best = self._least([order[place] for place in sorted(rank[p] for p in holders if p in rank)],
                           holders, cap, needed)
        if best[0] is None:
            best = self._least(order, holders, cap, needed)
        chosen = best[0] or best[1] or order[0]  # order[0]: unreachable with load_factor >= 1
        matched = holders.get(chosen.pod_id, 0)
        return RouteDecision(chosen.pod_id, matched, "prefix" if matched else "least_loaded")

    @staticmethod
    def _least(pods: Sequence[PodState], holders: dict[str, int], cap: int,
               needed: int) -> tuple[PodState | None, PodState | None]:
        """(least with room, least of all) among ``pods`` under ``cap``."""
        fit = least = None
        fit_key = least_key = (0, 0, 0)
        for pod in pods:
            load = pod.load
            in_flight = load.running_seqs + load.waiting_seqs
            if in_flight >= cap:
                continue
            matched = holders.get(pod.pod_id, 0) if holders else 0
            key = (-matched, in_flight, -load.free_blocks)
            if least is None or key < least_key:
                least, least_key = pod, key
            if (load.total_blocks == 0 or load.free_blocks >= needed - matched) and (fit is None or key < fit_key):
                fit, fit_key = pod, key
        return fit, least


PREFILL_POLICIES = ("kv_affinity", "consistent_hash", "least_loaded", "round_robin")


def make_policy(name: str, block_size: int, load_factor: float = 1.25) -> RoutingPolicy:
    """Build a prefill policy by its CLI name."""
    if name == "kv_affinity":
        return KvAffinityPolicy(block_size, load_factor)
    if name == "consistent_hash":
        return ConsistentHashPolicy(load_factor)
    if name == "least_loaded":
        return LeastLoadedPolicy()
    if name == "round_robin":
        return RoundRobinPolicy()
    raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(PREFILL_POLICIES)}")
