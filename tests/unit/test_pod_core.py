"""The pod core with real tiny engines and FakeTransport pairs in one process:
hand-off exactness, fallbacks, leases, aborts. Every test ends leak-free."""
from __future__ import annotations

import asyncio
import math

import pytest
import pytest_asyncio
import torch

from pod_fixtures import GREEDY, Cluster, collect, disaggregated, wait_clean
from splitserve.engine.sampling_params import SamplingParams
from splitserve.pod.messages import KVHandle, KVSource, PodError, Role

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 288, (n,), generator=gen).tolist() for n in lengths]


@pytest_asyncio.fixture
async def cluster(tiny_checkpoints: dict):
    c = Cluster(tiny_checkpoints["llama"])
    yield c
    await c.close()


async def test_handoff_is_token_exact_vs_unified(cluster: Cluster) -> None:
    prefill = await cluster.pod(Role.PREFILL, "p:1")
    decode = await cluster.pod(Role.DECODE, "d:1")
    unified = await cluster.pod(Role.UNIFIED, "u:1")
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=8, ignore_eos=True)
    for i, prompt in enumerate(_prompts(0, (5, 8, 19, 30))):
        for params in (GREEDY, seeded):
            want, local = await collect(unified, f"u{i}", prompt, params)
            got, finished = await disaggregated(prefill, decode, f"r{i}", prompt, params)
            assert got == want and local.kv_source is KVSource.LOCAL
            assert finished.kv_source is KVSource.PULLED and finished.reason == "length"
    assert decode.transport.metrics.bytes_transferred > 0
    await wait_clean(prefill, decode, unified)


async def test_only_missing_blocks_travel_on_second_turn(cluster: Cluster) -> None:
    prefill = await cluster.pod(Role.PREFILL, "p:1")
    decode = await cluster.pod(Role.DECODE, "d:1")
    block_bytes = decode.transport.local_metadata().layout.block_bytes
    turn1 = _prompts(1, (21,))[0]
    out1, f1 = await disaggregated(prefill, decode, "t1", turn1)
    assert f1.num_pulled_blocks == 3  # ceil(21 / 8)
    turn2 = turn1 + out1 + _prompts(2, (6,))[0]  # 35 tokens
    before = decode.transport.metrics.bytes_transferred
    _out2, f2 = await disaggregated(prefill, decode, "t2", turn2)
    # The decoder cached turn 1's full blocks (prompt + output = 29 tokens: 3 full blocks).
    assert f2.num_pulled_blocks == math.ceil(35 / 8) - 3
    assert decode.transport.metrics.bytes_transferred - before == f2.num_pulled_blocks * block_bytes
    await wait_clean(prefill, decode)


async def test_bad_input_is_refused_and_pods_keep_serving(cluster: Cluster) -> None:
    prefill = await cluster.pod(Role.PREFILL, "p:1")
    decode = await cluster.pod(Role.DECODE, "d:1")
    bad = [([288, 1], "outside the vocabulary"), ([], "empty"), ([1] * 200, "max_model_len")]
    for tokens, words in bad:
        with pytest.raises(PodError, match=words) as info:
            await prefill.prefill("bad", tokens, GREEDY)
        assert info.value.code == "INVALID_ARGUMENT"
        with pytest.raises(PodError, match=words):
            await collect(decode, "bad", tokens)
    for call in (lambda: prefill.claim_kv("nope", prefill.incarnation_id), lambda: prefill.release_kv("nope")):
        with pytest.raises(PodError) as info:
            call()
        assert info.value.code == "NOT_FOUND"
    assert not decode.abort("nope") and not prefill.abort("nope")
    with pytest.raises(PodError) as info:
        prefill.claim_kv("x", "old-incarnation")
    assert info.value.code == "NOT_FOUND"
    with pytest.raises(PodError) as info:
        await collect(prefill, "x", [1, 2, 3])
    assert info.value.code == "FAILED_PRECONDITION"
    # A handle for a request the prefill pod never saw: the decoder recomputes.
    prompt = _prompts(3, (12,))[0]
    want, _ = await collect(decode, "local", prompt + [5], num_prompt_tokens=12)
    ghost = KVHandle("ghost", "p:1", prefill.config.transfer_agent_name, prefill.incarnation_id, (0, 1), 12)
    got, finished = await collect(decode, "ghost", prompt + [5], num_prompt_tokens=12, kv_handle=ghost)
    assert finished.kv_source is KVSource.RECOMPUTED and got == want
    got, finished = await disaggregated(prefill, decode, "after", prompt)
    assert finished.kv_source is KVSource.PULLED
    await wait_clean(prefill, decode)


