"""The gRPC servicer of a simulated pod: the real ``PodServicer`` plus the
injected faults (``FaultInjector``) and the oracle's observations.

Everything a real pod does is done by ``PodServicer`` / ``PodCore``; this
subclass only decides, per RPC, whether to fail it first, and tells the
``PrefixOracle`` which prompts this pod computes and what its cache served.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator

import grpc

from splitserve.pod.core import PodCore
from splitserve.pod.proto_convert import decode_tokens
from splitserve.pod.servicer import PodServicer
from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.sim.faults import FaultInjector
from splitserve.sim.prefix_oracle import CacheMirror, PrefixOracle

logger = logging.getLogger(__name__)


class SimServicer(PodServicer):
    def __init__(self, core: PodCore, pod_name: str, faults: FaultInjector, oracle: PrefixOracle | None,
                 mirror: CacheMirror, calls: Counter[str] | None = None) -> None:
        super().__init__(core)
        self.pod_name = pod_name
        self.faults = faults
        self.oracle = oracle
        self.mirror = mirror
        self.calls = calls if calls is not None else Counter()  # Prefill/Decode calls served, for the bench

    async def _maybe_fail(self, rpc: str, context: grpc.aio.ServicerContext) -> None:
        if self.faults.rpc_fails(rpc):
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"injected fault: {rpc} failed on {self.pod_name}")

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        self.calls["Prefill"] += 1
        await self._maybe_fail("Prefill", context)
        if self.oracle is not None and not self.core.draining:
            self.oracle.observe(request.request_id, self.core.role.value, self.pod_name, self.mirror,
                                request.token_ids, request.cache_salt or None)
        reply = await super().Prefill(request, context)
        if self.oracle is not None:
            self.oracle.complete(request.request_id, self.pod_name, reply.num_cached_tokens)
        if reply.HasField("kv_handle") and self.faults.lease_expires():
            self._drop_lease(request.request_id, expired=True)
        return reply

    async def Decode(self, request: pb.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DecodeResponse]:
        self.calls["Decode"] += 1
        if self.faults.rpc_fails("Decode"):
            yield _unavailable(f"injected fault: Decode refused on {self.pod_name}")
            return
        computes_prompt = not request.HasField("kv_handle")
        if computes_prompt and self.oracle is not None and not self.core.draining:
            n_prompt = request.num_prompt_tokens or len(request.token_ids)
            self.oracle.observe(request.request_id, self.core.role.value, self.pod_name, self.mirror,
                                request.token_ids[:n_prompt], request.cache_salt or None)
        breaks = self.faults.decode_breaks()
        events = super().Decode(request, context)
        try:
            async for event in events:
                if breaks:
                    chunk = decode_tokens(event)
                    if chunk is not None:
                        yield pb.DecodeResponse(chunk=chunk)
                        yield _unavailable(f"injected fault: decode pod {self.pod_name} lost mid-stream")
                        return
                if event.HasField("finished") and computes_prompt and self.oracle is not None:
                    self.oracle.complete(request.request_id, self.pod_name, event.finished.num_cached_tokens)
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]  # aborts the engine request if unfinished

    async def ClaimKV(self, request: pb.ClaimKVRequest, context: grpc.aio.ServicerContext) -> pb.ClaimKVResponse:
        await self._maybe_fail("ClaimKV", context)
        if self.core.prefill_handler is not None and self.faults.prefill_dies():
            self._drop_lease(request.request_id, expired=False)
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"injected fault: prefill pod {self.pod_name} died before the handoff")
        return await super().ClaimKV(request, context)

    async def ReleaseKV(self, request: pb.ReleaseKVRequest,
                        context: grpc.aio.ServicerContext) -> pb.ReleaseKVResponse:
        await self._maybe_fail("ReleaseKV", context)
        return await super().ReleaseKV(request, context)

    async def GetTransferMetadata(self, request: pb.GetTransferMetadataRequest,
                                  context: grpc.aio.ServicerContext) -> pb.TransferMetadata:
        await self._maybe_fail("GetTransferMetadata", context)
        return await super().GetTransferMetadata(request, context)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        await self._maybe_fail("Abort", context)
        return await super().Abort(request, context)

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.LoadReport:
        await self._maybe_fail("GetLoad", context)
        return await super().GetLoad(request, context)

    def _drop_lease(self, request_id: str, expired: bool) -> None:
        handler = self.core.prefill_handler
        if handler is not None and handler.release(request_id) and expired:
            handler.leases.counters.expired += 1


def _unavailable(message: str) -> pb.DecodeResponse:
    return pb.DecodeResponse(error=pb.Error(code="UNAVAILABLE", message=message))
