"""Fault flags of simulated pods, through a 1 prefill + 1 decode sim fleet in
this process (real gRPC on ephemeral ports, the router's ``PodClient``): each
injected fault ends the way the real pods' protocol says (recompute, or a
retryable UNAVAILABLE), tokens stay exact, and nothing is left held.
The sim pods are test doubles of engine pods (no model, a latency model)."""
from __future__ import annotations

import asyncio

import grpc
import pytest
import pytest_asyncio

from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.sim_runner import sim_tokens
from splitserve.pod.messages import Role
from splitserve.router.pd_client import DecodeChunk, DecodeFinished, PodCallError, PodClient
from splitserve.sim.config import PodGroup, SimConfig, SimModel
from splitserve.sim.faults import FaultConfig
from splitserve.sim.latency_model import LatencyParams
from splitserve.sim.sim_fleet import SimFleet

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]
FAST = LatencyParams(prefill_overhead_s=0.0005, prefill_per_token_s=1e-6, decode_base_s=0.0005,
                     decode_per_seq_s=0.0, kv_overhead_s=0.0005, jitter=0.0)
PROMPT = tuple(range(10, 90))  # 5 blocks of 16
MODEL = SimModel.tiny()
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest_asyncio.fixture
async def fleet():
    config = SimConfig(groups=(PodGroup(Role.PREFILL, 1), PodGroup(Role.DECODE, 1)), model=MODEL,
                       base_port=0, http_port=0, num_blocks=128, latency=FAST, kv_lease_seconds=10.0)
    fleet = SimFleet(config)
    await fleet.start()
    clients = {role: PodClient(fleet.serving_pods(role)[0].address) for role in (Role.PREFILL, Role.DECODE)}
    yield fleet, clients
    for client in clients.values():
        await client.close()
    await fleet.close()


async def _pd(clients: dict, request_id: str) -> tuple[list[int], str | None]:
    first = await clients[Role.PREFILL].prefill(request_id, PROMPT, GREEDY)
    tokens, source = [first.first_token_id], None
    async for event in clients[Role.DECODE].decode(request_id, PROMPT + (first.first_token_id,), len(PROMPT),
                                                   GREEDY, first.kv_handle):
        if isinstance(event, DecodeChunk):
            tokens += event.token_ids
        elif isinstance(event, DecodeFinished):
            source = event.kv_source
    return tokens, source


async def _idle(fleet: SimFleet) -> None:
    for _ in range(200):
        if fleet.is_idle():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"sim pods still hold work: {fleet.held_report()}")


EXPECTED = sim_tokens(PROMPT, 6, MODEL.vocab_size)


async def _broken_decode(fleet: SimFleet, clients: dict, request_id: str, params: SamplingParams) -> list[int]:
    """A Decode with every stream broken by the fault injector: the tokens it
    streamed before it ended UNAVAILABLE; the pods hold nothing afterwards."""
    fleet.set_faults(FaultConfig(decode_break_rate=1.0))
    got: list[int] = []
    with pytest.raises(PodCallError) as info:
        async for event in clients[Role.DECODE].decode(request_id, PROMPT, 0, params):
            got += event.token_ids
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    await _idle(fleet)
    return got


async def test_clean_handoff_pulls_and_the_oracle_sees_it(fleet) -> None:
    fleet, clients = fleet
    assert await _pd(clients, "a") == (EXPECTED, "pulled")
    assert await _pd(clients, "b") == (EXPECTED, "pulled")
    records = {r.request_id: r for r in fleet.oracle.records()}
    assert records["a"].hit_tokens == 0 and records["b"].hit_tokens == 64  # 4 of 5 blocks (last token computed)
    assert records["b"].oracle_tokens == records["b"].own_tokens == 64
    await _idle(fleet)


@pytest.mark.parametrize("faults, counter", [
    (FaultConfig(kv_failure_rate=1.0), None),
    (FaultConfig(lease_expiry_rate=1.0), "lease_expiries"),
    (FaultConfig(prefill_death_rate=1.0), "prefill_deaths"),
])
async def test_handoff_faults_recompute_with_the_same_tokens(fleet, faults: FaultConfig, counter: str | None) -> None:
    fleet, clients = fleet
    fleet.set_faults(faults)
    assert await _pd(clients, "r") == (EXPECTED, "recomputed")
    prefill = fleet.serving_pods(Role.PREFILL)[0]
    if counter is not None:
        assert getattr(prefill.faults.counters, counter) == 1
    else:
        assert fleet.serving_pods(Role.DECODE)[0].transport.metrics.transfers_failed == 1
    await _idle(fleet)


async def test_rpc_errors_are_unavailable_and_only_on_the_chosen_rpcs(fleet) -> None:
    fleet, clients = fleet
    fleet.set_faults(FaultConfig(rpc_error_rate=1.0, rpcs=("Prefill", "Decode")))
    with pytest.raises(PodCallError) as info:
        await clients[Role.PREFILL].prefill("x", PROMPT, GREEDY)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(PodCallError) as info:
        async for _ in clients[Role.DECODE].decode("y", PROMPT, 0, GREEDY):
            pass
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert (await clients[Role.PREFILL].get_load()).load.total_blocks == 128  # GetLoad not faulted
    await _idle(fleet)


async def test_decode_breaks_mid_stream_and_frees_its_blocks(fleet) -> None:
    fleet, clients = fleet
    got = await _broken_decode(fleet, clients, "z", GREEDY)
    assert got == EXPECTED[:1]
    # The router's failover: prompt + tokens so far to a pod, same continuation.
    fleet.set_faults(FaultConfig())
    rest: list[int] = []
    async for event in clients[Role.DECODE].decode("z2", PROMPT + tuple(got), len(PROMPT), GREEDY):
        if isinstance(event, DecodeChunk):
            rest += event.token_ids
    assert got + rest == EXPECTED


async def test_fault_config_validation() -> None:
    with pytest.raises(ValueError, match="probability"):
        FaultConfig(rpc_error_rate=1.5)
    with pytest.raises(ValueError, match="unknown RPC"):
        FaultConfig(rpcs=("Frobnicate",))
    config = FaultConfig.from_dict({"kv_failure_rate": 0.1, "rpcs": "Prefill,ClaimKV"})
    assert config.rpcs == ("Prefill", "ClaimKV") and config.any
    assert FaultConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown fault setting"):
        FaultConfig.from_dict({"typo_rate": 0.1})


async def test_a_break_on_the_last_tokens_still_breaks_the_stream(fleet) -> None:
    # One output token: it rides in the Finished event (accept_last_chunk), and
    # the injected break must still cut the stream after it, not pass it.
    fleet, clients = fleet
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    assert await _broken_decode(fleet, clients, "last", one) == EXPECTED[:1]
