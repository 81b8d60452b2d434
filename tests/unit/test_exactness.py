"""The correctness oracle (DESIGN.md section 3): greedy token ids equal
transformers ``generate`` for the same checkpoint -- plain, with prefix-cache
hits, with chunked prefill and under forced preemption -- and seeded sampling
is reproducible. Every scenario ends with a leak check."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitserve.engine import LLM, SamplingParams

FAMILIES = ["llama", "qwen2", "mistral"]
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
BASE_ARGS = dict(device="cpu", block_size=8, max_model_len=128)
# ``cpu``: the C kernel for decode rows and short chunks; ``torch``: the pure-torch path.
BACKENDS = ["cpu", "torch"]


def _prompts(seed: int, lengths: tuple[int, ...], prefix: list[int] | None = None) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    head = prefix or []
    return [head + torch.randint(0, 288, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def hf_greedy(tiny_checkpoints: dict):
    """transformers' greedy continuation of a prompt, memoised per (family, prompt)."""
    from transformers import AutoModelForCausalLM

    models: dict[str, object] = {}
    memo: dict[tuple[str, tuple[int, ...]], list[int]] = {}

    def run(family: str, prompt: list[int]) -> list[int]:
        key = (family, tuple(prompt))
        if key not in memo:
            if family not in models:
                models[family] = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoints[family]),
                                                                      dtype=torch.float32)
            ids = torch.tensor([prompt])
            # An explicit mask: transformers would otherwise mask prompt tokens equal to pad.
            out = models[family].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                          do_sample=False, eos_token_id=None)
            memo[key] = out[0, len(prompt):].tolist()
        return memo[key]

    return run


def _generate(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs]


def _llm(path: Path, **overrides: object) -> LLM:
    return LLM(str(path), **{**BASE_ARGS, "num_gpu_blocks_override": 128, **overrides})


def _assert_matches(family: str, hf_greedy, prompts: list[list[int]], got: list[list[int]]) -> None:
    for i, (prompt, tokens) in enumerate(zip(prompts, got)):
        assert tokens == hf_greedy(family, prompt), f"{family} prompt {i} (len {len(prompt)})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_plain_and_with_prefix_hits(tiny_checkpoints: dict, hf_greedy,
                                                               family: str, backend: str) -> None:
    llm = _llm(tiny_checkpoints[family], attention_backend=backend)
    prompts = _prompts(0, (1, 7, 19, 42))
    _assert_matches(family, hf_greedy, prompts, _generate(llm, prompts))
    # A shared 37-token prefix (4 full blocks + 5): second run hits the cache.
    shared = _prompts(1, (37,))[0]
    prefixed = _prompts(2, (3, 11, 20), prefix=shared)
    first = _generate(llm, prefixed)
    hits_before = llm.engine_core.stats().scheduler.prefix_cache_hits
    second = _generate(llm, prefixed)
    assert llm.engine_core.stats().scheduler.prefix_cache_hits > hits_before
    assert first == second
    _assert_matches(family, hf_greedy, prefixed, second)
    llm.engine_core.check_no_leaks()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_with_chunked_prefill(tiny_checkpoints: dict, hf_greedy,
                                                         family: str, backend: str) -> None:
    llm = _llm(tiny_checkpoints[family], max_num_batched_tokens=16, attention_backend=backend)
    prompts = _prompts(3, (50, 5, 33))
    _assert_matches(family, hf_greedy, prompts, _generate(llm, prompts))
    assert llm.engine_core.stats().num_steps > (50 + 5 + 33) // 16
    llm.engine_core.check_no_leaks()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_under_preemption(tiny_checkpoints: dict, hf_greedy, family: str,
                                                     backend: str) -> None:
    # Each request needs up to ceil((30 + 12) / 8) = 6 blocks; 4 at once need 24; the pool has 16.
    llm = _llm(tiny_checkpoints[family], num_gpu_blocks_override=16, attention_backend=backend)
    prompts = _prompts(4, (30, 28, 26, 24))
    _assert_matches(family, hf_greedy, prompts, _generate(llm, prompts))
    assert llm.engine_core.stats().scheduler.num_preemptions > 0
    llm.engine_core.check_no_leaks()


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_checkpoints: dict) -> None:
    llm = _llm(tiny_checkpoints["llama"])
    prompts = _prompts(5, (9, 17))

    def params(seed: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, top_p=0.95, max_tokens=MAX_TOKENS, ignore_eos=True, seed=seed)

    a = _generate(llm, prompts, params(1234))
    b = _generate(llm, prompts, params(1234))
    assert a == b
    assert _generate(llm, prompts, params(99)) != a
    # Position-keyed: a prompt alone, in another batch, and after preemption gives the same tokens.
    assert _generate(llm, prompts[1:], params(1234)) == a[1:]
    small = _llm(tiny_checkpoints["llama"], num_gpu_blocks_override=16)
    assert _generate(small, prompts * 3, params(1234)) == a * 3
    assert small.engine_core.stats().scheduler.num_preemptions > 0
    llm.engine_core.check_no_leaks()
    small.engine_core.check_no_leaks()
