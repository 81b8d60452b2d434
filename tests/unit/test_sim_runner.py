"""SimRunner's tokens: a deterministic function of (context, seed, position),
so runs agree unified, split prefill -> decode, after preemption and with
``sim_tokens`` computed outside any engine. (SimRunner is itself the test
double of a model: no weights, no KV.)"""
from __future__ import annotations

from splitserve.engine.engine_args import EngineArgs
from splitserve.engine.engine_core import EngineCore
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.sim_runner import SimRunner, StepShape, sim_tokens

VOCAB = 97


class _NoTime:
    def step_seconds(self, shape: StepShape) -> float:
        return 0.0


def _core(num_blocks: int = 64, **kwargs: object) -> EngineCore:
    runner = SimRunner(num_blocks=num_blocks, block_size=4, max_model_len=512, vocab_size=VOCAB,
                       eos_token_ids=frozenset(), step_timer=_NoTime())
    return EngineCore(EngineArgs.from_kwargs(**kwargs), runner)


def _run(core: EngineCore) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while core.has_unfinished_requests():
        for o in core.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


def _params(**kwargs: object) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 12, "ignore_eos": True, **kwargs})


PROMPTS = {f"r{i}": [(7 * i + j) % 90 + 1 for j in range(5 + 9 * i)] for i in range(6)}


def test_unified_equals_sim_tokens_and_ignores_greedy_seeds() -> None:
    core = _core()
    for rid, prompt in PROMPTS.items():
        core.add_request(rid, prompt, _params(seed=hash(rid) % 1000))
    outputs = _run(core)
    for rid, prompt in PROMPTS.items():
        assert outputs[rid] == sim_tokens(prompt, 12, VOCAB)
    core.check_no_leaks()


def test_sampled_requests_follow_their_seed() -> None:
    core = _core()
    core.add_request("a", PROMPTS["r1"], _params(temperature=1.0, seed=1))
    core.add_request("b", PROMPTS["r1"], _params(temperature=1.0, seed=2))
    core.add_request("c", PROMPTS["r1"], _params(temperature=1.0, seed=1))
    out = _run(core)
    assert out["a"] == out["c"] == sim_tokens(PROMPTS["r1"], 12, VOCAB, seed=1)
    assert out["a"] != out["b"]


def test_split_prefill_then_decode_and_failover_continue_the_same_stream() -> None:
    prompt = PROMPTS["r3"]
    expected = sim_tokens(prompt, 12, VOCAB)
    prefill = _core()
    prefill.add_request("x", prompt, _params(), prefill_only=True)
    first = _run(prefill)["x"]
    assert first == expected[:1]
    assert prefill.release_held_blocks("x")
    # The decode side gets prompt + token 0 (and, after a failover, + more).
    for done in (1, 5):
        decode = _core()
        decode.add_request("x", prompt, _params(), output_token_ids=expected[:done])
        assert expected[:done] + _run(decode)["x"] == expected
        decode.check_no_leaks()
    prefill.check_no_leaks()


def test_preemption_by_recompute_keeps_the_tokens() -> None:
    core = _core(num_blocks=20, max_num_seqs=4)
    for rid in ("r3", "r4", "r5"):
        core.add_request(rid, PROMPTS[rid], _params(max_tokens=10))
    out = _run(core)
    assert core.scheduler.num_preemptions > 0
    for rid in ("r3", "r4", "r5"):
        assert out[rid] == sim_tokens(PROMPTS[rid], 10, VOCAB)
    core.check_no_leaks()
