"""Counters and histograms for the router's per-request path, kept as plain
numbers by the one thread that runs the router's event loop.

prometheus_client's ``Counter`` takes a lock on every ``inc`` and its
``Histogram`` walks its buckets in Python on every ``observe``; the router
records about fifteen of them per request (a few percent of its CPU per
request). These record with a dict lookup and a ``bisect`` and build the same
Prometheus families (names, labels, buckets, ``_sum``/``_count``) when the
registry is collected. Use them from the loop's thread only, and collect
there too (the router's ``/metrics`` route is async, so it does). They leave
out the ``_created`` series.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString


class _CounterValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class _HistogramValue:
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self._bounds, amount)] += 1  # bounds are inclusive (le)
        self.sum += amount


class _LoopMetric:
    """What a counter and a histogram share: their children by label values."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        if not self.labelnames:
            self._only = self._children[()] = self._new_child()
        if registry is not None:
            registry.register(self)

    def _new_child(self) -> object:
        raise NotImplementedError

    def _child(self, values: tuple[str, ...]) -> object:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = self._new_child()
        return child

    def describe(self) -> list[Metric]:
        return [self._family()]

    def _family(self) -> Metric:
        raise NotImplementedError


class LoopCounter(_LoopMetric):
    """A Prometheus counter (``inc``; ``labels(...).inc`` when labelled)."""

    def _new_child(self) -> _CounterValue:
        return _CounterValue()

    def labels(self, *values: str) -> _CounterValue:
        return self._child(values)  # type: ignore[return-value]

    def inc(self, amount: float = 1.0) -> None:
        if self.labelnames:
            raise ValueError(f"{self.name} is labelled: use labels(...).inc()")
        self._only.inc(amount)  # type: ignore[attr-defined]

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)  # type: ignore[attr-defined]
        yield family


class LoopHistogram(_LoopMetric):
    """A Prometheus histogram with fixed ``buckets`` (upper bounds; +Inf is added)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None, *, buckets: Sequence[float]) -> None:
        bounds = tuple(float(b) for b in buckets if b != float("inf"))
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be increasing, got {tuple(buckets)}")
        self._bounds = bounds
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> _HistogramValue:
        return _HistogramValue(self._bounds)

    def labels(self, *values: str) -> _HistogramValue:
        return self._child(values)  # type: ignore[return-value]

    def observe(self, amount: float) -> None:
        if self.labelnames:
            raise ValueError(f"{self.name} is labelled: use labels(...).observe()")
        self._only.observe(amount)  # type: ignore[attr-defined]

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for le, count in zip(les, child.counts):  # type: ignore[attr-defined]
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(list(values), buckets, child.sum)  # type: ignore[attr-defined]
        yield family
