"""The gRPC servicer over real pod cores in one process: status codes for bad
input, the Decode error event, metadata, load and metrics; pods keep serving."""
from __future__ import annotations

import grpc
import pytest
import pytest_asyncio
from prometheus_client import generate_latest

from pod_fixtures import Cluster, grpc_pods, wait_clean
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kvtransfer import TransferMetadata
from splitserve.pod.messages import Role
from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.proto import splitserve_v1_pb2_grpc as pb_grpc
from splitserve.pod.proto_convert import sampling_to_proto

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]
GREEDY = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))


@pytest_asyncio.fixture
async def stubs(tiny_checkpoints: dict):
    cluster = Cluster(tiny_checkpoints["llama"])
    async with grpc_pods(cluster) as pods:
        yield {role: (pb_grpc.EngineStub(grpc.aio.insecure_channel(f"127.0.0.1:{port}")), core)
               for role, (port, core) in pods.items()}
    await cluster.close()


async def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code()


async def test_status_codes_and_error_events(stubs: dict) -> None:
    (p, pcore), (d, dcore) = stubs[Role.PREFILL], stubs[Role.DECODE]
    bad_sampling = pb.SamplingParams(temperature=-1.0, top_p=1.0, repetition_penalty=1.0)
    for tokens, sampling in (([288], GREEDY), ([], GREEDY), ([1] * 500, GREEDY), ([1, 2], bad_sampling)):
        request = pb.PrefillRequest(request_id="x", token_ids=tokens, sampling=sampling)
        assert await _code(p.Prefill(request)) == grpc.StatusCode.INVALID_ARGUMENT
        events = [e async for e in d.Decode(pb.DecodeRequest(request_id="x", token_ids=tokens, sampling=sampling))]
        assert len(events) == 1 and events[0].error.code == "INVALID_ARGUMENT"
    assert await _code(p.ClaimKV(pb.ClaimKVRequest(request_id="nope"))) == grpc.StatusCode.NOT_FOUND
    assert await _code(p.ReleaseKV(pb.ReleaseKVRequest(request_id="nope"))) == grpc.StatusCode.NOT_FOUND
    assert await _code(p.Abort(pb.AbortRequest(request_id="nope"))) == grpc.StatusCode.NOT_FOUND
    assert await _code(d.Prefill(pb.PrefillRequest(request_id="y", token_ids=[1], sampling=GREEDY))) \
        == grpc.StatusCode.FAILED_PRECONDITION
    # Still serving: a full hand-off over the servicers.
    first = await p.Prefill(pb.PrefillRequest(request_id="ok", token_ids=list(range(1, 20)), sampling=GREEDY))
    assert first.kv_handle.num_tokens == 19 and len(first.kv_handle.block_ids) == 3
    events = [e async for e in d.Decode(pb.DecodeRequest(
        request_id="ok", token_ids=list(range(1, 20)) + [first.first_token_id], num_prompt_tokens=19,
        sampling=GREEDY, kv_handle=first.kv_handle))]
    assert sum(len(e.chunk.token_ids) for e in events) == 3
    assert events[-1].finished.kv_source == pb.KV_SOURCE_PULLED
    load = await p.GetLoad(pb.GetLoadRequest())
    assert load.role == pb.ROLE_PREFILL and load.block_size == 8
    meta = await p.GetTransferMetadata(pb.GetTransferMetadataRequest())
    decoded = TransferMetadata.from_bytes(meta.encoded)
    assert decoded.agent_name == meta.agent_name == pcore.config.transfer_agent_name
    text = generate_latest(dcore.metrics.registry).decode()
    for name in ("kv_transfer_bytes_total", "time_to_first_token_seconds_count", "num_requests_running",
                 "request_success_total{finished_reason=\"length\"} 1.0", "kv_cache_usage_perc"):
        assert "splitserve:" + name in text, name
    await wait_clean(pcore, dcore)
    dcore.draining = True
    events = [e async for e in d.Decode(pb.DecodeRequest(request_id="z", token_ids=[1], sampling=GREEDY))]
    assert events[0].error.code == "UNAVAILABLE"


