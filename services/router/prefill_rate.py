"""The prefill pool's measured rate: prompt tokens one pod computes per
second, from the router's own Prefill calls (the scaler turns the backlog
into seconds of work with it)."""
from __future__ import annotations

import math
from dataclasses import dataclass

# Before any Prefill was measured. Deliberately low (a small GPU computes
# several thousand prompt tokens per second, this machine's CPU pods about a
# thousand): a low rate reads as more seconds of backlog, so an unmeasured
# pool scales out early rather than late.
DEFAULT_PREFILL_TOKENS_PER_S = 1000.0


@dataclass
class _PodMeter:
    in_flight: int = 0
    mark: float = 0.0
    busy_s: float = 0.0
    tokens: float = 0.0


class PrefillRate:
    """Throughput per pod = computed prompt tokens / time the pod had at
    least one Prefill in flight (so concurrent, batched Prefills are not
    counted as slow ones). Old samples fade with ``half_life_s``; the pool's
    rate is the busy-time-weighted mean over its pods, or
    ``default_tokens_per_s`` until ``min_busy_s`` of work was seen.

    Implements the orchestrator's ``PrefillObserver``; call from the event
    loop with a monotonic ``now``.
    """

    def __init__(self, default_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S,
                 half_life_s: float = 120.0, min_busy_s: float = 0.05) -> None:
        if default_tokens_per_s <= 0 or half_life_s <= 0:
            raise ValueError("default_tokens_per_s and half_life_s must be > 0")
        self.default_tokens_per_s = default_tokens_per_s
        self.half_life_s = half_life_s
        self.min_busy_s = min_busy_s
        self._pods: dict[str, _PodMeter] = {}

    def _advance(self, meter: _PodMeter, now: float) -> None:
        elapsed = max(0.0, now - meter.mark)
        decay = math.pow(0.5, elapsed / self.half_life_s)
        if meter.in_flight:
            meter.busy_s += elapsed
        meter.busy_s *= decay
        meter.tokens *= decay
        meter.mark = now

    def prefill_started(self, pod: str, now: float) -> None:
        meter = self._pods.setdefault(pod, _PodMeter(mark=now))
        self._advance(meter, now)
        meter.in_flight += 1

    def prefill_finished(self, pod: str, computed_tokens: int, now: float) -> None:
        meter = self._pods.get(pod)
        if meter is None or meter.in_flight == 0:
            return
        self._advance(meter, now)
        meter.in_flight -= 1
        meter.tokens += max(0, computed_tokens)

    @property
    def measured(self) -> bool:
        """Enough Prefill work seen to trust the measurement."""
        busy = sum(m.busy_s for m in self._pods.values())
        return busy >= self.min_busy_s and any(m.tokens > 0 for m in self._pods.values())

    def tokens_per_s(self) -> float:
        """The pool's measured rate (pods that left still count, fading)."""
        if not self.measured:
            return self.default_tokens_per_s
        busy = sum(m.busy_s for m in self._pods.values())
        return sum(m.tokens for m in self._pods.values()) / busy
