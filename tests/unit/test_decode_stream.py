"""DecodeStream over real gRPC and real pod cores: the router's ``PodClient``
sends every Decode to a pod over one stream; tokens are those of a Decode
call per request; an early close cancels on the pod; an older pod (no
DecodeStream) gets Decode calls; a broken stream fails its requests
retryably. Every test ends with no block or lease held."""
from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import aclosing, asynccontextmanager

import grpc
import pytest
import pytest_asyncio

from pod_fixtures import Cluster, wait_clean
from splitserve.engine.sampling_params import SamplingParams
from splitserve.pod.messages import Role
from splitserve.pod.servicer import PodServicer
from splitserve.proto import splitserve_v1_pb2_grpc as pb_grpc
from splitserve.router.orchestrator import RETRYABLE
from splitserve.router.pd_client import DecodeChunk, DecodeFinished, PodCallError, PodClient

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


class CountingServicer(PodServicer):
    """The real servicer, counting calls and DecodeStream messages sent."""

    def __init__(self, core, calls: Counter) -> None:
        super().__init__(core)
        self.calls = calls

    async def Decode(self, request, context):
        self.calls["Decode"] += 1
        async for event in super().Decode(request, context):
            yield event

    async def DecodeStream(self, request_iterator, context):
        self.calls["DecodeStream"] += 1
        async for batch in super().DecodeStream(request_iterator, context):
            self.calls["batches"] += 1
            self.calls["events"] += len(batch.events)
            yield batch

    async def Prefill(self, request, context):
        self.calls["Prefill"] += 1
        return await super().Prefill(request, context)

    async def PrefillStream(self, request_iterator, context):
        self.calls["PrefillStream"] += 1
        async for batch in super().PrefillStream(request_iterator, context):
            self.calls["prefill batches"] += 1
            yield batch


class OlderServicer(CountingServicer):
    """A pod from before DecodeStream: its server answers UNIMPLEMENTED."""

    async def DecodeStream(self, request_iterator, context) -> None:
        self.calls["DecodeStream"] += 1
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

    async def PrefillStream(self, request_iterator, context) -> None:
        self.calls["PrefillStream"] += 1
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")


class SlowPrefillServicer(CountingServicer):
    """Prefills that take far longer than the caller waits."""

    async def Prefill(self, request, context):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.calls["Prefill cancelled"] += 1
            raise
        return await super().Prefill(request, context)


class ServedPod:
    """A pod core behind a grpc.aio server on 127.0.0.1 that can stop and
    come back at the same port; ``calls`` counts what the current server saw."""

    def __init__(self, core, servicer_type=CountingServicer) -> None:
        self.core = core
        self.servicer_type = servicer_type
        self.port = 0
        self.calls: Counter = Counter()
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.calls = Counter()
        server = self._server = grpc.aio.server()
        self.port = server.add_insecure_port(self.address)
        pb_grpc.add_EngineServicer_to_server(self.servicer_type(self.core, self.calls), server)
        await server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None


@asynccontextmanager
async def served(core, servicer_type=CountingServicer, started: bool = True):
    """(the served pod, a ``PodClient`` of it); both closed after."""
    pod = ServedPod(core, servicer_type)
    await pod.start()
    if not started:
        await pod.stop()  # the address is known, nothing listens there yet
    client = PodClient(pod.address)
    try:
        yield pod, client
    finally:
        await client.close()
        await pod.stop()


async def _tokens(client: PodClient, rid: str, prompt: tuple[int, ...], params=GREEDY) -> list[int]:
    out: list[int] = []
    async for event in client.decode(rid, prompt, 0, params):
        if isinstance(event, DecodeChunk):
            out += event.token_ids
        else:
            assert isinstance(event, DecodeFinished) and event.num_output_tokens == len(out)
    return out


async def _pod_core(checkpoints: dict, role: Role, address: str):
    cluster = Cluster(checkpoints["llama"])
    yield await cluster.pod(role, address)
    await cluster.close()


@pytest_asyncio.fixture
async def prefill_core(tiny_checkpoints: dict):
    async for core in _pod_core(tiny_checkpoints, Role.PREFILL, "127.0.0.1:2"):
        yield core


