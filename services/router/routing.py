"""The router's pod choice for one request: pools, prefix indexes, policies
and the bookkeeping after each decision. Used by the orchestrator."""
from __future__ import annotations

from collections.abc import Iterable

from splitserve.engine.block_hash import BlockHash
from splitserve.router.metrics import RouterMetrics
from splitserve.router.pod_state import PodLoad, PodPool
from splitserve.router.policies import DecodePolicy, RouteDecision, RouteRequest, RoutingPolicy
from splitserve.router.prefix_index import PrefixIndexMap

ROLES = ("prefill", "decode", "unified")


class PodRouter:
    """Picks prefill and decode pods and remembers what it sent where.

    Each ``route_*`` call records the decision: the chosen pod's load grows by
    one request and the prompt's tokens (until the next poll), its prefix index
    gains the prompt's blocks (until the pod's KV events say otherwise), and
    the routing metrics count it. Not thread-safe; call from the event loop.

    Three pools: ``prefill``, ``decode`` and ``unified`` (pods that do both;
    routed with the prefill policy). A static unified deployment may also put
    its pods in the prefill pool (``OrchestratorConfig.unified``).
    """

    def __init__(self, prefill_policy: RoutingPolicy, decode_policy: DecodePolicy,
                 prefill_pods: PodPool, decode_pods: PodPool,
                 metrics: RouterMetrics | None = None, max_index_blocks_per_pod: int = 1 << 16,
                 unified_pods: PodPool | None = None) -> None:
        self.policies: dict[str, RoutingPolicy] = {"prefill": prefill_policy, "decode": decode_policy,
                                                   "unified": prefill_policy}
        self.pools = {"prefill": prefill_pods, "decode": decode_pods,
                      "unified": unified_pods if unified_pods is not None else PodPool()}
        self.indexes = {role: PrefixIndexMap(max_index_blocks_per_pod) for role in ROLES}
        self.metrics = metrics or RouterMetrics()

    def route_prefill(self, request: RouteRequest) -> RouteDecision:
        return self._route("prefill", request)

    def route_decode(self, request: RouteRequest) -> RouteDecision:
        return self._route("decode", request)

    def route(self, role: str, request: RouteRequest) -> RouteDecision:
        """Route to a pod of ``role`` (prefill, decode or unified)."""
        return self._route(role, request)

    def has_ready(self, role: str) -> bool:
        return bool(self.pools[role].ready_pods())

    def _route(self, role: str, request: RouteRequest) -> RouteDecision:
        pool, policy = self.pools[role], self.policies[role]
        decision = policy.choose(request, pool.ready_pods(), self.indexes[role])
        pool.note_assigned(decision.pod_id, request.num_prompt_tokens)
        # The matched blocks are in the index already; re-storing them would only
        # refresh their place in the router's LRU, and the pod's own evictions
        # (KV events) are what really remove blocks.
        self.indexes[role].for_pod(decision.pod_id).stored(request.block_hashes[decision.matched_blocks:])
        self.metrics.observe_routing(role, policy.name, decision.pod_id,
                                     decision.matched_blocks, len(request.block_hashes))
        return decision

    def on_kv_events(self, role: str, pod_id: str, stored: Iterable[BlockHash] = (),
                     evicted: Iterable[BlockHash] = (), cleared: bool = False) -> None:
        """Apply a pod's KV events (``cleared``: the pod restarted or reset its cache)."""
        index = self.indexes[role].for_pod(pod_id)
        if cleared:
            index.clear()
        index.evicted(evicted)
        index.stored(stored)

    def update_load(self, role: str, pod_id: str, load: PodLoad) -> None:
        self.pools[role].update_load(pod_id, load)

    def remove_pod(self, role: str, pod_id: str) -> None:
        self.pools[role].remove(pod_id)
        self.indexes[role].drop_pod(pod_id)
