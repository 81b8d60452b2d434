"""SIGTERM drain of each pod role, through ``PodCore`` with real tiny engines
on a FakeTransport (the NIXL double of pod_fixtures): a draining prefill pod
refuses Prefill but serves the leases it granted until released or expired;
a draining decode pod lets streams run for the grace, then ends the rest with
UNAVAILABLE, and the stream continued on another pod is token-exact. Every
test ends with no block used and no lease held."""
from __future__ import annotations

import asyncio
import threading

import pytest
import pytest_asyncio
import torch

from pod_fixtures import GREEDY, Cluster, collect, disaggregated, wait_clean
from splitserve.engine.sampling_params import SamplingParams
from splitserve.pod.core import PodCore
from splitserve.pod.messages import DecodeChunk, DecodeFinished, KVSource, PodError, Role

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

LONG_GREEDY = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
LONG_SEEDED = SamplingParams(temperature=0.9, seed=11, max_tokens=96, ignore_eos=True)


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 288, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest_asyncio.fixture
async def cluster(tiny_checkpoints: dict):
    c = Cluster(tiny_checkpoints["llama"])
    yield c
    await c.close()


async def _refused(call) -> str:
    with pytest.raises(PodError) as info:
        await call
    return info.value.code


async def test_draining_prefill_pod_serves_a_granted_lease_until_it_is_released(cluster: Cluster) -> None:
    prefill = await cluster.pod(Role.PREFILL, "p:1")
    decode = await cluster.pod(Role.DECODE, "d:1")
    prompt = _prompt(1, 21)
    want, _ = await disaggregated(prefill, decode, "reference", prompt)
    granted = await prefill.prefill("granted", prompt, GREEDY)
    assert granted.kv_handle is not None and prefill.load().num_leased_blocks == 3

    drain = asyncio.create_task(prefill.drain(grace_seconds=5.0))
    await asyncio.sleep(0.2)
    assert await _refused(prefill.prefill("late", prompt, GREEDY)) == "UNAVAILABLE"
    assert not drain.done(), "the drain must wait for the granted lease"

    # The decoder claims and READs the lease of the draining pod as usual.
    rest, finished = await collect(decode, "granted", prompt + [granted.first_token_id], GREEDY,
                                   num_prompt_tokens=len(prompt), kv_handle=granted.kv_handle)
    assert finished.kv_source is KVSource.PULLED
    assert [granted.first_token_id] + rest == want
    await asyncio.wait_for(drain, 5)  # released: the drain ends at once, long before the lease TTL
    assert prefill.prefill_handler.leases.counters.expired == 0
    await wait_clean(prefill, decode)


async def test_draining_prefill_pod_ends_when_an_unclaimed_lease_expires(cluster: Cluster) -> None:
    prefill = await cluster.pod(Role.PREFILL, "p:1", kv_lease_seconds=0.5)
    granted = await prefill.prefill("lonely", _prompt(2, 20), GREEDY)
    assert granted.kv_handle is not None
    drain = asyncio.create_task(prefill.drain(grace_seconds=5.0))
    await asyncio.sleep(0.1)
    assert not drain.done()
    await asyncio.wait_for(drain, 5)
    assert prefill.prefill_handler.leases.counters.expired == 1
    assert await _refused(prefill.prefill("late", _prompt(2, 20), GREEDY)) == "UNAVAILABLE"
    await wait_clean(prefill)


async def test_draining_prefill_pod_ends_a_prefill_past_the_grace_with_unavailable(cluster: Cluster) -> None:
    prefill = await cluster.pod(Role.PREFILL, "p:1")
    gate = threading.Event()  # holds the engine thread inside its step: the prefill outlasts the grace
    real_step = prefill.engine.core.step
    prefill.engine.core.step = lambda: (gate.wait(10), real_step())[1]
    try:
        task = asyncio.create_task(prefill.prefill("slow", _prompt(3, 20), GREEDY))
        while "slow" not in prefill._active:
            await asyncio.sleep(0.005)
        drain = asyncio.create_task(prefill.drain(grace_seconds=0.2))
        await asyncio.sleep(0.4)
        assert not task.done()
    finally:
        gate.set()
    assert await _refused(task) == "UNAVAILABLE"  # not a finished result: the router retries it
    await asyncio.wait_for(drain, 5)
    await wait_clean(prefill)


async def _stream_until_drained(core: PodCore, request_id: str, prompt: list[int],
                                params: SamplingParams, grace_seconds: float) -> tuple[list[int], str]:
    """Decode on ``core``; after the first chunk start its drain. Returns the
    tokens streamed and the code the stream ended with ("finished:<reason>")."""
    tokens: list[int] = []
    drain: asyncio.Task | None = None
    outcome = ""
    try:
        async for event in core.decode(request_id, prompt, 0, params):
            if isinstance(event, DecodeChunk):
                tokens += event.token_ids
                if drain is None:
                    drain = asyncio.create_task(core.drain(grace_seconds))
            elif isinstance(event, DecodeFinished):
                outcome = f"finished:{event.reason}"
    except PodError as exc:
        outcome = exc.code
    assert drain is not None
    await asyncio.wait_for(drain, 10)
    return tokens, outcome


@pytest.mark.parametrize("params", [LONG_GREEDY, LONG_SEEDED], ids=["greedy", "seeded"])
async def test_draining_decode_pod_hands_back_unavailable_and_the_continuation_is_exact(
        cluster: Cluster, params: SamplingParams) -> None:
    leaving = await cluster.pod(Role.DECODE, "d:1")
    staying = await cluster.pod(Role.DECODE, "d:2")
    prompt = _prompt(4, 12)
    want, _ = await collect(staying, "reference", prompt, params)
    assert len(want) == params.max_tokens

    got, outcome = await _stream_until_drained(leaving, "r", prompt, params, grace_seconds=0.0)
    assert outcome == "UNAVAILABLE", "a stream cut by the drain must not look finished"
    assert 0 < len(got) < len(want) and got == want[:len(got)]
    assert await _refused(collect(leaving, "late", prompt, params)) == "UNAVAILABLE"
    # What the router's mid-stream failover sends: prompt + tokens so far, to another pod.
    rest, finished = await collect(staying, "r", prompt + got, params, num_prompt_tokens=len(prompt))
    assert got + rest == want and finished.reason == "length"
    await wait_clean(leaving, staying)


async def test_draining_decode_pod_lets_a_stream_finish_within_the_grace(cluster: Cluster) -> None:
    decode = await cluster.pod(Role.DECODE, "d:1")
    unified = await cluster.pod(Role.UNIFIED, "u:1")
    prompt = _prompt(5, 10)
    want, _ = await collect(unified, "reference", prompt, LONG_GREEDY)
    got, outcome = await _stream_until_drained(decode, "r", prompt, LONG_GREEDY, grace_seconds=60.0)
    assert outcome == "finished:length" and got == want
    await wait_clean(decode, unified)


async def test_draining_unified_pod_behaves_as_a_decode_pod(cluster: Cluster) -> None:
    unified = await cluster.pod(Role.UNIFIED, "u:1")
    other = await cluster.pod(Role.UNIFIED, "u:2")
    prompt = _prompt(6, 10)
    want, _ = await collect(other, "reference", prompt, LONG_SEEDED)
    got, outcome = await _stream_until_drained(unified, "r", prompt, LONG_SEEDED, grace_seconds=0.0)
    assert outcome == "UNAVAILABLE" and got == want[:len(got)]
    rest, _ = await collect(other, "r", prompt + got, LONG_SEEDED, num_prompt_tokens=len(prompt))
    assert got + rest == want
    await wait_clean(unified, other)
