"""EngineCore and the offline LLM API on the fake runner."""
from __future__ import annotations

import pytest
from test_scheduler_fakes import make_core, next_token

from splitserve.engine import SamplingParams
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.llm import LLM, child_seed

VOCAB = 50


def reference(prompt: list[int], seed: int, n: int) -> list[int]:
    context, out = list(prompt), []
    for i in range(n):
        out.append(next_token(context, seed, i, VOCAB))
        context.append(out[-1])
    return out


class ToyTokenizer:
    """Characters <-> ids modulo the vocab; enough for the text plumbing."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(65 + i % 26) for i in ids)


def test_generate_token_prompts_and_text() -> None:
    core = make_core()
    llm = LLM.from_engine_core(core, ToyTokenizer())
    params = SamplingParams(seed=5, max_tokens=4, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": [1, 2, 3]}, "hello"], params)
    assert [o.prompt for o in outs] == [None, "hello"]
    assert outs[1].prompt_token_ids == ToyTokenizer().encode("hello")
    first = outs[0].outputs[0]
    assert first.token_ids == reference([1, 2, 3], 5, 4)
    assert first.text == ToyTokenizer().decode(first.token_ids)
    assert first.finish_reason == "length" and outs[0].finished
    assert len(first.logprobs) == 4 and first.cumulative_logprob == pytest.approx(-2.0)
    assert llm.get_tokenizer() is not None
    core.check_no_leaks()


def test_n_fans_out_with_derived_seeds() -> None:
    core = make_core()
    llm = LLM.from_engine_core(core)
    (out,) = llm.generate({"prompt_token_ids": [4, 5, 6]}, SamplingParams(n=3, seed=11, max_tokens=5))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert c.token_ids == reference([4, 5, 6], child_seed(11, c.index), 5)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    assert child_seed(11, 0) == 11 and child_seed(11, 2) == child_seed(11, 2) != child_seed(12, 2)
    core.check_no_leaks()


def test_unseeded_requests_are_reproducible_per_engine_seed() -> None:
    def run(seed: int) -> list[list[int]]:
        llm = LLM.from_engine_core(make_core(seed=seed))
        outs = llm.generate([{"prompt_token_ids": [1, 2]}] * 2, SamplingParams(max_tokens=6))
        return [o.outputs[0].token_ids for o in outs]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_bad_prompt_raises_and_leaves_nothing_queued() -> None:
    core = make_core(max_model_len=16)
    llm = LLM.from_engine_core(core)
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        llm.generate([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": list(range(20))}])
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        llm.generate("text without a tokenizer")
    with pytest.raises(InvalidRequestError, match="one per prompt"):
        llm.generate([{"prompt_token_ids": [1]}], [SamplingParams(), SamplingParams()])
    assert not core.scheduler.requests
    core.check_no_leaks()
    (out,) = llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(seed=1, max_tokens=3))
    assert out.outputs[0].token_ids == reference([1, 2], 1, 3)
    core.check_no_leaks()


def test_stats_snapshot_counts() -> None:
    core = make_core(num_blocks=10, max_model_len=64)
    llm = LLM.from_engine_core(core)
    prompts = [{"prompt_token_ids": [i, 1, 2, 3, 4, 5, 6, 7, 8]} for i in range(4)]
    llm.generate(prompts, SamplingParams(seed=1, max_tokens=12))
    stats = core.stats()
    assert stats.prompt_tokens_total == 36 and stats.generation_tokens_total == 48
    assert stats.num_finished_requests == 4 and stats.num_steps > 0
    assert stats.scheduler.num_preemptions > 0
    assert stats.scheduler.kv_cache_usage == 0.0 and stats.scheduler.num_free_blocks == 10
    core.check_no_leaks()
