"""How long a simulated pod's work takes: engine steps and KV transfers.

    prefill (a step with prompt work)  = prefill_overhead + per_token * prompt tokens
                                         (+ per_seq * decode sequences riding along)
    decode (a step with none)          = decode_base + per_seq * batch
    KV transfer of B bytes             = kv_overhead + B / kv_bandwidth

"Prompt tokens" are the tokens the step computes, i.e. uncached ones: prefix
hits never reach the runner. Each time is multiplied by ``slow_factor`` (a
slow pod) and by a jitter drawn uniformly from ``[1 - jitter, 1 + jitter]``
by a generator seeded per pod, so a run is reproducible.

Parameters come from flags, from a JSON file (``to_json``/``from_json``:
what ``bench/fleet.py fit`` writes from our own benchmark results), or both
(flags override the file).
"""
from __future__ import annotations

import json
import random
import threading
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from splitserve.engine.sim_runner import StepShape

SCHEMA = "splitserve.sim.latency_model/v1"


@dataclass(frozen=True)
class LatencyParams:
    """The model's constants (seconds, bytes/s). Defaults: the 56M bench
    model's fp32 pod on this project's 2-vCPU box, rounded (see the README's
    fleet section for the fit)."""

    prefill_overhead_s: float = 0.004
    prefill_per_token_s: float = 0.00025
    decode_base_s: float = 0.010
    decode_per_seq_s: float = 0.0004
    kv_overhead_s: float = 0.0005
    kv_bandwidth_bytes_per_s: float = 5e9
    jitter: float = 0.05

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"latency parameter {f.name} must be a number >= 0, got {value!r}")
        if self.kv_bandwidth_bytes_per_s <= 0:
            raise ValueError("kv_bandwidth_bytes_per_s must be > 0")
        if self.jitter >= 1:
            raise ValueError(f"jitter is a fraction in [0, 1), got {self.jitter}")

    def to_json(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        data = {"schema": SCHEMA, "params": asdict(self), **(extra or {})}
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> LatencyParams:
        """Read a file written by ``to_json``; ``ValueError`` names what is wrong."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read latency model {path}: {exc}") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ValueError(f"{path} is not a latency model file (schema {SCHEMA!r}); "
                             "write one with `python bench/fleet.py fit`")
        params = data.get("params")
        names = {f.name for f in fields(cls)}
        if not isinstance(params, dict) or not set(params) <= names:
            raise ValueError(f"{path}: params must be an object with keys among {sorted(names)}")
        return cls(**params)

    def with_overrides(self, **overrides: float | None) -> LatencyParams:
        """Replace the parameters given (not None)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def mean_step_seconds(self, shape: StepShape) -> float:
        """The step time without jitter or slow factor."""
        if shape.is_empty:
            return 0.0
        if shape.num_prefill_tokens:
            base = self.prefill_overhead_s + self.prefill_per_token_s * shape.num_prefill_tokens
        else:
            base = self.decode_base_s
        return base + self.decode_per_seq_s * shape.num_decode_seqs

    def mean_transfer_seconds(self, num_bytes: int) -> float:
        return self.kv_overhead_s + num_bytes / self.kv_bandwidth_bytes_per_s


class LatencyModel:
    """One pod's draws from ``params`` (``StepTimer`` for ``SimRunner``, and
    the transfer time for ``SimTransport``). ``slow_factor`` may be changed
    at run time (fault injection); draws are thread-safe (engine thread and
    event loop both draw)."""

    def __init__(self, params: LatencyParams, seed: int = 0, slow_factor: float = 1.0) -> None:
        if slow_factor <= 0:
            raise ValueError(f"slow_factor must be > 0, got {slow_factor}")
        self.params = params
        self.slow_factor = slow_factor
        self._rng = random.Random(f"sim-latency:{seed}")
        self._lock = threading.Lock()

    def _scale(self) -> float:
        j = self.params.jitter
        with self._lock:
            noise = 1.0 + self._rng.uniform(-j, j) if j else 1.0
        return noise * self.slow_factor

    def step_seconds(self, shape: StepShape) -> float:
        mean = self.params.mean_step_seconds(shape)
        return mean * self._scale() if mean else 0.0

    def transfer_seconds(self, num_bytes: int) -> float:
        return self.params.mean_transfer_seconds(num_bytes) * self._scale()
