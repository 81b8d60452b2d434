"""Prompt logprobs (``SamplingParams.prompt_logprobs``) against transformers:
for each prompt token after the first, the logprob given the tokens before
it equals log_softmax of transformers' logits (fp32, 1e-4), and the rank and
top-k ids equal -- in one chunk, over chunked prefill, next to a request
without them, under preemption, and after the same prompt filled the prefix
cache (hits are skipped for such a request). Each scenario ends with a leak check."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitserve.engine import LLM, SamplingParams
from splitserve.engine.errors import InvalidRequestError

TOP_K = 3
BASE_ARGS = dict(device="cpu", block_size=8, max_model_len=128, num_gpu_blocks_override=64)


@pytest.fixture(scope="module")
def hf_logprobs(tiny_checkpoints: dict):
    """log_softmax of transformers' fp32 logits over a prompt: [len, vocab]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoints["llama"]), dtype=torch.float32)

    def run(prompt: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            logits = model(ids, attention_mask=torch.ones_like(ids)).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    return run


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 288, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _check(entries: list, prompt: list[int], reference: torch.Tensor) -> None:
    assert entries[0] is None and len(entries) == len(prompt)
    for i in range(1, len(prompt)):
        entry, row = entries[i], reference[i - 1]
        assert entry.token_id == prompt[i]
        assert entry.logprob == pytest.approx(float(row[prompt[i]]), abs=1e-4), f"position {i}"
        assert entry.rank == int((row > row[prompt[i]]).sum()) + 1, f"position {i}"
        top = row.topk(TOP_K)
        assert list(entry.top_token_ids) == top.indices.tolist(), f"position {i}"
        assert list(entry.top_logprobs) == pytest.approx(top.values.tolist(), abs=1e-4)


def _llm(path: Path, **overrides: object) -> LLM:
    return LLM(str(path), **{**BASE_ARGS, **overrides})


@pytest.mark.parametrize("budget", [256, 8])
def test_prompt_logprobs_equal_transformers(tiny_checkpoints: dict, hf_logprobs, budget: int) -> None:
    """``budget`` 8 splits the 37-token prompt into five chunks."""
    llm = _llm(tiny_checkpoints["llama"], max_num_batched_tokens=budget)
    prompt, other = _prompt(1, 37), _prompt(2, 11)
    asked = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=TOP_K)
    plain = SamplingParams(temperature=0.0, max_tokens=2)
    out = llm.generate([{"prompt_token_ids": prompt}, {"prompt_token_ids": other}], [asked, plain])
    _check(out[0].prompt_logprobs, prompt, hf_logprobs(prompt))
    assert out[1].prompt_logprobs is None
    llm.engine_core.check_no_leaks()


def test_prompt_logprobs_survive_preemption(tiny_checkpoints: dict, hf_logprobs) -> None:
    # Each request needs up to ceil((30 + 12) / 8) = 6 blocks; 4 at once need 24; the pool has 16,
    # and the 8-token budget chunks the prompts, so some are preempted in the middle of theirs.
    llm = _llm(tiny_checkpoints["llama"], num_gpu_blocks_override=16, max_num_batched_tokens=8)
    prompts = [_prompt(10 + i, n) for i, n in enumerate((30, 28, 26, 24))]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, prompt_logprobs=TOP_K)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert llm.engine_core.stats().scheduler.num_preemptions > 0
    for out, prompt in zip(outs, prompts):
        _check(out.prompt_logprobs, prompt, hf_logprobs(prompt))
    llm.engine_core.check_no_leaks()


def test_prompt_logprobs_skip_prefix_cache_hits(tiny_checkpoints: dict, hf_logprobs) -> None:
    llm = _llm(tiny_checkpoints["llama"])
    prompt = _prompt(3, 30)
    first = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1))
    again = llm.generate({"prompt_token_ids": prompt},
                         SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=TOP_K))
    assert first[0].prompt_logprobs is None
    assert again[0].num_cached_tokens == 0
    _check(again[0].prompt_logprobs, prompt, hf_logprobs(prompt))
    llm.engine_core.check_no_leaks()


def test_prompt_logprobs_zero_gives_the_prompt_token_only(tiny_checkpoints: dict, hf_logprobs) -> None:
    llm = _llm(tiny_checkpoints["llama"])
    prompt = _prompt(4, 9)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1,
                                                                    prompt_logprobs=0))
    entries = out[0].prompt_logprobs
    reference = hf_logprobs(prompt)
    assert all(e.top_token_ids == () for e in entries[1:])
    assert [e.logprob for e in entries[1:]] == pytest.approx(
        [float(reference[i - 1, prompt[i]]) for i in range(1, len(prompt))], abs=1e-4)


@pytest.mark.parametrize("value", [-1, 21, 1.5])
def test_bad_prompt_logprobs_are_refused(value: object) -> None:
    with pytest.raises(InvalidRequestError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)  # type: ignore[arg-type]


def test_simulated_pods_give_placeholder_prompt_logprobs_for_every_token() -> None:
    """``SimRunner`` (the simulated pods' runner, a double of the model) over
    chunked prefill: one placeholder per prompt token after the first."""
    from splitserve.engine.engine_args import EngineArgs
    from splitserve.engine.engine_core import EngineCore
    from splitserve.engine.sim_runner import SimRunner

    class NoTime:
        def step_seconds(self, shape: object) -> float:
            return 0.0

    runner = SimRunner(num_blocks=32, block_size=4, max_model_len=128, vocab_size=50,
                       eos_token_ids=frozenset(), step_timer=NoTime())
    core = EngineCore(EngineArgs.from_kwargs(max_num_batched_tokens=5), runner)
    prompt = list(range(1, 14))
    core.add_request("a", prompt, SamplingParams(max_tokens=2, prompt_logprobs=1))
    outs = []
    while core.has_unfinished_requests():
        outs += core.step()
    (entries,) = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    assert entries[0] is None and [e.token_id for e in entries[1:]] == prompt[1:]
    core.check_no_leaks()
