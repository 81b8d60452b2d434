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


def _hf_runner(paths: dict[str, Path]):
    """transformers' greedy continuation of a prompt (fp32, CPU), memoised per (family, prompt)."""
    memo: dict[tuple[str, tuple[int, ...]], list[int]] = {}

    def run(family: str, prompt: list[int]) -> list[int]:
        key = (family, tuple(prompt))
        if key not in memo:
            ids = torch.tensor([prompt])
            # An explicit mask: transformers would otherwise mask prompt tokens equal to pad.
            out = _hf_model(paths[family]).generate(ids, attention_mask=torch.ones_like(ids),
                                                     max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None)
            memo[key] = out[0, len(prompt):].tolist()
        return memo[key]

    return run


def _hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_greedy(tiny_checkpoints: dict):
    return _hf_runner(tiny_checkpoints)


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


# On CUDA with the Triton kernels (marker gpu; bench/gpu_check.sh runs these). The
# kernels take head_dim 64-128, so these checkpoints override the tiny head_dim.
TRITON_FAMILIES = ["llama", "qwen2"]
CUDA_ARGS = dict(device="cuda", attention_backend="triton", block_size=16, max_model_len=128,
                 num_gpu_blocks_override=64)
# bf16: each generated token's fp32 logit lies within this fraction of that
# step's logit range below the fp32 maximum (a near-tie may flip; nothing worse).
BF16_LOGIT_TOLERANCE = 0.02
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def on_cuda_triton(test):
    """Marker gpu, skipped without CUDA, once per Triton-shaped family."""
    return pytest.mark.gpu(needs_cuda(pytest.mark.parametrize("family", TRITON_FAMILIES)(test)))


@pytest.fixture(scope="module")
def triton_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import checkpoints

    root = tmp_path_factory.mktemp("triton-checkpoints")
    return {name: getattr(checkpoints, name)(root / name, head_dim=64) for name in TRITON_FAMILIES}


def _cuda_llm(paths: dict, family: str, dtype: str) -> LLM:
    return LLM(str(paths[family]), dtype=dtype, **CUDA_ARGS)


@on_cuda_triton
def test_cuda_triton_fp32_greedy_is_token_identical(triton_checkpoints: dict, family: str) -> None:
    llm = _cuda_llm(triton_checkpoints, family, "float32")
    prompts = _prompts(6, (1, 9, 40, 77))
    shared = _prompts(7, (37,))[0]
    prompts += _prompts(8, (3, 20), prefix=shared)  # prefix-cache hits on the second pass
    run = _hf_runner(triton_checkpoints)
    first = _generate(llm, prompts)
    _assert_matches(family, run, prompts, first)
    assert _generate(llm, prompts) == first
    llm.engine_core.check_no_leaks()


@on_cuda_triton
def test_cuda_triton_bf16_greedy_within_logit_tolerance(triton_checkpoints: dict, family: str) -> None:
    llm = _cuda_llm(triton_checkpoints, family, "bfloat16")
    prompts = _prompts(9, (1, 9, 40, 77))
    model = _hf_model(triton_checkpoints[family])
    for prompt, tokens in zip(prompts, _generate(llm, prompts)):
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1]  # the logits each generated token was chosen from
        top, low = logits.max(-1).values, logits.min(-1).values
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        gap = (top - chosen) / (top - low)
        assert len(tokens) == MAX_TOKENS
        assert gap.max().item() <= BF16_LOGIT_TOLERANCE, f"{family} prompt len {len(prompt)}: gaps {gap.tolist()}"
    llm.engine_core.check_no_leaks()
