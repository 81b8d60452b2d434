"""Fault injection for simulated pods: what may go wrong, and the seeded dice.

``FaultConfig`` (flags ``--fault-*``, or replaced at run time through the
sim host's control API) says how often:

- ``rpc_error_rate``: an RPC named in ``rpcs`` answers UNAVAILABLE before
  doing anything (Decode: as the stream's error event);
- ``decode_break_rate``: a Decode stream breaks with UNAVAILABLE after its
  first chunk (a decode pod lost mid-stream: the router fails over);
- ``kv_failure_rate``: a KV READ fails at the end of its transfer time
  (the decoder recomputes the prompt);
- ``prefill_death_rate``: the prefill pod "dies mid-handoff": when the
  decoder claims the lease the blocks are gone and ClaimKV answers
  UNAVAILABLE (the decoder recomputes);
- ``lease_expiry_rate``: a lease expires as soon as it is granted (ClaimKV
  answers NOT_FOUND; the decoder recomputes);
- a slow pod is the latency model's ``slow_factor`` (``--slow-pods``).

Rates are probabilities in [0, 1]; every decision is drawn from one
generator per pod seeded with the fleet seed and the pod's index.
"""
from __future__ import annotations

import random
import threading
from dataclasses import asdict, dataclass, fields
from typing import Any

FAULTABLE_RPCS = ("Prefill", "Decode", "ClaimKV", "ReleaseKV", "GetTransferMetadata", "Abort", "GetLoad")
DEFAULT_FAULT_RPCS = ("Prefill", "Decode", "ClaimKV")


@dataclass(frozen=True)
class FaultConfig:
    rpc_error_rate: float = 0.0
    rpcs: tuple[str, ...] = DEFAULT_FAULT_RPCS
    decode_break_rate: float = 0.0
    kv_failure_rate: float = 0.0
    prefill_death_rate: float = 0.0
    lease_expiry_rate: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "rpcs":
                continue
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ValueError(f"fault rate {f.name} must be a probability in [0, 1], got {value!r}")
        unknown = sorted(set(self.rpcs) - set(FAULTABLE_RPCS))
        if unknown:
            raise ValueError(f"unknown RPC(s) {unknown} for fault injection; choose from {', '.join(FAULTABLE_RPCS)}")

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self) if f.name != "rpcs")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rpcs"] = list(self.rpcs)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaultConfig:
        """Inverse of ``to_dict``; ``ValueError`` for unknown keys or bad values."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown fault setting(s) {unknown}; known: {sorted(names)}")
        values = dict(data)
        if "rpcs" in values:
            rpcs = values["rpcs"]
            if isinstance(rpcs, str):
                rpcs = [r for r in rpcs.split(",") if r]
            values["rpcs"] = tuple(rpcs)
        return cls(**values)


@dataclass
class FaultCounters:
    """Faults injected so far (the sim host reports them)."""

    rpc_errors: int = 0
    decode_breaks: int = 0
    prefill_deaths: int = 0
    lease_expiries: int = 0


class FaultInjector:
    """One pod's dice. ``config`` may be swapped at any time (one attribute
    write); draws are thread-safe."""

    def __init__(self, config: FaultConfig, seed: int = 0) -> None:
        self.config = config
        self.counters = FaultCounters()
        self._rng = random.Random(f"sim-faults:{seed}")
        self._lock = threading.Lock()

    def _roll(self, rate: float) -> bool:
        if rate <= 0:
            return False
        with self._lock:
            return self._rng.random() < rate

    def rpc_fails(self, rpc: str) -> bool:
        config = self.config
        if rpc in config.rpcs and self._roll(config.rpc_error_rate):
            self.counters.rpc_errors += 1
            return True
        return False

    def decode_breaks(self) -> bool:
        if self._roll(self.config.decode_break_rate):
            self.counters.decode_breaks += 1
            return True
        return False

    def prefill_dies(self) -> bool:
        if self._roll(self.config.prefill_death_rate):
            self.counters.prefill_deaths += 1
            return True
        return False

    def lease_expires(self) -> bool:
        if self._roll(self.config.lease_expiry_rate):
            self.counters.lease_expiries += 1
            return True
        return False
