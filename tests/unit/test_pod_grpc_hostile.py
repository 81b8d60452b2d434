"""Malformed gRPC to real pod servicers (tiny engines behind grpc.aio on
loopback; the KV wire is ``FakeTransport``, a test double of NIXL): wrong
field values, block ids past the pool, foreign and stale lease ids and huge
repeated fields are refused with INVALID_ARGUMENT / NOT_FOUND /
FAILED_PRECONDITION (RESOURCE_EXHAUSTED past gRPC's message limit), or, for a
bad KV handle, recomputed without reading a block the lease does not hold;
the pods keep serving and end with 0 blocks used and 0 leases."""
from __future__ import annotations

import asyncio
import math

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pod_fixtures import Cluster, grpc_pods, wait_clean
from splitserve.engine.sampling_params import SamplingParams
from splitserve.pod.messages import Role
from splitserve.pod.proto_convert import sampling_to_proto
from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.proto import splitserve_v1_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(240)
GREEDY = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
PROMPT_A = list(range(1, 20))          # 19 tokens: 3 blocks of 8
PROMPT_B = list(range(100, 119))
OK_SAMPLING = dict(top_p=1.0, repetition_penalty=1.0)


def _sampling(**fields: object) -> pb.SamplingParams:
    return pb.SamplingParams(**{**OK_SAMPLING, **fields})


BAD_PREFILLS = [  # (what, token_ids, sampling)
    ("token id past the vocabulary", [1, 10**6], GREEDY),
    ("no tokens", [], GREEDY),
    ("prompt past max_model_len", [1] * 500, GREEDY),
    ("temperature NaN", [1, 2], _sampling(temperature=math.nan)),
    ("temperature inf", [1, 2], _sampling(temperature=math.inf)),
    ("top_p 0", [1, 2], pb.SamplingParams(repetition_penalty=1.0)),
    ("top_p NaN", [1, 2], _sampling(top_p=math.nan)),
    ("repetition_penalty 0", [1, 2], pb.SamplingParams(top_p=1.0)),
    ("top_k negative", [1, 2], _sampling(top_k=-7)),
    ("seed past int64", [1, 2], _sampling(seed=2**64 - 1)),
    ("logprobs past 20", [1, 2], _sampling(logprobs=99)),
    ("max_tokens 0", [1, 2], _sampling(max_tokens=0)),
    ("min_tokens over max_tokens", [1, 2], _sampling(max_tokens=2, min_tokens=9)),
    ("a constraint that does not compile", [1, 2],
     _sampling(max_tokens=4, constraint=pb.Constraint(json_schema='{"type": 5}'))),
    ("500k tokens (a huge repeated field under gRPC's limit)", list(range(1, 200)) * 2500, GREEDY),
]


async def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code()


async def _decode(stub, request_id: str, tokens: list[int], handle: pb.KVHandle | None = None,
                  num_prompt_tokens: int = 0, sampling: pb.SamplingParams = GREEDY) -> list[pb.DecodeResponse]:
    request = pb.DecodeRequest(request_id=request_id, token_ids=tokens, sampling=sampling,
                               num_prompt_tokens=num_prompt_tokens)
    if handle is not None:
        request.kv_handle.CopyFrom(handle)
    return [event async for event in stub.Decode(request)]


def _tokens(events: list[pb.DecodeResponse]) -> list[int]:
    assert events[-1].WhichOneof("event") == "finished", events[-1]
    return [t for e in events if e.WhichOneof("event") == "chunk" for t in e.chunk.token_ids]


