"""DecodeStream over real gRPC and real pod cores: the router's ``PodClient``
sends every Decode to a pod over one stream; tokens are those of a Decode
call per request; an early close cancels on the pod; an older pod (no
DecodeStream) gets Decode calls; a broken stream fails its requests
retryably. Every test ends with no block or lease held."""
from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import aclosing

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


class OlderServicer(CountingServicer):
    """A pod from before DecodeStream: its server answers UNIMPLEMENTED."""

    async def DecodeStream(self, request_iterator, context) -> None:
        self.calls["DecodeStream"] += 1
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")


async def _serve(core, servicer_type=CountingServicer, port: int = 0):
    calls: Counter = Counter()
    server = grpc.aio.server()
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    pb_grpc.add_EngineServicer_to_server(servicer_type(core, calls), server)
    await server.start()
    return server, port, calls


async def _tokens(client: PodClient, rid: str, prompt: tuple[int, ...], params=GREEDY) -> list[int]:
    out: list[int] = []
    async for event in client.decode(rid, prompt, 0, params):
        if isinstance(event, DecodeChunk):
            out += event.token_ids
        else:
            assert isinstance(event, DecodeFinished) and event.num_output_tokens == len(out)
    return out


@pytest_asyncio.fixture
async def unified(tiny_checkpoints: dict):
    cluster = Cluster(tiny_checkpoints["llama"])
    core = await cluster.pod(Role.UNIFIED, "127.0.0.1:1")
    yield core
    await cluster.close()


PROMPTS = [tuple(range(1 + i, 12 + 2 * i)) for i in range(12)]


async def test_concurrent_decodes_share_one_stream_with_the_tokens_of_separate_calls(unified) -> None:
    server, port, calls = await _serve(unified)
    plain, shared = PodClient(f"127.0.0.1:{port}", multiplex=False), PodClient(f"127.0.0.1:{port}")
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
        await shared.close()
        await server.stop(0)


async def test_closing_early_cancels_on_the_pod_and_the_others_run_on(unified) -> None:
    server, port, _calls = await _serve(unified)
    client = PodClient(f"127.0.0.1:{port}")
    long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    try:
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
    finally:
        await client.close()
        await server.stop(0)


async def test_an_older_pod_gets_a_decode_call_per_request(unified) -> None:
    server, port, calls = await _serve(unified, OlderServicer)
    client = PodClient(f"127.0.0.1:{port}")
    try:
        got = await asyncio.gather(*(_tokens(client, f"old{i}", p) for i, p in enumerate(PROMPTS[:3])))
        assert all(len(t) == 6 for t in got) and not client.multiplex
        assert calls["Decode"] == 3 and calls["DecodeStream"] == 1
        await wait_clean(unified)
    finally:
        await client.close()
        await server.stop(0)


async def test_a_broken_stream_fails_its_requests_retryably_and_the_next_reopens(unified) -> None:
    server, port, _calls = await _serve(unified)
    client = PodClient(f"127.0.0.1:{port}")
    long = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    try:
        async def until_broken(rid: str) -> grpc.StatusCode:
            with pytest.raises(PodCallError) as info:
                async for _ in client.decode(rid, PROMPTS[2], 0, long):
                    await asyncio.sleep(0)
            return info.value.code

        running = [asyncio.create_task(until_broken(f"b{i}")) for i in range(3)]
        while unified.load().num_running < 3:
            await asyncio.sleep(0.01)
        await server.stop(0)
        codes = await asyncio.gather(*running)
        assert all(code in RETRYABLE for code in codes), codes
        await wait_clean(unified)  # the pod aborted all three when the stream ended
        server, _port, calls = await _serve(unified, port=port)  # the pod is back at its address
        assert len(await _tokens(client, "after", PROMPTS[0])) == 6 and calls["DecodeStream"] == 1
        await wait_clean(unified)
    finally:
        await client.close()
        await server.stop(0)


async def test_a_pod_down_at_first_contact_is_not_taken_for_an_older_one(unified) -> None:
    server, port, _calls = await _serve(unified)
    await server.stop(0)  # the address is known, nothing listens there yet
    client = PodClient(f"127.0.0.1:{port}")
    try:
        with pytest.raises(PodCallError) as info:
            await _tokens(client, "early", PROMPTS[0])
        assert info.value.code in RETRYABLE and client.multiplex
        server, _port, calls = await _serve(unified, port=port)
        for attempt in range(100):  # the channel reconnects after its backoff
            try:
                assert len(await _tokens(client, f"later{attempt}", PROMPTS[0])) == 6
                break
            except PodCallError as exc:
                assert exc.code == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.05)
        assert calls["DecodeStream"] == 1 and calls["Decode"] == 1 and client.multiplex
        await wait_clean(unified)
    finally:
        await client.close()
        await server.stop(0)
