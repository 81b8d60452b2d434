"""A test-only fault hook for KV READs, off unless ``SPLITSERVE_KV_FAULTS`` is set.

The chaos tests set it in a pod's environment, which reads it once at start:

    SPLITSERVE_KV_FAULTS="fail=0.5,stall=1.5,seed=7"

- ``fail``: probability that a READ fails at once, as if the wire refused it
  (the decoder then recomputes the prompt);
- ``stall``: seconds every other READ waits before it is posted, as a slow
  wire would (a window in which a test can kill the prefill pod mid-READ or
  disconnect the client);
- ``seed``: the dice (one generator per transport, so a run is repeatable).

Every injected fault is counted in ``TransferMetrics`` (the pod exports them as
``splitserve:kv_transfer_faults_injected{fault}``). Never set it in production.
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

FAULTS_ENV = "SPLITSERVE_KV_FAULTS"


@dataclass(frozen=True)
class TransferFaults:
    """What to inject into READs (see the module doc). Validated here."""

    fail_rate: float = 0.0
    stall_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError(f"{FAULTS_ENV}: fail must be a probability in [0, 1], got {self.fail_rate}")
        if not 0.0 <= self.stall_s <= 600.0:
            raise ValueError(f"{FAULTS_ENV}: stall must be in [0, 600] seconds, got {self.stall_s}")

    @classmethod
    def parse(cls, text: str) -> TransferFaults:
        """``"fail=0.5,stall=1.5,seed=7"`` (any subset); ``ValueError`` on anything else."""
        keys = {"fail": ("fail_rate", float), "stall": ("stall_s", float), "seed": ("seed", int)}
        values: dict[str, float | int] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = item.partition("=")
            if not sep or key.strip() not in keys:
                raise ValueError(f"{FAULTS_ENV}: expected fail=P, stall=S or seed=N items, got {item!r}")
            name, kind = keys[key.strip()]
            try:
                values[name] = kind(raw.strip())
            except ValueError:
                raise ValueError(f"{FAULTS_ENV}: {key.strip()}={raw.strip()!r} is not a number") from None
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TransferFaults | None:
        """The hook named by ``SPLITSERVE_KV_FAULTS`` in ``env``; None when unset or empty."""
        text = env.get(FAULTS_ENV, "").strip()
        return cls.parse(text) if text else None

    def dice(self) -> random.Random:
        """The generator a transport draws its READs' fates from."""
        return random.Random(self.seed)