@pytest.mark.asyncio
async def test_malformed_rpcs_are_refused_and_the_pods_keep_serving(tiny_checkpoints: dict) -> None:
    cluster = Cluster(tiny_checkpoints["llama"])
    async with grpc_pods(cluster) as pods:
        (p_port, pcore), (d_port, dcore) = pods[Role.PREFILL], pods[Role.DECODE]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{p_port}") as pc, \
                grpc.aio.insecure_channel(f"127.0.0.1:{d_port}") as dc:
            p, d = pb_grpc.EngineStub(pc), pb_grpc.EngineStub(dc)
            # The answers a well-formed request gets, computed on the decode pod alone.
            reference = {name: _tokens(await _decode(d, f"ref-{name}", prompt))
                         for name, prompt in (("a", PROMPT_A), ("b", PROMPT_B))}

            for what, tokens, sampling in BAD_PREFILLS:
                request = pb.PrefillRequest(request_id="bad", token_ids=tokens, sampling=sampling)
                assert await _code(p.Prefill(request)) == grpc.StatusCode.INVALID_ARGUMENT, what
                events = await _decode(d, "bad", tokens, sampling=sampling)
                assert [e.error.code for e in events] == ["INVALID_ARGUMENT"], what
            assert await _code(p.Prefill(pb.PrefillRequest(request_id="", token_ids=[1, 2], sampling=GREEDY))) \
                == grpc.StatusCode.INVALID_ARGUMENT
            # Past gRPC's 4 MiB message limit the server refuses before any pod code runs.
            huge = pb.PrefillRequest(request_id="huge", token_ids=[300_000] * 2_000_000, sampling=GREEDY)
            assert await _code(p.Prefill(huge)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            huge_stops = pb.PrefillRequest(request_id="huge-stops", token_ids=[1, 2],
                                           sampling=_sampling(stop_token_ids=[300_000] * 2_000_000))
            assert await _code(p.Prefill(huge_stops)) == grpc.StatusCode.RESOURCE_EXHAUSTED

            # Roles: each pod refuses the other's RPCs.
            assert await _code(d.Prefill(pb.PrefillRequest(request_id="r", token_ids=[1], sampling=GREEDY))) \
                == grpc.StatusCode.FAILED_PRECONDITION
            assert [e.error.code for e in await _decode(p, "r", [1, 2])] == ["FAILED_PRECONDITION"]
            assert await _code(d.ClaimKV(pb.ClaimKVRequest(request_id="r"))) == grpc.StatusCode.FAILED_PRECONDITION

            # Two real leases, A and B.
            a = await p.Prefill(pb.PrefillRequest(request_id="A", token_ids=PROMPT_A, sampling=GREEDY))
            b = await p.Prefill(pb.PrefillRequest(request_id="B", token_ids=PROMPT_B, sampling=GREEDY))
            assert (await p.GetLoad(pb.GetLoadRequest())).num_leased_blocks == 6

            # Foreign and stale lease ids on the prefill pod's own RPCs.
            assert await _code(p.ClaimKV(pb.ClaimKVRequest(request_id="nobody", incarnation_id=pcore.incarnation_id))) \
                == grpc.StatusCode.NOT_FOUND
            assert await _code(p.ClaimKV(pb.ClaimKVRequest(request_id="A", incarnation_id="a-previous-life"))) \
                == grpc.StatusCode.NOT_FOUND
            assert await _code(p.ReleaseKV(pb.ReleaseKVRequest(request_id="nobody"))) == grpc.StatusCode.NOT_FOUND
            assert await _code(p.Abort(pb.AbortRequest(request_id="nobody"))) == grpc.StatusCode.NOT_FOUND

            # Malformed handles on Decode: refused before any engine work.
            for broken in (pb.KVHandle(request_id="B", num_tokens=0, peer_address=b.kv_handle.peer_address,
                                       agent_name=b.kv_handle.agent_name),
                           pb.KVHandle(request_id="B", num_tokens=19, agent_name="x"),
                           pb.KVHandle(request_id="B", num_tokens=19, peer_address="127.0.0.1:1")):
                events = await _decode(d, "B-bad", PROMPT_B + [b.first_token_id], broken, len(PROMPT_B))
                assert [e.error.code for e in events] == ["INVALID_ARGUMENT"], broken
            events = await _decode(d, "B-bad", PROMPT_B, b.kv_handle, num_prompt_tokens=len(PROMPT_B) + 5)
            assert [e.error.code for e in events] == ["INVALID_ARGUMENT"]

            await p.ReleaseKV(pb.ReleaseKVRequest(request_id="B"))

            # A handle naming A's blocks (a foreign lease's) or block ids past the pool
            # under a real lease: the decoder must not READ them; it recomputes, token-identical.
            for i, block_ids in enumerate((list(a.kv_handle.block_ids), [10**6, 10**6 + 1, 10**6 + 2])):
                rid = f"B{i}"
                bi = await p.Prefill(pb.PrefillRequest(request_id=rid, token_ids=PROMPT_B, sampling=GREEDY))
                forged = pb.KVHandle()
                forged.CopyFrom(bi.kv_handle)
                del forged.block_ids[:]
                forged.block_ids.extend(block_ids)
                events = await _decode(d, rid, PROMPT_B + [bi.first_token_id], forged, len(PROMPT_B))
                assert events[-1].finished.kv_source == pb.KV_SOURCE_RECOMPUTED, block_ids
                assert [bi.first_token_id] + _tokens(events) == reference["b"], block_ids

            # A stale handle (its lease already released) and one from a previous
            # incarnation of the prefill pod: recomputed, token-identical.
            await p.ReleaseKV(pb.ReleaseKVRequest(request_id="A"))
            assert await _code(p.ReleaseKV(pb.ReleaseKVRequest(request_id="A"))) == grpc.StatusCode.NOT_FOUND
            events = await _decode(d, "A", PROMPT_A + [a.first_token_id], a.kv_handle, len(PROMPT_A))
            assert events[-1].finished.kv_source == pb.KV_SOURCE_RECOMPUTED
            assert [a.first_token_id] + _tokens(events) == reference["a"]
            a = await p.Prefill(pb.PrefillRequest(request_id="A", token_ids=PROMPT_A, sampling=GREEDY))
            old = pb.KVHandle()
            old.CopyFrom(a.kv_handle)
            old.incarnation_id = "a-previous-life"
            events = await _decode(d, "A", PROMPT_A + [a.first_token_id], old, len(PROMPT_A))
            assert events[-1].finished.kv_source == pb.KV_SOURCE_RECOMPUTED
            assert [a.first_token_id] + _tokens(events) == reference["a"]

            # Still serving: a normal handoff pulls and matches the reference.
            ok = await p.Prefill(pb.PrefillRequest(request_id="ok", token_ids=PROMPT_A, sampling=GREEDY))
            events = await _decode(d, "ok", PROMPT_A + [ok.first_token_id], ok.kv_handle, len(PROMPT_A))
            assert events[-1].finished.kv_source == pb.KV_SOURCE_PULLED
            assert [ok.first_token_id] + _tokens(events) == reference["a"]
            await dcore.remote_kv.drain()
            await wait_clean(pcore, dcore)
            load = await p.GetLoad(pb.GetLoadRequest())
            assert load.num_leased_blocks == 0 and load.num_free_blocks == load.num_total_blocks
    await cluster.close()


_F32 = st.one_of(st.floats(width=32), st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf, 3.4e38]))
_U32 = st.integers(0, 2**32 - 1)
_VALID = {"temperature": st.floats(0, 2, width=32), "top_p": st.floats(0.0625, 1, width=32),
          "repetition_penalty": st.floats(0.5, 2, width=32), "max_tokens": st.integers(1, 4),
          "ignore_eos": st.booleans()}
