"""The pod's side of DecodeStream without gRPC: ``StreamMultiplexer`` over a
test double of Decode (scripted per-request event generators)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from splitserve.pod.stream_multiplexer import StreamMultiplexer
from splitserve.proto import splitserve_v1_pb2 as pb

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


class ScriptedDecode:
    """Decode double: request_id "n<k>" gives k one-token chunks, each after a
    shared step, then Finished; "hang" waits forever; "raise" fails; "short"
    ends without Finished. Records which generators were closed."""

    def __init__(self) -> None:
        self.step = asyncio.Condition()
        self.closed: list[str] = []

    async def tick(self, n: int = 1) -> None:
        for _ in range(n):
            async with self.step:
                self.step.notify_all()
            await asyncio.sleep(0.01)

    async def __call__(self, request: pb.DecodeRequest) -> AsyncIterator[pb.DecodeResponse]:
        rid = request.request_id
        try:
            if rid == "raise":
                raise RuntimeError("boom")
            if rid == "short":
                yield pb.DecodeResponse(chunk=pb.TokenChunk(token_ids=[1]))
                return
            count = int(rid[1:]) if rid.startswith("n") else 10**9
            for i in range(count):
                async with self.step:
                    await self.step.wait()
                yield pb.DecodeResponse(chunk=pb.TokenChunk(token_ids=[i]))
            yield pb.DecodeResponse(finished=pb.Finished(reason=pb.FINISH_REASON_LENGTH, num_output_tokens=count))
        finally:
            self.closed.append(rid)


def _start(*pairs: tuple[int, str]) -> pb.DecodeStreamRequest:
    return pb.DecodeStreamRequest(starts=[pb.DecodeStart(tag=t, request=pb.DecodeRequest(request_id=r))
                                          for t, r in pairs])


async def _collect(mux: StreamMultiplexer, into: list[pb.DecodeStreamResponse]) -> None:
    async for batch in mux.responses():
        into.append(batch)


async def test_many_requests_share_batches_and_each_gets_its_own_events() -> None:
    decode = ScriptedDecode()
    mux = StreamMultiplexer(decode)
    inbox: asyncio.Queue[pb.DecodeStreamRequest | None] = asyncio.Queue()

    async def messages() -> AsyncIterator[pb.DecodeStreamRequest]:
        while (m := await inbox.get()) is not None:
            yield m

    batches: list[pb.DecodeStreamResponse] = []
    feeder = asyncio.create_task(mux.feed(messages()))
    reader = asyncio.create_task(_collect(mux, batches))
    await inbox.put(_start(*((tag, f"n{3 + tag % 3}") for tag in range(1, 21))))
    await asyncio.sleep(0.01)
    assert mux.num_running == 20
    await decode.tick(6)
    await inbox.put(None)  # the caller stops writing; the stream ends once all ended
    await asyncio.wait_for(reader, 5)
    await feeder
    per_tag: dict[int, list[pb.DecodeResponse]] = {}
    for batch in batches:
        for tagged in batch.events:
            per_tag.setdefault(tagged.tag, []).append(tagged.event)
    assert sorted(per_tag) == list(range(1, 21))
    for tag, events in per_tag.items():
        count = 3 + tag % 3
        assert [e.chunk.token_ids[0] for e in events[:-1]] == list(range(count))
        assert events[-1].finished.num_output_tokens == count
    # One message per step for all twenty, not one per event.
    assert len(batches) <= 7 < sum(len(b.events) for b in batches)
    assert sorted(decode.closed) == sorted(f"n{3 + t % 3}" for t in range(1, 21)) and mux.num_running == 0


async def test_cancel_duplicate_and_failures_stay_with_their_tag() -> None:
    decode = ScriptedDecode()
    mux = StreamMultiplexer(decode)
    batches: list[pb.DecodeStreamResponse] = []
    reader = asyncio.create_task(_collect(mux, batches))
    mux.apply(_start((1, "hang"), (2, "n2"), (3, "raise"), (4, "short")))
    mux.apply(_start((2, "n5")))  # tag 2 is running
    await asyncio.sleep(0.01)
    mux.apply(pb.DecodeStreamRequest(cancels=[1, 99]))  # 99: unknown, ignored
    await decode.tick(3)
    await asyncio.sleep(0.01)
    events = [(t.tag, t.event) for b in batches for t in b.events]
    by_tag = {tag: [e for t, e in events if t == tag] for tag in (1, 2, 3, 4)}
    assert by_tag[1] == []  # cancelled: its generator closed, no event follows
    assert "hang" in decode.closed
    assert any(e.error.code == "INVALID_ARGUMENT" for e in by_tag[2])  # the duplicate start
    assert by_tag[2][-1].finished.num_output_tokens == 2  # the first tag 2 ran on
    assert [e.error.code for e in by_tag[3]] == ["INTERNAL"]
    assert by_tag[4][0].chunk.token_ids == [1] and by_tag[4][-1].error.code == "UNAVAILABLE"
    assert mux.num_running == 0
    # The caller never stopped writing: the stream stays open until closed.
    assert not reader.done()
    mux.apply(_start((5, "hang")))
    await asyncio.sleep(0.01)
    await mux.close()
    assert decode.closed.count("hang") == 2 and mux.num_running == 0
    reader.cancel()


async def test_prefill_kind_answers_each_start_once_and_keeps_failures_with_their_tag() -> None:
    from splitserve.pod.stream_multiplexer import PREFILL_STREAM

    async def prefill(request: pb.PrefillRequest) -> AsyncIterator[pb.PrefillEvent]:
        if request.request_id == "raise":
            raise RuntimeError("boom")
        if request.request_id == "silent":
            return
        yield pb.PrefillEvent(response=pb.PrefillResponse(first_token_id=len(request.token_ids)))

    mux = StreamMultiplexer(prefill, PREFILL_STREAM)

    async def requests() -> AsyncIterator[pb.PrefillStreamRequest]:
        yield pb.PrefillStreamRequest(starts=[
            pb.PrefillStart(tag=tag, request=pb.PrefillRequest(request_id=rid, token_ids=[1] * tag))
            for tag, rid in ((1, "a"), (2, "raise"), (3, "b"), (4, "silent"))])

    feeder = asyncio.create_task(mux.feed(requests()))
    batches = [batch async for batch in mux.responses()]
    await feeder
    events = {tagged.tag: tagged.event for batch in batches for tagged in batch.events}
    assert sorted(events) == [1, 2, 3, 4] and sum(len(b.events) for b in batches) == 4
    assert events[1].response.first_token_id == 1 and events[3].response.first_token_id == 3
    assert (events[2].error.code, events[2].error.message) == ("INTERNAL", "internal error: RuntimeError")
    assert events[4].error.code == "UNAVAILABLE" and "Prefill" in events[4].error.message
    assert len(batches) < 4 and mux.num_running == 0
