"""Per-request latency bookkeeping that feeds the pod's histograms."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from splitserve.pod.metrics import PodMetrics


@dataclass
class RequestTimer:
    """Observes queue time, TTFT, inter-token latency and e2e for one request."""

    metrics: PodMetrics
    arrival: float = field(default_factory=time.monotonic)
    _first_output: float | None = None
    _last_token: float | None = None

    def on_output(self, num_new_tokens: int) -> None:
        now = time.monotonic()
        if self._first_output is None:
            self._first_output = now
            self.metrics.request_queue_time.observe(now - self.arrival)
        if num_new_tokens == 0:
            return
        if self._last_token is None:
            self.metrics.time_to_first_token.observe(now - self.arrival)
        else:
            self.metrics.inter_token_latency.observe(now - self._last_token)
        self._last_token = now

    def on_finish(self, reason: str | None) -> None:
        self.metrics.e2e_request_latency.observe(time.monotonic() - self.arrival)
        if reason is not None:
            self.metrics.request_success.labels(finished_reason=reason).inc()
