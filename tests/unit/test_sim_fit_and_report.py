"""The latency fit recovers known step parameters from replayed runs; the
fleet report's hit-rate / imbalance arithmetic; the workload is seeded."""
from __future__ import annotations

import math
import random

import pytest

from splitserve.sim.fleet_report import hit_rates, imbalance, load_imbalance, percentile
from splitserve.sim.latency_fit import (ReplayRequest, fit_steps, fit_transfer, latency_observations,
                                        params_from_fit, replay)
from splitserve.sim.latency_model import LatencyParams
from splitserve.sim.workload import WorkloadSpec, build_sessions, num_requests

TRUE = LatencyParams(prefill_overhead_s=0.006, prefill_per_token_s=0.0004, decode_base_s=0.03,
                     decode_per_seq_s=0.0015, jitter=0.0)


def _requests(n: int, max_tokens: int, seed: int) -> list[ReplayRequest]:
    rng = random.Random(seed)
    return [ReplayRequest(f"r{i}", tuple(rng.randrange(16, 1000) for _ in range(rng.randint(32, 256))), max_tokens)
            for i in range(n)]


def test_fit_recovers_the_parameters_of_a_replayed_engine() -> None:
    """'Measurements' made by the latency model itself over replayed runs of
    several batch sizes: the fit must give the model back."""
    observations = []
    for n, tokens in ((1, 32), (4, 32), (16, 16), (64, 1), (32, 8)):
        trace = replay(_requests(n, tokens, n), vocab_size=1000)
        times = [TRUE.mean_step_seconds(s) for s in trace.shapes]
        finish = sorted(sum(times[: i + 1]) for i in trace.finish_step.values())
        m = len(finish)
        observations += latency_observations(f"n{n}", trace, sum(times), (finish[(m - 1) // 2] + finish[m // 2]) / 2,
                                             finish[min(m - 1, int(0.9 * m))], finish[-1])
    fit = fit_steps(observations)
    for name, value in fit.values.items():
        assert value == pytest.approx(getattr(TRUE, name), rel=1e-6), name
    assert fit.rms_relative_error < 1e-9
    overhead, bandwidth = fit_transfer([(n, 0.001 + n / 4e9) for n in (1 << 16, 1 << 20, 1 << 24)])
    assert overhead == pytest.approx(0.001) and bandwidth == pytest.approx(4e9)
    params = params_from_fit(fit, (overhead, bandwidth))
    assert params.decode_base_s == pytest.approx(0.03) and params.kv_bandwidth_bytes_per_s == pytest.approx(4e9)
    with pytest.raises(ValueError, match="two transfer sizes"):
        fit_transfer([(10, 0.1)])


def test_hit_rates_against_the_oracle() -> None:
    records = [
        {"role": "prefill", "prompt_tokens": 100, "hit_tokens": 64, "own_tokens": 64, "oracle_tokens": 96},
        {"role": "prefill", "prompt_tokens": 100, "hit_tokens": 32, "own_tokens": 0, "oracle_tokens": 0},
        {"role": "prefill", "prompt_tokens": 100, "hit_tokens": -1, "own_tokens": 0, "oracle_tokens": 96},  # failed
        {"role": "decode", "prompt_tokens": 100, "hit_tokens": 96, "own_tokens": 96, "oracle_tokens": 96},
    ]
    rates = hit_rates(records)
    assert rates["computations"] == 2 and rates["prompt_tokens"] == 200
    assert rates["hit_rate"] == pytest.approx(96 / 200)
    assert rates["oracle_rate"] == pytest.approx((96 + 32) / 200)  # never below what was served
    assert rates["vs_oracle"] == pytest.approx(96 / 128)
    assert math.isnan(hit_rates([])["hit_rate"])


def test_imbalance_and_percentiles() -> None:
    assert imbalance([1, 1, 1, 1]) == 1.0 and imbalance([2, 0, 0, 2]) == 2.0
    assert math.isnan(imbalance([0, 0]))
    pods = [{"name": "p0", "role": "prefill", "calls": {"Prefill": 3}},
            {"name": "p1", "role": "prefill", "calls": {"Prefill": 1}},
            {"name": "d0", "role": "decode", "calls": {"Decode": 5}}]
    load = {"p0": {"samples": 10, "avg_in_flight": 1.5}, "p1": {"samples": 10, "avg_in_flight": 0.5}}
    report = load_imbalance(load, pods, "prefill")
    assert report["in_flight_max_over_mean"] == 1.5 and report["requests_max_over_mean"] == 1.5
    assert percentile([5, 1, 3, 2, 4], 50) == 3 and percentile([1, 2, 3, 4], 99) == 4


def test_workload_is_seeded_and_multi_turn() -> None:
    spec = WorkloadSpec(num_tenants=20, sessions_per_s=5, duration_s=4, seed=1)
    a, b = build_sessions(spec), build_sessions(spec)
    assert a == b and num_requests(a) > len(a) > 5
    other = build_sessions(WorkloadSpec(num_tenants=20, sessions_per_s=5, duration_s=4, seed=2))
    assert [s.turns[0].prompt for s in other] != [s.turns[0].prompt for s in a]
    for session in a:
        assert [t.turn for t in session.turns] == list(range(len(session.turns)))
        for prev, turn in zip(session.turns, session.turns[1:]):
            assert turn.prompt[: len(prev.prompt)] == prev.prompt  # history is resent
        assert 1024 <= len(session.turns[0].prompt) <= 4096 + 256
    with pytest.raises(ValueError):
        WorkloadSpec(turns=(3, 1))