def _stream_tokens(events: list) -> list[int]:
    return [t for e in events
            for t in (e.chunk.token_ids if e.HasField("chunk") else e.finished.last_chunk.token_ids)]


async def test_last_chunk_rides_in_finished_only_when_the_caller_accepts_it(stubs: dict) -> None:
    d, dcore = stubs[Role.DECODE]
    prompt = list(range(1, 12))

    async def run(accept: bool) -> list:
        return [e async for e in d.Decode(pb.DecodeRequest(request_id=f"last-{accept}", token_ids=prompt,
                                                           sampling=GREEDY, accept_last_chunk=accept))]

    plain, merged = await run(False), await run(True)
    # An older router (no accept_last_chunk) still gets every token as a chunk.
    assert plain[-1].HasField("finished") and not plain[-1].finished.HasField("last_chunk")
    assert plain[-2].HasField("chunk") and len(plain[-2].chunk.token_ids) > 0
    assert merged[-1].HasField("finished") and len(merged[-1].finished.last_chunk.token_ids) > 0
    assert len(_stream_tokens(plain)) == 4 and _stream_tokens(merged) == _stream_tokens(plain)
    assert all(not e.HasField("error") for e in plain + merged)
    await wait_clean(dcore)


async def test_kv_event_stream_carries_the_load_when_asked(stubs: dict) -> None:
    (p, pcore) = stubs[Role.PREFILL]
    call = p.StreamKVEvents(pb.StreamKVEventsRequest(load_interval_ms=20, load_heartbeat_ms=100))
    stream = call.__aiter__()
    first = await stream.__anext__()
    assert first.HasField("load") and not first.stored_block_hashes
    assert first.load.role == pb.ROLE_PREFILL and first.load.block_size == 8
    assert first.load.num_free_blocks == (await p.GetLoad(pb.GetLoadRequest())).num_free_blocks
    result = await p.Prefill(pb.PrefillRequest(request_id="ev", token_ids=list(range(1, 20)), sampling=GREEDY))
    stored = []
    while len(stored) < 2:  # the prompt's two full blocks, each batch with the load of its moment
        batch = await stream.__anext__()
        assert batch.HasField("load")
        stored += batch.stored_block_hashes
    assert (await p.ReleaseKV(pb.ReleaseKVRequest(request_id="ev"))) is not None
    heartbeat = await stream.__anext__()  # nothing stored: the load alone, changed or as the heartbeat
    assert heartbeat.HasField("load") and not heartbeat.stored_block_hashes
    call.cancel()
    assert result.kv_handle.num_tokens == 19
    plain = p.StreamKVEvents(pb.StreamKVEventsRequest())  # not asked: events only, as before
    await p.Prefill(pb.PrefillRequest(request_id="ev2", token_ids=list(range(30, 50)), sampling=GREEDY))
    batch = await plain.__aiter__().__anext__()
    assert batch.stored_block_hashes and not batch.HasField("load")
    plain.cancel()
    await p.ReleaseKV(pb.ReleaseKVRequest(request_id="ev2"))
    await wait_clean(pcore)


async def test_kv_events_asked_at_an_interval_leave_merged(stubs: dict) -> None:
    (p, pcore) = stubs[Role.PREFILL]
    call = p.StreamKVEvents(pb.StreamKVEventsRequest(event_interval_ms=1000))
    stream = call.__aiter__()
    names = ("a", "b", "c")
    for i, name in enumerate(names):  # three Prefills (three engine steps), two full blocks each
        tokens = list(range(1 + 40 * i, 18 + 40 * i))
        await p.Prefill(pb.PrefillRequest(request_id=name, token_ids=tokens, sampling=GREEDY))
    first = await stream.__anext__()  # what came first left at once; the rest waited out the interval
    second = await stream.__anext__()
    stored = [*first.stored_block_hashes, *second.stored_block_hashes]
    assert len(first.stored_block_hashes) == 2 and len(stored) == len(set(stored)) == 6
    call.cancel()
    for name in names:
        await p.ReleaseKV(pb.ReleaseKVRequest(request_id=name))
    await wait_clean(pcore)
