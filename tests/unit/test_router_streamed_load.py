"""The watcher takes a pod's load from its KV-event stream when the pod
streams it, and polls ``GetLoad`` only while the stream brings none (a pod
that predates it, a broken or silent stream). Fake pods (test doubles) over
real gRPC."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import pytest
from test_router_membership_fakes import GatedEngine, LiveRouter, cluster, no_leaks, until  # noqa: F401
from test_router_orchestrator_fakes import BLOCK, FakeCluster

from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.proto import splitserve_v1_pb2_grpc as pb_grpc
from splitserve.router.pod_watcher import WatcherConfig

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


@dataclass
class StreamingEngine(GatedEngine):
    """Streams its load when asked (``streaming``: whether it still does);
    counts GetLoad calls."""

    streaming: bool = True
    polls: int = 0
    running_seqs: int = 0
    asked_event_interval_ms: int | None = None

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.LoadReport:
        self.polls += 1
        return await super().GetLoad(request, context)

    async def StreamKVEvents(self, request: pb.StreamKVEventsRequest, context: grpc.aio.ServicerContext):
        self.asked_event_interval_ms = request.event_interval_ms
        if not request.load_interval_ms:
            async for batch in super().StreamKVEvents(request, context):
                yield batch
            return
        while True:
            if self.streaming:
                yield pb.KVEventBatch(block_hash_version=1, load=pb.LoadReport(
                    role=self.role, incarnation_id=f"{self.name}-1", num_running=self.running_seqs,
                    num_free_blocks=77, num_total_blocks=100, block_size=BLOCK))
            await asyncio.sleep(request.load_interval_ms / 1000)


async def _live(cluster: FakeCluster) -> tuple[LiveRouter, StreamingEngine]:
    engine = StreamingEngine(name="p0", role=pb.ROLE_PREFILL, peers=cluster.pods)
    server = grpc.aio.server()
    pb_grpc.add_EngineServicer_to_server(engine, server)
    engine.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    cluster.pods[engine.address] = engine
    cluster.servers.append(server)
    live = LiveRouter()
    live.watcher.config = WatcherConfig(poll_interval_s=0.02, poll_timeout_s=0.2, load_heartbeat_s=0.1,
                                        kv_event_interval_s=0.035, backoff_min_s=0.02)
    live.apply(("prefill", engine))
    return live, engine


async def test_a_streamed_load_replaces_the_polls_until_the_stream_goes_silent(cluster: FakeCluster) -> None:
    live, engine = await _live(cluster)
    try:
        pool = live.router.pools["prefill"]
        await until(lambda: live.ready_ids("prefill") == [engine.address], "ready")
        assert engine.asked_event_interval_ms == 35  # the watcher's KV event interval reached the pod
        engine.running_seqs = 3
        await until(lambda: pool.get(engine.address).load.running_seqs == 3, "the streamed load applied")
        assert pool.get(engine.address).load.free_blocks == 77  # the stream's figure, not GetLoad's
        polls = engine.polls
        await asyncio.sleep(0.5)  # 25 poll periods
        assert engine.polls <= polls + 1  # at most the first poll racing the stream
        engine.streaming = False  # silent (a stuck pod): polls take over within heartbeat + timeout
        await until(lambda: engine.polls >= polls + 3, "polls resumed")
        assert live.ready_ids("prefill") == [engine.address]  # the polls answer: still ready
    finally:
        await live.close()
    await no_leaks(engine)


async def test_a_pod_without_streamed_load_is_polled_as_before(cluster: FakeCluster) -> None:
    live, engine = await _live(cluster)
    engine.streaming = False
    try:
        await until(lambda: engine.polls >= 10, "polled every period")
        assert live.ready_ids("prefill") == [engine.address]
    finally:
        await live.close()
    await no_leaks(engine)
