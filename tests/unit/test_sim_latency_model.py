"""The sim pods' latency model: the formulas, seeded jitter, the slow
factor, the JSON file, and the step shapes SimRunner feeds it."""
from __future__ import annotations

import pytest

from splitserve.engine.engine_args import EngineArgs
from splitserve.engine.engine_core import EngineCore
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.sim_runner import SimRunner, StepShape
from splitserve.sim.latency_model import LatencyModel, LatencyParams

P = LatencyParams(prefill_overhead_s=0.004, prefill_per_token_s=0.001, decode_base_s=0.010,
                  decode_per_seq_s=0.002, kv_overhead_s=0.0005, kv_bandwidth_bytes_per_s=1e9, jitter=0.0)


def test_formulas() -> None:
    assert P.mean_step_seconds(StepShape()) == 0.0
    assert P.mean_step_seconds(StepShape(100, 1, 0)) == pytest.approx(0.004 + 0.1)
    assert P.mean_step_seconds(StepShape(0, 0, 8)) == pytest.approx(0.010 + 0.016)
    # A mixed step pays the prefill overhead once plus both variable parts.
    assert P.mean_step_seconds(StepShape(100, 2, 8)) == pytest.approx(0.004 + 0.1 + 0.016)
    assert P.mean_transfer_seconds(4_000_000) == pytest.approx(0.0005 + 0.004)


def test_jitter_is_seeded_and_bounded() -> None:
    params = LatencyParams(decode_base_s=0.01, decode_per_seq_s=0.0, jitter=0.2)
    a = [LatencyModel(params, seed=7).step_seconds(StepShape(0, 0, 1)) for _ in range(3)]
    one = LatencyModel(params, seed=7)
    b = [one.step_seconds(StepShape(0, 0, 1)) for _ in range(200)]
    assert a[0] == a[1] == a[2] == b[0]  # same seed, same first draw
    assert all(0.008 - 1e-12 <= x <= 0.012 + 1e-12 for x in b)
    assert len(set(b)) > 100  # it does vary
    other = LatencyModel(params, seed=8)
    assert [other.step_seconds(StepShape(0, 0, 1)) for _ in range(5)] != b[:5]


def test_slow_factor_scales_steps_and_transfers() -> None:
    model = LatencyModel(P, slow_factor=3.0)
    assert model.step_seconds(StepShape(0, 0, 1)) == pytest.approx(3 * 0.012)
    assert model.transfer_seconds(1_000_000) == pytest.approx(3 * 0.0015)
    with pytest.raises(ValueError, match="slow_factor"):
        LatencyModel(P, slow_factor=0)


def test_json_round_trip_and_bad_input(tmp_path) -> None:
    path = tmp_path / "lat.json"
    P.to_json(path, extra={"fit": {"note": "test"}})
    assert LatencyParams.from_json(path) == P
    assert LatencyParams.from_json(path).with_overrides(decode_base_s=0.5, jitter=None).decode_base_s == 0.5
    (tmp_path / "bad.json").write_text('{"schema": "other"}')
    with pytest.raises(ValueError, match="not a latency model file"):
        LatencyParams.from_json(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot read"):
        LatencyParams.from_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=">= 0"):
        LatencyParams(decode_base_s=-1.0)
    with pytest.raises(ValueError, match="jitter"):
        LatencyParams(jitter=1.5)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class _Recorder:
    def __init__(self, params: LatencyParams) -> None:
        self.params = params
        self.shapes: list[StepShape] = []

    def step_seconds(self, shape: StepShape) -> float:
        self.shapes.append(shape)
        return self.params.mean_step_seconds(shape)


def test_sim_runner_sleeps_the_modelled_step_time() -> None:
    """The real scheduler over SimRunner: a 40-token prompt in chunks of 16
    (prefill shapes), then one-sequence decode steps; each step sleeps
    exactly what the model says (the fake clock does not advance otherwise)."""
    clock, timer = _Clock(), _Recorder(P)
    runner = SimRunner(num_blocks=32, block_size=16, max_model_len=256, vocab_size=100,
                       eos_token_ids=frozenset(), step_timer=timer, sleep=clock.sleep, clock=clock.time)
    core = EngineCore(EngineArgs(max_num_batched_tokens=16), runner)
    core.add_request("r", list(range(1, 41)), SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    while core.has_unfinished_requests():
        core.step()
    assert timer.shapes == [StepShape(16, 1, 0), StepShape(16, 1, 0), StepShape(8, 1, 0),
                            StepShape(0, 0, 1), StepShape(0, 0, 1)]
    assert clock.sleeps == pytest.approx([P.mean_step_seconds(s) for s in timer.shapes])
    assert runner.modelled_seconds == pytest.approx(sum(clock.sleeps))
    core.check_no_leaks()