@pytest_asyncio.fixture
async def unified(tiny_checkpoints: dict):
    async for core in _pod_core(tiny_checkpoints, Role.UNIFIED, "127.0.0.1:1"):
        yield core


PROMPTS = [tuple(range(1 + i, 12 + 2 * i)) for i in range(12)]


async def test_concurrent_decodes_share_one_stream_with_the_tokens_of_separate_calls(unified) -> None:
    async with served(unified) as (pod, shared):
        plain = PodClient(pod.address, multiplex=False)
        calls = pod.calls
        try:
            expected = await asyncio.gather(*(_tokens(plain, f"p{i}", p) for i, p in enumerate(PROMPTS)))
            assert calls["Decode"] == len(PROMPTS) and calls["DecodeStream"] == 0
            got = await asyncio.gather(*(_tokens(shared, f"s{i}", p) for i, p in enumerate(PROMPTS)))
            assert got == expected and all(len(t) == 6 for t in got)
            again = await _tokens(shared, "s-again", PROMPTS[0])
            assert again == expected[0]
            assert calls["DecodeStream"] == 1 and shared.multiplex
            # The requests' events left together: fewer messages than events.
            assert calls["batches"] < calls["events"]
            await wait_clean(unified)
        finally:
            await plain.close()


async def test_closing_early_cancels_on_the_pod_and_the_others_run_on(unified) -> None:
    long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    async with served(unified) as (_pod, client):
        async def first_chunk_then_close(rid: str) -> None:
            async with aclosing(client.decode(rid, PROMPTS[1], 0, long)) as events:
                async for event in events:
                    assert isinstance(event, DecodeChunk)
                    break

        others = asyncio.gather(*(_tokens(client, f"o{i}", p) for i, p in enumerate(PROMPTS[:4])))
        await first_chunk_then_close("gone")
        assert [len(t) for t in await others] == [6] * 4
        await wait_clean(unified)
        assert unified.load().num_running == 0 and not unified._active


async def test_an_older_pod_gets_a_decode_call_per_request(unified) -> None:
    async with served(unified, OlderServicer) as (pod, client):
        calls = pod.calls
        got = await asyncio.gather(*(_tokens(client, f"old{i}", p) for i, p in enumerate(PROMPTS[:3])))
        assert all(len(t) == 6 for t in got) and not client.multiplex
        assert calls["Decode"] == 3 and calls["DecodeStream"] == 1
        await wait_clean(unified)


async def test_a_broken_stream_fails_its_requests_retryably_and_the_next_reopens(unified) -> None:
    long = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    async with served(unified) as (pod, client):
        async def until_broken(rid: str) -> grpc.StatusCode:
            with pytest.raises(PodCallError) as info:
                async for _ in client.decode(rid, PROMPTS[2], 0, long):
                    await asyncio.sleep(0)
            return info.value.code

        running = [asyncio.create_task(until_broken(f"b{i}")) for i in range(3)]
        while unified.load().num_running < 3:
            await asyncio.sleep(0.01)
        await pod.stop()
        codes = await asyncio.gather(*running)
        assert all(code in RETRYABLE for code in codes), codes
        await wait_clean(unified)  # the pod aborted all three when the stream ended
        await pod.start()  # the pod is back at its address
        assert len(await _tokens(client, "after", PROMPTS[0])) == 6 and pod.calls["DecodeStream"] == 1
        await wait_clean(unified)


async def test_a_pod_down_at_first_contact_is_not_taken_for_an_older_one(unified) -> None:
    async with served(unified, started=False) as (pod, client):
        with pytest.raises(PodCallError) as info:
            await _tokens(client, "early", PROMPTS[0])
        assert info.value.code in RETRYABLE and client.multiplex
        await pod.start()
        for attempt in range(100):  # the channel reconnects after its backoff
            try:
                assert len(await _tokens(client, f"later{attempt}", PROMPTS[0])) == 6
                break
            except PodCallError as exc:
                assert exc.code == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.05)
        assert pod.calls["DecodeStream"] == 1 and pod.calls["Decode"] == 1 and client.multiplex
        await wait_clean(unified)


