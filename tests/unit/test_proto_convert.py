from __future__ import annotations

import pytest

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.request import TokenLogprobs
from splitserve.engine.sampling_params import SamplingParams
from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.pod.proto_convert import (
    finish_reason_from_proto,
    finish_reason_to_proto,
    logprobs_from_proto,
    logprobs_to_proto,
    sampling_from_proto,
    sampling_to_proto,
)


def test_sampling_params_round_trip() -> None:
    params = SamplingParams(
        n=2, max_tokens=33, min_tokens=3, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05,
        seed=2**40 + 3, presence_penalty=0.5, frequency_penalty=-0.25, repetition_penalty=1.1,
        stop_token_ids=[5, 9], ignore_eos=True, logprobs=3, prompt_logprobs=0,
    )
    back = sampling_from_proto(sampling_to_proto(params))
    assert back == params


def test_unset_optionals_stay_unset() -> None:
    params = SamplingParams(max_tokens=None, seed=None, logprobs=None, temperature=0.0)
    back = sampling_from_proto(sampling_to_proto(params))
    assert back.max_tokens is None and back.seed is None and back.logprobs is None
    assert back.prompt_logprobs is None
    assert back.is_greedy


def test_bad_values_from_the_wire_raise_invalid_request() -> None:
    message = sampling_to_proto(SamplingParams())
    message.top_p = 0.0
    with pytest.raises(InvalidRequestError, match="top_p"):
        sampling_from_proto(message)


def test_logprobs_and_finish_reason_round_trip() -> None:
    lp = TokenLogprobs(token_id=4, logprob=-0.5, rank=2, top_token_ids=(1, 4), top_logprobs=(-0.25, -0.5))
    assert logprobs_from_proto(logprobs_to_proto(lp)) == lp
    for reason in ("stop", "length", "abort", None):
        assert finish_reason_from_proto(finish_reason_to_proto(reason)) == reason
    assert finish_reason_to_proto(None) == pb.FINISH_REASON_UNSPECIFIED


def test_for_choice_copies_with_one_choice_and_a_checked_seed() -> None:
    params = SamplingParams(n=3, temperature=0.7, max_tokens=5, stop_token_ids=[7], seed=None)
    choice = params.for_choice(42)
    assert (choice.n, choice.seed, choice.temperature, choice.max_tokens) == (1, 42, 0.7, 5)
    assert (params.n, params.seed) == (3, None)
    choice.stop_token_ids.append(8)
    assert params.stop_token_ids == [7]
    assert params.for_choice(None).seed is None
    for bad in (-1, 2**63, True, 1.5):
        with pytest.raises(InvalidRequestError, match="seed"):
            params.for_choice(bad)  # type: ignore[arg-type]
