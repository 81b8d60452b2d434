"""The router's loop-thread metrics expose what prometheus_client's would."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from splitserve.router.loop_metrics import LoopCounter, LoopHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)


def _record(counter_cls: type, histogram_cls: type) -> str:
    registry = CollectorRegistry()
    plain = counter_cls("t:plain_total", "A counter.", registry=registry)
    by_kind = counter_cls("t:by_kind_total", "A labelled counter.", ["kind", "pod"], registry=registry)
    latency = histogram_cls("t:latency_seconds", "A histogram.", buckets=BUCKETS, registry=registry)
    ratio = histogram_cls("t:ratio", "A labelled histogram.", ["role"], buckets=(0.0, 0.5, 1.0), registry=registry)
    plain.inc()
    plain.inc(2.5)
    by_kind.labels("a", "p1").inc()
    by_kind.labels("b", "p2").inc(3)
    by_kind.labels("a", "p1").inc()
    for value in (0.0005, 0.001, 0.0011, 0.5, 10.0, 11.0, 0.0):
        latency.observe(value)
    for value in (0.0, 0.25, 0.5, 1.0, 1.0):
        ratio.labels("decode").observe(value)
    ratio.labels("prefill").observe(0.75)
    text = generate_latest(registry).decode()
    return "\n".join(line for line in text.splitlines() if "_created" not in line)


def test_exposition_equals_prometheus_clients_less_the_created_series() -> None:
    assert _record(LoopCounter, LoopHistogram) == _record(Counter, Histogram)


def test_samples_are_readable_from_the_registry() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("t:requests_total", "Requests.", ["status"], registry)
    histogram = LoopHistogram("t:ttft_seconds", "TTFT.", registry=registry, buckets=BUCKETS)
    counter.labels("ok").inc(4)
    histogram.observe(0.05)
    assert registry.get_sample_value("t:requests_total", {"status": "ok"}) == 4
    assert registry.get_sample_value("t:ttft_seconds_bucket", {"le": "0.1"}) == 1
    assert registry.get_sample_value("t:ttft_seconds_bucket", {"le": "0.01"}) == 0
    assert registry.get_sample_value("t:ttft_seconds_count") == 1


def test_misuse_is_refused() -> None:
    counter = LoopCounter("t:x_total", "X.", ["a"])
    with pytest.raises(ValueError, match="labels"):
        counter.labels("1", "2")
    with pytest.raises(ValueError, match="labelled"):
        counter.inc()
    with pytest.raises(ValueError, match="only go up"):
        counter.labels("1").inc(-1)
    with pytest.raises(ValueError, match="increasing"):
        LoopHistogram("t:h", "H.", buckets=(1.0, 0.5))
    with pytest.raises(ValueError, match="labelled"):
        LoopHistogram("t:h2", "H.", ["role"], buckets=(1.0,)).observe(1.0)
