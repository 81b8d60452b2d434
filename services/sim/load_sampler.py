"""Time-averaged load of each simulated pod, for the fleet bench's
imbalance figure (max/mean of running sequences across a pool).

A task samples every serving pod's engine stats (the snapshot ``AsyncEngine``
publishes after each iteration; no lock, no RPC) every ``interval_s`` and
keeps per-pod sums since the last ``reset``.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol


class _Sampled(Protocol):
    name: str

    @property
    def serving(self) -> bool: ...

    @property
    def core(self) -> object: ...


@dataclass
class PodLoadSums:
    samples: int = 0
    running: int = 0
    in_flight: int = 0  # running + waiting (incl. waiting for KV)

    def averages(self) -> dict[str, float]:
        n = max(self.samples, 1)
        return {"samples": self.samples, "avg_running": self.running / n, "avg_in_flight": self.in_flight / n}


class LoadSampler:
    def __init__(self, pods: Callable[[], Iterable[_Sampled]], interval_s: float = 0.1) -> None:
        self._pods = pods
        self.interval_s = interval_s
        self.sums: dict[str, PodLoadSums] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sim-load-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def reset(self) -> None:
        self.sums.clear()

    def sample_once(self) -> None:
        for pod in self._pods():
            core = pod.core
            if not pod.serving or core is None:
                continue
            sched = core.engine.stats().scheduler  # type: ignore[attr-defined]
            sums = self.sums.setdefault(pod.name, PodLoadSums())
            sums.samples += 1
            sums.running += sched.num_running
            sums.in_flight += sched.num_running + sched.num_waiting + sched.num_waiting_for_remote_kv

    def report(self) -> dict[str, dict[str, float]]:
        return {name: sums.averages() for name, sums in self.sums.items()}

    async def _run(self) -> None:
        while True:
            self.sample_once()
            await asyncio.sleep(self.interval_s)