async def test_lease_expiry_frees_blocks_nobody_pulled(cluster: Cluster) -> None:
    prefill = await cluster.pod(Role.PREFILL, "p:1", kv_lease_seconds=0.2)
    result = await prefill.prefill("lonely", _prompts(4, (20,))[0], GREEDY)
    assert result.kv_handle is not None and prefill.load().num_leased_blocks == 3
    await wait_clean(prefill, timeout=3)
    assert prefill.prefill_handler.leases.counters.expired == 1
    with pytest.raises(PodError):
        prefill.claim_kv("lonely", prefill.incarnation_id)


@pytest.mark.parametrize("how", ["abort", "cancel"])
async def test_abort_during_read_releases_lease_at_once(cluster: Cluster, how: str) -> None:
    prefill = await cluster.pod(Role.PREFILL, "p:1")
    decode = await cluster.pod(Role.DECODE, "d:1", kv_transfer_timeout_s=1.0)
    decode.transport.read_delay_s = math.inf  # the READ hangs until its deadline
    prompt = _prompts(5, (20,))[0]
    result = await prefill.prefill("r", prompt, GREEDY)
    task = asyncio.create_task(collect(decode, "r", prompt + [result.first_token_id],
                                       num_prompt_tokens=20, kv_handle=result.kv_handle))
    while not (decode._active.get("r") and decode._active["r"].pulling):
        await asyncio.sleep(0.005)
    if how == "abort":
        assert decode.abort("r")
    else:
        task.cancel()
    await asyncio.sleep(0.1)
    assert prefill.load().num_leased_blocks == 0  # released long before the READ's 1 s deadline
    assert decode.load().num_free_blocks < decode.load().num_total_blocks  # READ still owns them
    if how == "abort":
        _tokens, finished = await task
        assert finished.reason == "abort"
    else:
        with pytest.raises(asyncio.CancelledError):
            await task
    await wait_clean(prefill, decode)


async def test_failed_read_recomputes_the_same_tokens(cluster: Cluster) -> None:
    prefill = await cluster.pod(Role.PREFILL, "p:1")
    decode = await cluster.pod(Role.DECODE, "d:1")
    prompt = _prompts(6, (17,))[0]
    want, _ = await disaggregated(prefill, decode, "ok", prompt)
    decode.transport.fail_transfer = True
    decode_prompt = prompt  # a fresh decoder-side request id, same tokens
    got, finished = await disaggregated(prefill, decode, "broken", decode_prompt)
    assert got == want and finished.kv_source is KVSource.RECOMPUTED
    assert decode.remote_kv.puller.counters.failures == 1
    await wait_clean(prefill, decode)


async def test_incompatible_peer_is_refused_and_nothing_leaks(cluster: Cluster) -> None:
    prefill = await cluster.pod(Role.PREFILL, "p:1", fingerprint="other-model")
    decode = await cluster.pod(Role.DECODE, "d:1")
    prompt = _prompts(7, (12,))[0]
    result = await prefill.prefill("r", prompt, GREEDY)
    with pytest.raises(PodError, match="model_fingerprint") as info:
        await collect(decode, "r", prompt + [result.first_token_id], num_prompt_tokens=12,
                      kv_handle=result.kv_handle)
    assert info.value.code == "FAILED_PRECONDITION"
    await wait_clean(prefill, decode)


async def test_prefill_ending_at_token_zero_has_no_handle_and_kv_events_flow(cluster: Cluster) -> None:
    prefill = await cluster.pod(Role.PREFILL, "p:1")
    events = prefill.kv_events()
    first = asyncio.ensure_future(events.__anext__())
    result = await prefill.prefill("one", _prompts(8, (17,))[0], SamplingParams(temperature=0.0, max_tokens=1))
    assert result.kv_handle is None and result.finish_reason == "length"
    batch = await asyncio.wait_for(first, 5)
    assert len(batch.stored_block_hashes) == 2
    await events.aclose()
    await wait_clean(prefill)
