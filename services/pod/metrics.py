"""Every Prometheus metric of an engine pod (DESIGN.md section 9), in one
per-pod ``CollectorRegistry``, prefixed ``splitserve:``.

Gauges and counters that the engine, transport and lease table already keep
are read at scrape time by ``_PodCollector``; latency histograms and the
per-reason success counter are observed by the pod core as requests run.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from splitserve.engine.outputs import EngineStats
from splitserve.kvtransfer import TransferMetrics

P = "splitserve:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class MetricSources:
    """Scrape-time readers; ``transport`` is None on a pod without KV transfer."""

    engine_stats: Callable[[], EngineStats]
    transport: Callable[[], TransferMetrics | None]
    leased_blocks: Callable[[], int]
    leases_expired: Callable[[], int]
    transfer_failures: Callable[[], int]


class _PodCollector(Collector):
    def __init__(self, sources: MetricSources) -> None:
        self._sources = sources

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        src = self._sources
        stats = src.engine_stats()
        sched = stats.scheduler
        yield GaugeMetricFamily(P + "num_requests_running", "Requests in the running batch.", sched.num_running)
        yield GaugeMetricFamily(P + "num_requests_waiting", "Requests waiting to be scheduled (incl. for KV).",
                                sched.num_waiting + sched.num_waiting_for_remote_kv)
        yield GaugeMetricFamily(P + "kv_cache_usage_perc", "Fraction of KV blocks in use (0..1).",
                                sched.kv_cache_usage)
        yield CounterMetricFamily(P + "num_preemptions", "Preemptions by recompute.", sched.num_preemptions)
        yield CounterMetricFamily(P + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  sched.prefix_cache_queries)
        yield CounterMetricFamily(P + "prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                                  sched.prefix_cache_hits)
        yield CounterMetricFamily(P + "prompt_tokens", "Prompt tokens submitted.", stats.prompt_tokens_total)
        yield CounterMetricFamily(P + "generation_tokens", "Tokens generated.", stats.generation_tokens_total)
        transfer = src.transport()
        yield CounterMetricFamily(P + "kv_transfer_bytes", "KV bytes pulled from prefill pods.",
                                  transfer.bytes_transferred if transfer else 0)
        yield CounterMetricFamily(P + "kv_transfer_failures", "KV pulls that failed (the prompt was recomputed).",
                                  src.transfer_failures())
        injected = CounterMetricFamily(P + "kv_transfer_faults_injected",
                                       "KV READs failed or stalled by the test fault hook (SPLITSERVE_KV_FAULTS).",
                                       labels=["fault"])
        injected.add_metric(["fail"], transfer.faults_injected_fail if transfer else 0)
        injected.add_metric(["stall"], transfer.faults_injected_stall if transfer else 0)
        yield injected
        yield GaugeMetricFamily(P + "kv_blocks_leased", "KV blocks held for decoders under a lease.",
                                src.leased_blocks())
        yield CounterMetricFamily(P + "kv_lease_expired", "KV leases that expired unpulled.", src.leases_expired())


class PodMetrics:
    """The pod's registry and the instruments the core observes."""

    def __init__(self, sources: MetricSources) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_PodCollector(sources))
        r = self.registry
        self.time_to_first_token = Histogram(P + "time_to_first_token_seconds",
                                             "Arrival to first token produced by this pod.",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(P + "inter_token_latency_seconds", "Time between output tokens.",
                                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(P + "e2e_request_latency_seconds", "Arrival to finish on this pod.",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.request_queue_time = Histogram(
            P + "request_queue_time_seconds",
            "Arrival to the engine's first output for the request (queueing plus the first chunk).",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.kv_transfer_seconds = Histogram(P + "kv_transfer_seconds", "Duration of successful KV pulls.",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.request_success = Counter(P + "request_success", "Requests finished, by reason.",
                                       ["finished_reason"], registry=r)
        for reason in FINISH_REASONS:
            self.request_success.labels(finished_reason=reason)
