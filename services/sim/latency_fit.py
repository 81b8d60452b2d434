"""Fit the sim latency model to measured runs of the real engine.

A benchmark JSON (``bench/engine_throughput.py``) reports, for a known
workload, the run's wall time and request latency percentiles. Replaying the
same requests through the real scheduler with ``SimRunner`` (``replay``)
gives every step's shape and the step at which each request finished; since
the engine runs steps back to back,

    wall      = sum over steps of step_time(shape)
    latency_r = sum over steps up to r's last of step_time(shape)

and ``step_time`` is linear in the four step parameters (``LatencyParams``:
prefill overhead, per prompt token, decode base, per decode sequence). Each
measured figure is one linear equation; ``fit_steps`` solves them by
non-negative least squares on relative error. KV transfers are fitted apart
(``fit_transfer``: time = overhead + bytes / bandwidth, from
``bench/kv_transfer.py`` rows).
"""
from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from splitserve.engine.engine_args import EngineArgs
from splitserve.engine.engine_core import EngineCore
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.sim_runner import SimRunner, StepShape
from splitserve.sim.latency_model import LatencyParams

STEP_PARAMS = ("prefill_overhead_s", "prefill_per_token_s", "decode_base_s", "decode_per_seq_s")


def step_features(shape: StepShape) -> np.ndarray:
    """The step's coefficients of ``STEP_PARAMS`` (see ``LatencyParams``)."""
    prefill = 1.0 if shape.num_prefill_tokens else 0.0
    return np.array([prefill, float(shape.num_prefill_tokens), 1.0 - prefill if not shape.is_empty else 0.0,
                     float(shape.num_decode_seqs)])


class _Recorder:
    def __init__(self) -> None:
        self.shapes: list[StepShape] = []

    def step_seconds(self, shape: StepShape) -> float:
        self.shapes.append(shape)
        return 0.0


@dataclass
class ReplayTrace:
    """Step shapes of a replayed run and, per request, the index of its last step."""

    shapes: list[StepShape]
    finish_step: dict[str, int]

    def cumulative(self) -> np.ndarray:
        """Row i: the features of steps 0..i summed."""
        return np.cumsum(np.array([step_features(s) for s in self.shapes]), axis=0)


@dataclass(frozen=True)
class ReplayRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int


def replay(requests: Sequence[ReplayRequest], warmup: Sequence[ReplayRequest] = (), *, block_size: int = 16,
           max_num_batched_tokens: int = 2048, max_num_seqs: int = 256, num_blocks: int = 65536,
           vocab_size: int = 32000) -> ReplayTrace:
    """Run ``warmup`` then ``requests`` (all added at once, greedy,
    ``ignore_eos``) through the real scheduler in zero time; record the
    measured batch's steps only."""
    recorder = _Recorder()
    longest = max(len(r.prompt_token_ids) + r.max_tokens for r in [*requests, *warmup])
    runner = SimRunner(num_blocks=num_blocks, block_size=block_size, max_model_len=longest + block_size,
                       vocab_size=vocab_size, eos_token_ids=frozenset(), step_timer=recorder, sleep=lambda s: None)
    core = EngineCore(EngineArgs(block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
                                 max_num_seqs=max_num_seqs), runner)

    def run(batch: Sequence[ReplayRequest]) -> dict[str, int]:
        for r in batch:
            core.add_request(r.request_id, r.prompt_token_ids,
                             SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True))
        finished: dict[str, int] = {}
        while core.has_unfinished_requests():
            for out in core.step():
                if out.finished:
                    finished[out.request_id] = len(recorder.shapes) - 1
        return finished

    run(warmup)
    start = len(recorder.shapes)
    finished = run(requests)
    return ReplayTrace(recorder.shapes[start:], {rid: i - start for rid, i in finished.items()})


@dataclass(frozen=True)
class Observation:
    """One measured figure: ``label`` (e.g. "quick16 wall"), its feature sums, seconds."""

    label: str
    features: np.ndarray
    measured_s: float


def latency_observations(name: str, trace: ReplayTrace, wall_s: float, p50_s: float | None = None,
                         p90_s: float | None = None, max_s: float | None = None) -> list[Observation]:
    """Observations of one ``engine_throughput`` result, with its
    percentile rules (median; ``ordered[int(0.9 n)]``; max)."""
    cum = trace.cumulative()
    ends = sorted(trace.finish_step.values())
    n = len(ends)
    out = [Observation(f"{name} wall", cum[-1], wall_s)]
    if p50_s is not None:
        mid = (cum[ends[(n - 1) // 2]] + cum[ends[n // 2]]) / 2
        out.append(Observation(f"{name} p50", mid, p50_s))
    if p90_s is not None:
        out.append(Observation(f"{name} p90", cum[ends[min(n - 1, int(0.9 * n))]], p90_s))
    if max_s is not None:
        out.append(Observation(f"{name} max", cum[ends[-1]], max_s))
    return out


@dataclass
class StepFit:
    values: dict[str, float]
    rows: list[tuple[str, float, float]] = field(default_factory=list)  # label, measured, predicted

    @property
    def rms_relative_error(self) -> float:
        errors = [(p - m) / m for _, m, p in self.rows if m > 0]
        return float(np.sqrt(np.mean(np.square(errors)))) if errors else 0.0


def fit_steps(observations: Sequence[Observation]) -> StepFit:
    """Non-negative least squares on relative error (every observation
    weighs the same whatever its length), by trying each subset of free
    parameters (four: sixteen small solves). Raises ``ValueError`` without
    observations."""
    if not observations:
        raise ValueError("no observations to fit")
    a = np.array([o.features / o.measured_s for o in observations])
    b = np.ones(len(observations))
    best: tuple[float, np.ndarray] | None = None
    for k in range(1, a.shape[1] + 1):
        for subset in itertools.combinations(range(a.shape[1]), k):
            cols = list(subset)
            sol, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if (sol < 0).any():
                continue
            theta = np.zeros(a.shape[1])
            theta[cols] = sol
            residual = float(np.sum((a @ theta - b) ** 2))
            if best is None or residual < best[0] - 1e-15:
                best = (residual, theta)
    assert best is not None  # a single column with positive data always solves
    theta = best[1]
    rows = [(o.label, o.measured_s, float(o.features @ theta)) for o in observations]
    return StepFit(dict(zip(STEP_PARAMS, (float(t) for t in theta))), rows)


def fit_transfer(samples: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(overhead seconds, bytes per second) from (bytes, seconds) samples;
    least squares, overhead clamped at 0. Needs two distinct sizes."""
    sizes = {n for n, _ in samples}
    if len(sizes) < 2:
        raise ValueError("fit_transfer needs samples of at least two transfer sizes")
    x = np.array([float(n) for n, _ in samples])
    y = np.array([s for _, s in samples])
    slope, intercept = np.polyfit(x, y, 1)
    if slope <= 0:
        raise ValueError("transfer time does not grow with size in these samples; cannot fit a bandwidth")
    if intercept < 0:
        slope = float(np.sum(x * y) / np.sum(x * x))
        intercept = 0.0
    return float(intercept), float(1.0 / slope)


def params_from_fit(steps: StepFit, transfer: tuple[float, float] | None = None,
                    base: LatencyParams | None = None) -> LatencyParams:
    base = base or LatencyParams()
    values = dict(steps.values)
    if transfer is not None:
        values["kv_overhead_s"], values["kv_bandwidth_bytes_per_s"] = transfer
    return base.with_overrides(**values)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
