"""Routing: prefix index, policies (affinity, bounded load, determinism), PodRouter."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.router.metrics import RouterMetrics
from splitserve.router.pod_state import PodLoad, PodPool, PodState
from splitserve.router.policies import (ConsistentHashPolicy, DecodePolicy, KvAffinityPolicy,
                                        LeastLoadedPolicy, NoReadyPodError, RoundRobinPolicy,
                                        RendezvousOrders, RouteRequest, load_bound, make_policy,
                                        rendezvous_order)
from splitserve.router.prefix_index import PrefixIndex, PrefixIndexMap
from splitserve.router.routing import PodRouter

BLOCK = 4
PODS = ["pod-a", "pod-b", "pod-c", "pod-d"]


def make_router(policy: str = "kv_affinity", pods: list[str] = PODS, load_factor: float = 1.25) -> PodRouter:
    return PodRouter(make_policy(policy, BLOCK, load_factor), DecodePolicy(BLOCK, load_factor),
                     PodPool(list(pods)), PodPool(list(pods)), RouterMetrics())


def req(tokens: list[int]) -> RouteRequest:
    return RouteRequest.from_prompt(tokens, BLOCK)


def finish_all(router: PodRouter, role: str = "prefill") -> None:
    for pod in router.pools[role].ready_pods():
        router.update_load(role, pod.pod_id, PodLoad())


def test_prefix_index_matches_leading_chain_and_is_bounded() -> None:
    index = PrefixIndex(max_blocks=3)
    index.stored([b"a", b"b", b"c"])
    assert index.match_length([b"a", b"b", b"x", b"c"]) == 2
    index.stored([b"d"])  # evicts the least recently stored: a
    assert len(index) == 3 and b"a" not in index
    assert index.match_length([b"a", b"b"]) == 0
    index.evicted([b"b"])
    assert index.match_length([b"c", b"d"]) == 2 and b"b" not in index


_OPS = st.lists(st.tuples(st.sampled_from(["stored", "evicted", "drop"]), st.sampled_from(PODS),
                          st.lists(st.sampled_from([b"a", b"b", b"c", b"d", b"e", b"f"]), max_size=5)),
                max_size=40)


@settings(max_examples=200, deadline=None)
@given(ops=_OPS, query=st.lists(st.sampled_from([b"a", b"b", b"c", b"d", b"e", b"f"]), max_size=6))
def test_one_walk_for_every_pod_equals_each_pod_alone(ops, query) -> None:
    indexes = PrefixIndexMap(max_blocks_per_pod=4)  # small: LRU evictions happen too
    for op, pod, hashes in ops:
        if op == "drop":
            indexes.drop_pod(pod)
        else:
            getattr(indexes.for_pod(pod), op)(hashes)
    assert indexes.match_lengths(PODS, query) == {p: indexes.match_length(p, query) for p in PODS}
    for pod in PODS:
        indexes.drop_pod(pod)
    assert indexes._holders == {}  # nothing left behind by any path


def test_shared_system_prompt_goes_to_the_same_pod() -> None:
    router = make_router()
    system = list(range(100, 164))  # 16 blocks
    chosen = set()
    for user in range(20):
        decision = router.route_prefill(req(system + [1000 + user, 7, 7, 7, 7]))
        chosen.add(decision.pod_id)
        if user:
            assert decision.reason == "affinity" and decision.matched_blocks >= 16
        finish_all(router)
    assert len(chosen) == 1
    # A different prompt is placed by rendezvous hashing, not necessarily there.
    other = router.route_prefill(req(list(range(500, 540))))
    assert other.reason == "hash" and other.matched_blocks == 0


def test_affinity_follows_kv_events_and_load_penalty() -> None:
    router = make_router()
    prompt = list(range(32))
    hashes = req(prompt).block_hashes
    router.on_kv_events("prefill", "pod-c", stored=hashes)
    assert router.route_prefill(req(prompt)).pod_id == "pod-c"
    finish_all(router)
    # pod-c busy with a long queue: recomputing elsewhere is cheaper.
    router.update_load("prefill", "pod-c", PodLoad(queued_prompt_tokens=10_000))
    assert router.route_prefill(req(prompt)).pod_id != "pod-c"
    finish_all(router)
    router.on_kv_events("prefill", "pod-c", cleared=True)
    for pod in PODS:
        router.on_kv_events("prefill", pod, evicted=hashes)
    assert router.route_prefill(req(prompt)).matched_blocks == 0


@pytest.mark.parametrize("policy", ["kv_affinity", "consistent_hash"])
def test_hot_prefix_is_spread_under_the_load_bound(policy: str) -> None:
    router = make_router(policy)
    hot = list(range(64))
    for i in range(400):
        tokens = hot + [i] if i % 10 else list(range(1000 + i, 1040 + i))  # 90% one prefix
        pool_before = router.pools["prefill"].ready_pods()
        bound = load_bound(pool_before, KvAffinityPolicy(BLOCK).load_factor)
        decision = router.route_prefill(req(tokens))
        assert router.pools["prefill"].get(decision.pod_id).load.num_requests <= bound
    loads = [p.load.num_requests for p in router.pools["prefill"].ready_pods()]
    assert sum(loads) == 400
    assert max(loads) <= math.ceil(1.25 * 400 / 4)
    assert min(loads) > 0


def test_two_routers_with_the_same_view_agree() -> None:
    first, second = make_router(), make_router()
    for i in range(60):
        tokens = [i % 7] * 20 + list(range(i, i + 9))
        a, b = first.route_prefill(req(tokens)), second.route_prefill(req(tokens))
        assert a == b
        assert first.route_decode(req(tokens)) == second.route_decode(req(tokens))
        if i % 5 == 0:
            finish_all(first), finish_all(second)


def test_least_loaded_and_round_robin() -> None:
    pods = [PodState("p1", PodLoad(queued_prompt_tokens=50)), PodState("p2", PodLoad(queued_prompt_tokens=5)),
            PodState("p3", PodLoad(queued_prompt_tokens=500))]
    index = PrefixIndexMap()
    assert LeastLoadedPolicy().choose(req([1, 2, 3]), pods, index).pod_id == "p2"
    rr = RoundRobinPolicy()
    assert [rr.choose(req([1]), pods, index).pod_id for _ in range(4)] == ["p1", "p2", "p3", "p1"]


def test_decode_prefers_the_pod_holding_the_conversation() -> None:
    router = make_router()
    for pod in PODS:
        router.update_load("decode", pod, PodLoad(running_seqs=3, free_blocks=100, total_blocks=100))
    turn1 = list(range(40))
    first = router.route_decode(req(turn1))
    # The holder is busier than the others but still under the load bound.
    router.update_load("decode", first.pod_id, PodLoad(running_seqs=4, free_blocks=80, total_blocks=100))
    turn2 = router.route_decode(req(turn1 + list(range(200, 220))))
    assert turn2.pod_id == first.pod_id and turn2.reason == "prefix"
    # ...unless it has no room for the rest of the prompt.
    router.update_load("decode", first.pod_id, PodLoad(running_seqs=4, free_blocks=1, total_blocks=100))
    assert router.route_decode(req(turn1 + list(range(300, 340)))).pod_id != first.pod_id


def test_no_ready_pod_and_unknown_policy() -> None:
    router = make_router(pods=["only"])
    router.pools["prefill"].set_ready("only", False)
    with pytest.raises(NoReadyPodError, match="no ready prefill pod"):
        router.route_prefill(req([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="kv_affinity"):
        make_policy("random", BLOCK)


def test_routing_metrics_count_decisions_and_prefix_hits() -> None:
    router = make_router()
    prompt = list(range(16))
    router.route_prefill(req(prompt))
    finish_all(router)
    router.route_prefill(req(prompt))
    text = router.metrics.render().decode()
    assert 'splitserve:routing_decisions_total{pod=' in text
    assert 'splitserve:router_prefix_blocks_matched_total{role="prefill"} 4.0' in text
    assert 'splitserve:router_prefix_blocks_queried_total{role="prefill"} 8.0' in text


@settings(max_examples=150, deadline=None)
@given(loads=st.lists(st.integers(0, 50), min_size=1, max_size=8),
       factor=st.sampled_from([1.0, 1.1, 1.25, 1.5, 2.0]),
       key=st.binary(min_size=1, max_size=8),
       cached=st.lists(st.integers(0, 7), max_size=8),
       policy=st.sampled_from(["kv_affinity", "consistent_hash"]))
def test_bounded_load_invariant(loads: list[int], factor: float, key: bytes, cached: list[int],
                                policy: str) -> None:
    pods = [PodState(f"pod-{i}", PodLoad(running_seqs=n)) for i, n in enumerate(loads)]
    request = RouteRequest(tuple(bytes([i]) * 4 for i in range(4)), 16, key)
    index = PrefixIndexMap()
    for i in cached:
        if i < len(pods):
            index.for_pod(pods[i].pod_id).stored(request.block_hashes[: 1 + i % 4])
    chosen = make_policy(policy, BLOCK, factor).choose(request, pods, index)
    load = next(p.load.num_requests for p in pods if p.pod_id == chosen.pod_id)
    assert load + 1 <= load_bound(pods, ConsistentHashPolicy(factor).load_factor)


@settings(max_examples=100, deadline=None)
@given(rounds=st.lists(st.tuples(st.sampled_from([b"k1", b"k2", b"k3"]),
                                 st.lists(st.sampled_from(PODS + ["pod-e", "pod-f"]), unique=True, min_size=1)),
                       max_size=12))
def test_remembered_rendezvous_orders_equal_fresh_ones_as_pods_come_and_go(rounds) -> None:
    orders = RendezvousOrders(max_keys=2)
    for key, ids in rounds:
        pods = [PodState(pod_id) for pod_id in sorted(ids)]
        assert list(orders.order(key, pods)) == rendezvous_order(key, pods)
        frozen = tuple(pods)  # a pool's cached ready tuple: asked twice, the second answer is remembered
        assert list(orders.order(key, frozen)) == list(orders.order(key, frozen)) == rendezvous_order(key, pods)


def test_ready_pods_is_one_tuple_until_readiness_or_membership_changes() -> None:
    pool = PodPool(["b", "a", "c"])
    first = pool.ready_pods()
    pool.update_load("a", PodLoad(running_seqs=3))
    pool.note_assigned("b", 10)
    assert pool.ready_pods() is first and [p.pod_id for p in first] == ["a", "b", "c"]
    pool.set_ready("b", False)
    assert [p.pod_id for p in pool.ready_pods()] == ["a", "c"]
    pool.set_draining("c", True)
    pool.add("d")
    assert [p.pod_id for p in pool.ready_pods()] == ["a", "d"]
    pool.remove("a")
    assert [p.pod_id for p in pool.ready_pods()] == ["d"]
