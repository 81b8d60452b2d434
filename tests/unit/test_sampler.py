"""Sampler: greedy, position-keyed seeded draws, filters, penalties, min_tokens, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from splitserve.engine.random_keys import mix32, uniforms
from splitserve.engine.request import Request
from splitserve.engine.sampler import Sampler, build_sampling_metadata
from splitserve.engine.sampling_params import SamplingParams

V = 50
CPU = torch.device("cpu")


def _request(seed: int = 0, prompt: list[int] | None = None, outputs: list[int] = (), eos: frozenset[int] = frozenset(),
             **params: object) -> Request:
    r = Request(f"r{seed}", prompt or [1, 2, 3], SamplingParams(**params), seed=seed, eos_token_ids=eos)
    r.token_ids.extend(outputs)
    return r


def _sample(logits: torch.Tensor, requests: list[Request]):
    return Sampler()(logits, build_sampling_metadata(requests, logits.shape[-1], CPU))


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 2


def _draws(logits_row: torch.Tensor, n: int, **params: object) -> list[int]:
    """n independent draws: one request per seed, all in one batch."""
    reqs = [_request(seed=s, **params) for s in range(n)]
    return _sample(logits_row.expand(n, -1).clone(), reqs).token_ids


def test_mix32_matches_python_reference_and_stays_in_32_bits() -> None:
    def ref(x: int) -> int:
        x = (x + 0x9E3779B9) & 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & 0xFFFFFFFF
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 2**31, 2**32 - 1, 123456789, 0xDEADBEEF]
    assert mix32(torch.tensor(xs)).tolist() == [ref(x) for x in xs]
    u = uniforms(torch.tensor([2**63 - 1, 0]), torch.tensor([2**40, 0]), 1000)
    assert bool((u > 0).all() and (u < 1).all())
    assert abs(u.mean().item() - 0.5) < 0.03


def test_greedy_is_argmax() -> None:
    logits = _logits(4)
    out = _sample(logits, [_request(seed=i, temperature=0.0) for i in range(4)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 4


def test_seeded_draws_are_reproducible_and_seed_dependent() -> None:
    logits = _logits(1)[0] * 0.2  # flat: many plausible tokens
    a, b = _draws(logits, 64), _draws(logits, 64)
    assert a == b
    assert len(set(a)) > 10  # different seeds give different tokens


def test_draw_depends_only_on_seed_and_output_index() -> None:
    logits = _logits(1)[0] * 0.2
    alone = _sample(logits[None].clone(), [_request(seed=7, outputs=[4, 5])]).token_ids[0]
    others = [_request(seed=s, temperature=0.0 if s % 2 else 0.7) for s in range(5)]
    batch = others[:3] + [_request(seed=7, outputs=[4, 5])] + others[3:]
    in_batch = _sample(logits.expand(6, -1).clone(), batch).token_ids[3]
    assert in_batch == alone
    # The output index moves the draw: over many positions the token changes.
    per_position = {_sample(logits[None].clone(), [_request(seed=7, outputs=[0] * i)]).token_ids[0]
                    for i in range(40)}
    assert len(per_position) > 5


def test_samples_follow_the_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4))
    draws = _draws(logits, 2000)
    probs = torch.softmax(logits, -1)[:4]
    freq = torch.bincount(torch.tensor(draws), minlength=V)[:4].float() / len(draws)
    assert set(draws) <= {0, 1, 2, 3}
    torch.testing.assert_close(freq, probs, atol=0.04, rtol=0)
    hot = _draws(logits, 2000, temperature=2.0)
    assert torch.bincount(torch.tensor(hot), minlength=V)[0] / 2000 < freq[0] - 0.1


@pytest.mark.parametrize("params, allowed", [
    ({"top_k": 3}, {0, 1, 2}),
    ({"top_p": 0.6}, {0, 1}),  # p = .46, .30, .14, ...: the nucleus reaching .6 is {0, 1}
    ({"min_p": 0.5}, {0, 1}),  # >= half the top probability
    ({"top_p": 0.5}, {0, 1}),
    ({"top_k": 3, "top_p": 0.5}, {0}),  # renormalised over the top 3, token 0 alone is .51
])
def test_filters_restrict_the_support(params: dict, allowed: set[int]) -> None:
    logits = torch.log(torch.tensor([0.46, 0.30, 0.14, 0.06, 0.04] + [1e-9] * (V - 5)))
    draws = set(_draws(logits, 300, **params))
    assert draws == allowed


def test_repetition_penalty_covers_prompt_and_output() -> None:
    logits = torch.zeros(1, V)
    logits[0, 5], logits[0, 6], logits[0, 7], logits[0, 8] = 3.0, 2.9, -1.0, 2.8
    # 5 is in the prompt, 6 in the output: both get divided; 8 is untouched and wins.
    r = _request(prompt=[5, 7], outputs=[6], temperature=0.0, repetition_penalty=2.0)
    assert _sample(logits.clone(), [r]).token_ids == [8]
    no_penalty = _request(prompt=[5, 7], outputs=[6], temperature=0.0)
    assert _sample(logits.clone(), [no_penalty]).token_ids == [5]


def test_presence_and_frequency_apply_to_output_tokens_only() -> None:
    logits = torch.zeros(1, V)
    logits[0, 5], logits[0, 6], logits[0, 7] = 3.0, 2.5, 2.0
    prompt_only = _request(prompt=[5], temperature=0.0, presence_penalty=2.0)
    assert _sample(logits.clone(), [prompt_only]).token_ids == [5]
    presence = _request(prompt=[1], outputs=[5], temperature=0.0, presence_penalty=1.0)
    assert _sample(logits.clone(), [presence]).token_ids == [6]
    # frequency scales with the count: 5 seen 3x (3 - 0.6*3 = 1.2), 6 once (2.5 - 0.6 = 1.9), 7 never.
    freq = _request(prompt=[1], outputs=[5, 5, 5, 6], temperature=0.0, frequency_penalty=0.6)
    assert _sample(logits.clone(), [freq]).token_ids == [7]


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.zeros(1, V)
    logits[0, 2], logits[0, 9], logits[0, 4] = 5.0, 4.0, 1.0
    params = dict(temperature=0.0, min_tokens=2, stop_token_ids=[9])
    early = _request(outputs=[4], eos=frozenset({2}), **params)
    assert _sample(logits.clone(), [early]).token_ids == [4]
    done = _request(outputs=[4, 4], eos=frozenset({2}), **params)
    assert _sample(logits.clone(), [done]).token_ids == [2]
    ignore = _request(outputs=[4], eos=frozenset({2}), ignore_eos=True, **params)
    assert _sample(logits.clone(), [ignore]).token_ids == [2]


def test_logprobs_are_raw_with_ranks_and_top_alternatives() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0] + [-50.0] * (V - 4)])
    # Greedy under a repetition penalty picks token 2, the raw distribution's rank 2.
    r = _request(prompt=[1], temperature=0.0, repetition_penalty=10.0, logprobs=3)
    out = _sample(logits.clone(), [r])
    raw = torch.log_softmax(logits[0], -1)
    lp = out.logprobs[0]
    assert out.token_ids == [2] and lp.token_id == 2 and lp.rank == 2
    assert math.isclose(lp.logprob, raw[2].item(), rel_tol=1e-6)
    assert lp.top_token_ids == (1, 2, 0)
    assert lp.top_logprobs == pytest.approx(raw[[1, 2, 0]].tolist())
    zero = _sample(logits.clone(), [_request(temperature=0.0, logprobs=0), _request(temperature=0.0)])
    assert zero.logprobs[0].top_token_ids == () and zero.logprobs[0].rank == 1 and zero.logprobs[1] is None


# -- constrained rows (structured outputs) ----------------------------------

def _bitmask(rows: list[int], allowed: list[set[int]]):
    from splitserve.engine.structured.bitmask import TokenBitmask

    bits = torch.zeros(len(rows), (V + 31) // 32, dtype=torch.int64)
    for i, tokens in enumerate(allowed):
        for t in tokens:
            bits[i, t // 32] |= 1 << (t % 32)
    return TokenBitmask(torch.tensor(rows), bits.to(torch.int32))


def _sample_masked(logits: torch.Tensor, requests: list[Request], rows: list[int], allowed: list[set[int]]):
    metadata = build_sampling_metadata(requests, V, CPU, _bitmask(rows, allowed))
    return Sampler()(logits, metadata)


def test_constrained_rows_sample_only_allowed_tokens_before_every_filter() -> None:
    logits = _logits(3, seed=3)
    allowed = {4, 17, 31, 32, 49}
    reqs = [_request(seed=0, temperature=0.0), _request(seed=1, temperature=0.0), _request(seed=2, temperature=0.0)]
    out = _sample_masked(logits.clone(), reqs, [1], [allowed])
    best_allowed = max(allowed, key=lambda t: float(logits[1, t]))
    assert out.token_ids[0] == int(logits[0].argmax()) and out.token_ids[2] == int(logits[2].argmax())
    assert out.token_ids[1] == best_allowed
    # Sampled with top-k / top-p / penalties: every draw allowed, still position-keyed.
    row = logits[0] * 0.2
    params = dict(temperature=1.0, top_k=3, top_p=0.9, presence_penalty=0.5)
    draws = [_sample_masked(row[None].clone(), [_request(seed=s, outputs=[4], **params)], [0], [allowed]).token_ids[0]
             for s in range(40)]
    assert set(draws) <= allowed and len(set(draws)) > 1
    again = [_sample_masked(row[None].clone(), [_request(seed=s, outputs=[4], **params)], [0], [allowed]).token_ids[0]
             for s in range(40)]
    assert again == draws


def test_constrained_logprobs_are_over_the_allowed_tokens() -> None:
    logits = _logits(1, seed=4)
    allowed = {2, 9, 30}
    out = _sample_masked(logits.clone(), [_request(temperature=0.0, logprobs=5)], [0], [allowed])
    lp = out.logprobs[0]
    assert lp is not None and lp.rank == 1 and lp.token_id in allowed
    finite = [v for v in lp.top_logprobs if math.isfinite(v)]
    assert set(lp.top_token_ids[:3]) == allowed and len(finite) == 3
    assert math.isclose(sum(math.exp(v) for v in finite), 1.0, rel_tol=1e-5)


def test_min_tokens_never_empties_a_constrained_row() -> None:
    eos = frozenset({7})
    logits = _logits(2, seed=5)
    reqs = [_request(seed=0, temperature=0.0, min_tokens=3, eos=eos), _request(seed=1, temperature=0.0, min_tokens=3, eos=eos)]
    # Row 0's constraint allows eos and 11: min_tokens bans eos. Row 1's allows only eos: the constraint wins.
    out = _sample_masked(logits.clone(), reqs, [0, 1], [{7, 11}, {7}])
    assert out.token_ids == [11, 7]