_WILD = {"n": st.integers(0, 4), "max_tokens": st.one_of(st.just(0), _U32), "min_tokens": _U32,
         "temperature": _F32, "top_p": _F32, "top_k": st.integers(-(2**31), 2**31 - 1), "min_p": _F32,
         "seed": st.integers(0, 2**64 - 1), "presence_penalty": _F32, "frequency_penalty": _F32,
         "repetition_penalty": _F32, "stop_token_ids": st.lists(_U32, max_size=5),
         "logprobs": st.integers(0, 2**32 - 1)}


@st.composite
def _prefills(draw: st.DrawFn) -> pb.PrefillRequest:
    """A valid request with a few fields (often none) replaced by values from
    anywhere in their proto type's range."""
    fields = draw(st.fixed_dictionaries(_VALID))
    fields.update(draw(st.fixed_dictionaries({}, optional=_WILD).filter(lambda d: len(d) <= 3)))
    tokens = draw(st.one_of(st.lists(st.integers(1, 250), min_size=1, max_size=60),
                            st.lists(_U32, max_size=200)))
    request_id = draw(st.one_of(st.uuids().map(str), st.text(max_size=12)))
    return pb.PrefillRequest(request_id=request_id, token_ids=tokens, sampling=pb.SamplingParams(**fields),
                             cache_salt=draw(st.text(max_size=8)))


def test_fuzzed_prefill_requests_get_ok_or_invalid_argument(tiny_checkpoints: dict) -> None:
    """Hypothesis draws PrefillRequests over the proto's whole value ranges
    (NaN and infinite floats, every int32/uint32/uint64 extreme, empty and
    non-ASCII ids and salts): each answer is OK or INVALID_ARGUMENT, never
    INTERNAL or UNKNOWN; every lease granted is released; the pod ends clean."""
    loop = asyncio.new_event_loop()
    cluster = Cluster(tiny_checkpoints["llama"])
    pods = grpc_pods(cluster, (Role.PREFILL,))
    asyncio.set_event_loop(loop)  # grpc.aio looks the loop up when a call is made
    (port, core), = loop.run_until_complete(pods.__aenter__()).values()

    async def open_channel() -> grpc.aio.Channel:  # grpc.aio binds a channel to the loop it is made on
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}")

    channel = loop.run_until_complete(open_channel())
    stub = pb_grpc.EngineStub(channel)
    codes: dict[str, int] = {}

    async def call(request: pb.PrefillRequest) -> grpc.StatusCode:
        try:
            reply = await stub.Prefill(request, timeout=60)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        if reply.HasField("kv_handle"):
            await stub.ReleaseKV(pb.ReleaseKVRequest(request_id=request.request_id))
        return grpc.StatusCode.OK

    @given(request=_prefills())
    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(request: pb.PrefillRequest) -> None:
        code = loop.run_until_complete(call(request))
        codes[code.name] = codes.get(code.name, 0) + 1
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, request)

    try:
        fuzz()
        print(f"fuzzed Prefill status codes: {codes}")
        assert codes.get("OK", 0) > 0 and codes.get("INVALID_ARGUMENT", 0) > 0  # both sides were reached
        after = pb.PrefillRequest(request_id="after", token_ids=PROMPT_A, sampling=GREEDY)
        assert loop.run_until_complete(call(after)) == grpc.StatusCode.OK  # still serving
        loop.run_until_complete(wait_clean(core))
    finally:
        loop.run_until_complete(channel.close())
        loop.run_until_complete(pods.__aexit__(None, None, None))
        loop.run_until_complete(cluster.close())
        asyncio.set_event_loop(None)
        loop.close()