async def test_batches_written_as_bytes_parse_as_the_messages_they_stand_for() -> None:
    from splitserve.proto import splitserve_v1_pb2 as pb
    from splitserve.router.tagged_stream_client import encode_cancels, encode_start

    requests = [pb.DecodeRequest(request_id=f"r{i}", token_ids=range(i * 300, i * 300 + 40 * i),
                                 num_prompt_tokens=3, accept_last_chunk=True) for i in range(4)]
    requests[1].sampling.temperature = 0.5
    tags = [1, 127, 128, 2**40 + 3]
    cancels = [0, 5, 300, 2**63 + 1]
    raw = b"".join(encode_start(tag, r) for tag, r in zip(tags, requests)) + encode_cancels(cancels)
    expected = pb.DecodeStreamRequest(starts=[pb.DecodeStart(tag=t, request=r) for t, r in zip(tags, requests)],
                                      cancels=cancels)
    assert pb.DecodeStreamRequest.FromString(raw) == expected
    assert encode_cancels([]) == b"" and pb.DecodeStreamRequest.FromString(encode_cancels([9])).cancels == [9]


async def test_prefills_share_one_stream_answer_as_calls_and_a_refusal_stays_with_its_request(
        prefill_core) -> None:
    async with served(prefill_core) as (pod, shared):
        plain = PodClient(pod.address, multiplex=False)
        try:
            expected = await asyncio.gather(*(plain.prefill(f"p{i}", p, GREEDY) for i, p in enumerate(PROMPTS)))
            assert pod.calls["Prefill"] == len(PROMPTS) and pod.calls["PrefillStream"] == 0
            for i in range(len(PROMPTS)):
                assert await plain.abort(f"p{i}")  # drop the lease
            bad = (5, 10**6, 7)  # a token id outside the vocabulary: INVALID_ARGUMENT
            got = await asyncio.gather(*(shared.prefill(f"s{i}", p, GREEDY) for i, p in enumerate(PROMPTS)),
                                       shared.prefill("bad", bad, GREEDY), return_exceptions=True)
            refused = got.pop()
            assert isinstance(refused, PodCallError) and refused.code == grpc.StatusCode.INVALID_ARGUMENT
            assert [(r.first_token_id, r.num_prompt_tokens, r.kv_handle is not None) for r in got] == \
                [(r.first_token_id, r.num_prompt_tokens, True) for r in expected]
            assert pod.calls["PrefillStream"] == 1 and shared.multiplex_prefill
            assert pod.calls["prefill batches"] < len(PROMPTS) + 1  # answers left together
            for i in range(len(PROMPTS)):
                assert await shared.abort(f"s{i}")
            await wait_clean(prefill_core)
        finally:
            await plain.close()


async def test_a_prefill_past_its_timeout_is_cancelled_on_the_pod_and_the_stream_serves_on(
        prefill_core) -> None:
    async with served(prefill_core, SlowPrefillServicer) as (pod, client):
        with pytest.raises(PodCallError) as info:
            await client.prefill("slow", PROMPTS[0], GREEDY, timeout=0.3)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and info.value.code in RETRYABLE
        deadline = asyncio.get_running_loop().time() + 5
        while pod.calls["Prefill cancelled"] < 1:
            assert asyncio.get_running_loop().time() < deadline, "the pod never saw the cancel"
            await asyncio.sleep(0.02)
        assert pod.calls["PrefillStream"] == 1
        await wait_clean(prefill_core)


async def test_an_older_pod_gets_a_prefill_call_per_request(prefill_core) -> None:
    async with served(prefill_core, OlderServicer) as (pod, client):
        first = await client.prefill("old-1", PROMPTS[0], GREEDY)
        second = await client.prefill("old-2", PROMPTS[1], GREEDY)
        assert first.kv_handle is not None and second.kv_handle is not None
        assert not client.multiplex_prefill
        assert pod.calls["PrefillStream"] == 1 and pod.calls["Prefill"] == 2
        assert await client.abort("old-1") and await client.abort("old-2")
        await wait_clean(prefill_core)
