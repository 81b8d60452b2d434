"""The routing policies' fast paths (only the pods holding a prompt's first
block walked, the load bound summed only when a busy pod needs it, the scan
for pods without a match stopped once none can win) decide exactly as
scoring every ready pod does. The references below are that full scoring,
as the policies did it before the fast paths."""
from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from splitserve.engine.block_hash import hash_prompt_blocks
from splitserve.router.pod_state import PodLoad, PodState
from splitserve.router.policies import (ConsistentHashPolicy, DecodePolicy, KvAffinityPolicy, RouteDecision,
                                        RouteRequest, _factor, load_bound, rendezvous_order)
from splitserve.router.prefix_index import PrefixIndexMap

BLOCK = 4


def _under_bound(order: Sequence[PodState], load_factor: float) -> list[PodState]:
    cap = load_bound(order, _factor(load_factor))
    return [p for p in order if p.load.num_requests + 1 <= cap] or list(order)


def reference_kv_affinity(request: RouteRequest, pods: Sequence[PodState], index: PrefixIndexMap,
                          load_factor: float) -> RouteDecision:
    order = rendezvous_order(request.affinity_key, pods)
    candidates = _under_bound(order, load_factor)
    matches = {p.pod_id: index.match_length(p.pod_id, request.block_hashes) for p in candidates}
    if max(matches.values()) == 0:
        chosen = candidates[0]
        return RouteDecision(chosen.pod_id, 0, "hash" if chosen is order[0] else "bounded")
    chosen = max(candidates, key=lambda p: matches[p.pod_id] * BLOCK * 1.0 - p.load.queued_prompt_tokens * 1.0)
    return RouteDecision(chosen.pod_id, matches[chosen.pod_id], "affinity")


def reference_consistent_hash(request: RouteRequest, pods: Sequence[PodState], index: PrefixIndexMap,
                              load_factor: float) -> RouteDecision:
    order = rendezvous_order(request.affinity_key, pods)
    chosen = _under_bound(order, load_factor)[0]
    return RouteDecision(chosen.pod_id, index.match_length(chosen.pod_id, request.block_hashes),
                         "hash" if chosen is order[0] else "bounded")


def reference_decode(request: RouteRequest, pods: Sequence[PodState], index: PrefixIndexMap,
                     load_factor: float) -> RouteDecision:
    order = rendezvous_order(request.affinity_key, pods)
    matches = {p.pod_id: index.match_length(p.pod_id, request.block_hashes) for p in order}
    needed = -(-(request.num_prompt_tokens + 1) // BLOCK)
    bounded = _under_bound(order, load_factor)
    fits = [p for p in bounded
            if p.load.total_blocks == 0 or p.load.free_blocks >= needed - matches[p.pod_id]]
    chosen = min(fits or bounded, key=lambda p: (-matches[p.pod_id], p.load.num_requests, -p.load.free_blocks))
    return RouteDecision(chosen.pod_id, matches[chosen.pod_id],
                         "prefix" if matches[chosen.pod_id] else "least_loaded")


def _world(rng: random.Random) -> tuple[list[PodState], PrefixIndexMap, list[RouteRequest]]:
    pods = []
    for i in range(rng.randint(1, 24)):
        busy = rng.random() < 0.5
        load = PodLoad(queued_prompt_tokens=rng.choice([0, 0, 4, 8, 16, 64]) if busy else 0,
                       running_seqs=rng.randint(0, 6) if busy else 0,
                       waiting_seqs=rng.randint(0, 3) if busy else 0,
                       free_blocks=rng.randint(0, 12), total_blocks=rng.choice([0, 12]))
        pods.append(PodState(f"pod-{i:02d}", load))
    prompts = [[rng.randint(1, 9) for _ in range(rng.randint(1, 20))] for _ in range(6)]
    index = PrefixIndexMap()
    for pod in pods:
        for prompt in rng.sample(prompts, rng.randint(0, 3)):
            hashes = hash_prompt_blocks(prompt, BLOCK)
            index.for_pod(pod.pod_id).stored(hashes[:rng.randint(0, len(hashes))])
    requests = []
    for prompt in prompts:
        tail = prompt + [rng.randint(1, 9) for _ in range(rng.randint(0, 6))]
        requests.append(RouteRequest.from_prompt(tail, BLOCK))
    return pods, index, requests


@pytest.mark.parametrize("seed", range(300))
def test_fast_policies_decide_as_full_scoring(seed: int) -> None:
    rng = random.Random(seed)
    pods, index, requests = _world(rng)
    load_factor = rng.choice([1.0, 1.25, 2.0])
    policies = [(KvAffinityPolicy(BLOCK, load_factor), reference_kv_affinity),
                (ConsistentHashPolicy(load_factor), reference_consistent_hash),
                (DecodePolicy(BLOCK, load_factor), reference_decode)]
    # Some pods the index knows may not be ready (not in the sequence routed over).
    routable = rng.sample(pods, rng.randint(1, len(pods)))
    for shape in (tuple, list):
        ready = shape(sorted(routable, key=lambda p: p.pod_id))
        for request in requests:
            for policy, reference in policies:
                assert policy.choose(request, ready, index) == reference(request, ready, index, load_factor), \
                    (policy.name, seed)


def test_weights_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        KvAffinityPolicy(BLOCK, load_weight=-1.0)


def test_the_pools_in_flight_total_follows_every_load_change() -> None:
    from splitserve.router.pod_state import PodPool

    rng = random.Random(7)
    pool = PodPool([f"pod-{i}" for i in range(8)])
    for step in range(2000):
        pod = f"pod-{rng.randrange(9)}"  # pod-8 is unknown: ignored
        action = rng.randrange(6)
        if action == 0:
            pool.update_load(pod, PodLoad(running_seqs=rng.randint(0, 5), waiting_seqs=rng.randint(0, 2)))
        elif action == 1:
            pool.note_assigned(pod, 16)
        elif action == 2:
            pool.note_done(pod, 16)
        elif action == 3:
            pool.set_ready(pod, rng.random() < 0.7)
        elif action == 4:
            pool.set_draining(pod, rng.random() < 0.2)
        elif rng.random() < 0.5:
            ready = pool.ready_pods()
            assert ready.in_flight == sum(p.load.num_requests for p in ready), step
        if rng.random() < 0.01:
            pool.remove(pod) if rng.random() < 0.5 else pool.add(pod)
    ready = pool.ready_pods()
    assert ready.in_flight == sum(p.load.num_requests for p in ready)
