"""All Prometheus metrics of the router, in one registry per app."""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from splitserve.router.loop_metrics import LoopCounter, LoopHistogram

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                    0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class RouterMetrics:
    """The router's metrics; each instance owns its ``CollectorRegistry``.

    Label sets are bounded: ``endpoint`` (chat, completions), ``status``
    (success, stopped, error class), ``policy``, ``pod`` (ready pods), ``role``
    and ``pool`` (prefill, decode, unified), ``path`` (the orchestrator's P/D
    paths), ``state`` (ready, draining, not_ready), ``source`` (the discovery
    source: static, file, dns, kubernetes), ``kind`` (added, draining, ready,
    removed).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._routing_children: dict[tuple[str, str, str], tuple[Any, Any, Any, Any]] = {}
        r = self.registry
        self.time_to_first_token = LoopHistogram(
            "splitserve:time_to_first_token_seconds",
            "Router-side time from request arrival to the first output token.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = LoopHistogram(
            "splitserve:inter_token_latency_seconds",
            "Router-side time between consecutive output token chunks, per token.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e_request_latency = LoopHistogram(
            "splitserve:e2e_request_latency_seconds",
            "Router-side time from request arrival to the last token.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.request_queue_time = LoopHistogram(
            "splitserve:request_queue_time_seconds",
            "Time from request arrival until it was handed to the backend.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = LoopCounter(
            "splitserve:router_requests_total",
            "HTTP generation requests by endpoint and outcome.",
            ["endpoint", "status"], registry=r)
        self.prompt_tokens = LoopCounter(
            "splitserve:prompt_tokens_total", "Prompt tokens of accepted requests.", registry=r)
        self.generation_tokens = LoopCounter(
            "splitserve:generation_tokens_total", "Output tokens streamed back.", registry=r)
        self.routing_decisions = LoopCounter(
            "splitserve:routing_decisions_total",
            "Pod choices by role, policy and pod.", ["role", "policy", "pod"], registry=r)
        self.prefix_blocks_queried = LoopCounter(
            "splitserve:router_prefix_blocks_queried_total",
            "Full prompt blocks of routed requests (denominator of the router's prefix-hit ratio).",
            ["role"], registry=r)
        self.prefix_blocks_matched = LoopCounter(
            "splitserve:router_prefix_blocks_matched_total",
            "Prompt blocks the router believed cached on the chosen pod.", ["role"], registry=r)
        self.prefix_hit_ratio = LoopHistogram(
            "splitserve:router_prefix_hit_ratio",
            "Per request: matched blocks / prompt blocks on the chosen pod.",
            ["role"], buckets=_RATIO_BUCKETS, registry=r)
        self.retries = LoopCounter(
            "splitserve:router_retries_total",
            "Retries by role and reason (pod failure, KV pull failure, lost stream).",
            ["role", "reason"], registry=r)
        self.pd_decisions = LoopCounter(
            "splitserve:pd_decisions_total",
            "How requests were served: disaggregated, unified, recompute fallback...",
            ["path"], registry=r)
        self.router_pods = Gauge(
            "splitserve:router_pods",
            "Pods the router knows, by pool and state (ready: routed to; draining: finishing "
            "its work; not_ready: its GetLoad has not answered).", ["pool", "state"], registry=r)
        self.discovery_events = Counter(
            "splitserve:discovery_events_total",
            "Membership changes applied from the discovery source.", ["source", "kind"], registry=r)
        self.discovery_repairs = Counter(
            "splitserve:discovery_repairs_total",
            "Changes only the periodic full list found (a watch event was missed).",
            ["source"], registry=r)
        self.discovery_errors = Counter(
            "splitserve:discovery_errors_total",
            "Failed discovery reads (unreachable, garbage); the last good view is kept.",
            ["source"], registry=r)
        self.queued_requests = Gauge(
            "splitserve:router_queued_requests",
            "Requests the router holds until a pod of the pool is ready (scale from zero).",
            ["pool"], registry=r)
        self.queue_wait = Histogram(
            "splitserve:router_queue_wait_seconds",
            "Time requests spent in the router's queue, whatever the outcome.",
            buckets=_LATENCY_BUCKETS + (120.0, 300.0), registry=r)
        self.scaler_metric_value = Gauge(
            "splitserve:scaler_metric_value",
            "The value last reported to KEDA per pool (prefill: backlog seconds; decode and "
            "unified: load units, 1 = one full pod).", ["pool"], registry=r)

    def observe_routing(self, role: str, policy: str, pod: str,
                        matched_blocks: int, prompt_blocks: int) -> None:
        # Labelled children looked up once per (role, policy, pod), not four
        # times per request: ``labels()`` takes a lock and builds a key each call.
        key = (role, policy, pod)
        children = self._routing_children.get(key)
        if children is None:
            children = self._routing_children[key] = (
                self.routing_decisions.labels(role, policy, pod), self.prefix_blocks_queried.labels(role),
                self.prefix_blocks_matched.labels(role), self.prefix_hit_ratio.labels(role))
        decisions, queried, matched, ratio = children
        decisions.inc()
        if prompt_blocks > 0:
            queried.inc(prompt_blocks)
            matched.inc(matched_blocks)
            ratio.observe(matched_blocks / prompt_blocks)

    def render(self) -> bytes:
        return generate_latest(self.registry)
