"""gRPC ``splitserve.v1.Engine`` servicer: converts messages, calls ``PodCore``.

Unary RPCs answer a ``PodError`` with its status code (INVALID_ARGUMENT,
NOT_FOUND, FAILED_PRECONDITION, UNAVAILABLE). Decode answers it with an
``error`` event that ends the stream (the RPC itself ends OK), so a client
sees refusals before and after the first token the same way. DecodeStream
and PrefillStream carry many Decodes or Prefills (``StreamMultiplexer``) and
answer each as its own call would, tagged. Unexpected exceptions become
INTERNAL without details leaking beyond the message.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from splitserve.engine.block_hash import BLOCK_HASH_VERSION
from splitserve.engine.block_pool import KVCacheEvents
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.pod.core import PodCore
from splitserve.pod.start_context import StartAborted, StartContext
from splitserve.pod.stream_multiplexer import (DECODE_STREAM, DECODE_STREAM_MARKER, PREFILL_STREAM,
                                               PREFILL_STREAM_MARKER, StreamMultiplexer)
from splitserve.pod.load_stream import events_with_load
from splitserve.pod.messages import DecodeChunk, KVHandle, KVSource, LoadSnapshot, PodError, Role
from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.proto import splitserve_v1_pb2_grpc as pb_grpc
from splitserve.pod.proto_convert import (finish_reason_to_proto, logprobs_to_proto, prompt_logprobs_to_proto,
                                          sampling_from_proto)

logger = logging.getLogger(__name__)

_ROLES = {Role.PREFILL: pb.ROLE_PREFILL, Role.DECODE: pb.ROLE_DECODE, Role.UNIFIED: pb.ROLE_UNIFIED}
_SOURCES = {KVSource.PULLED: pb.KV_SOURCE_PULLED, KVSource.LOCAL: pb.KV_SOURCE_LOCAL,
            KVSource.RECOMPUTED: pb.KV_SOURCE_RECOMPUTED}


def _sampling(message: pb.SamplingParams) -> SamplingParams:
    try:
        return sampling_from_proto(message)
    except (InvalidRequestError, ValueError) as exc:
        raise PodError("INVALID_ARGUMENT", f"bad sampling parameters: {exc}") from None


def handle_from_proto(m: pb.KVHandle) -> KVHandle:
    return KVHandle(m.request_id, m.peer_address, m.agent_name, m.incarnation_id, tuple(m.block_ids),
                    m.num_tokens, m.lease_deadline_unix)


def handle_to_proto(h: KVHandle) -> pb.KVHandle:
    return pb.KVHandle(request_id=h.request_id, peer_address=h.peer_address, agent_name=h.agent_name,
                       incarnation_id=h.incarnation_id, block_ids=h.block_ids, num_tokens=h.num_tokens,
                       lease_deadline_unix=h.lease_deadline_unix)


async def _fail(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, PodError):
        await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)
    logger.exception("unexpected error in an RPC")
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


def load_report(s: LoadSnapshot) -> pb.LoadReport:
    return pb.LoadReport(
        role=_ROLES[s.role], incarnation_id=s.incarnation_id, num_running=s.num_running,
        num_waiting=s.num_waiting, num_waiting_for_remote_kv=s.num_waiting_for_remote_kv,
        queued_prompt_tokens=s.queued_prompt_tokens, num_free_blocks=s.num_free_blocks,
        num_total_blocks=s.num_total_blocks, kv_cache_usage=s.kv_cache_usage, block_size=s.block_size,
        num_leased_blocks=s.num_leased_blocks)


def _kv_batch(batch: KVCacheEvents) -> pb.KVEventBatch:
    return pb.KVEventBatch(stored_block_hashes=list(batch.stored_block_hashes),
                           removed_block_hashes=list(batch.removed_block_hashes),
                           all_cleared=batch.all_cleared, block_hash_version=BLOCK_HASH_VERSION)


async def _multiplexed(mux: StreamMultiplexer, requests: AsyncIterator[object]) -> AsyncIterator[object]:
    """``mux``'s batches while it reads ``requests``; its requests abort when the stream ends."""
    reader = asyncio.get_running_loop().create_task(mux.feed(requests))
    try:
        async for batch in mux.responses():
            yield batch
    finally:
        reader.cancel()
        await mux.close()


class PodServicer(pb_grpc.EngineServicer):
    def __init__(self, core: PodCore) -> None:
        self.core = core

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        try:
            r = await self.core.prefill(request.request_id, list(request.token_ids), _sampling(request.sampling),
                                        request.cache_salt or None)
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await _fail(context, exc)
            raise
        reply = pb.PrefillResponse(first_token_id=r.first_token_id, finish_reason=finish_reason_to_proto(
            r.finish_reason), num_prompt_tokens=r.num_prompt_tokens, num_cached_tokens=r.num_cached_tokens,
            prompt_logprobs=prompt_logprobs_to_proto(r.prompt_logprobs))
        if r.first_logprobs is not None:
            reply.first_logprobs.CopyFrom(logprobs_to_proto(r.first_logprobs))
        if r.kv_handle is not None:
            reply.kv_handle.CopyFrom(handle_to_proto(r.kv_handle))
        return reply

    async def Decode(self, request: pb.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DecodeResponse]:
        # A last chunk waits for its Finished (which follows at once) when the
        # caller reads Finished.last_chunk: one message fewer per request.
        held: pb.TokenChunk | None = None
        try:
            handle = handle_from_proto(request.kv_handle) if request.HasField("kv_handle") else None
            events = self.core.decode(request.request_id, list(request.token_ids), request.num_prompt_tokens,
                                      _sampling(request.sampling), handle, request.cache_salt or None)
            async for event in events:
                if isinstance(event, DecodeChunk):
                    chunk = pb.TokenChunk(
                        token_ids=event.token_ids, logprobs=[logprobs_to_proto(lp) for lp in event.logprobs],
                        prompt_logprobs=prompt_logprobs_to_proto(event.prompt_logprobs))
                    if event.last and request.accept_last_chunk:
                        held = chunk
                    else:
                        yield pb.DecodeResponse(chunk=chunk)
                else:
                    finished = pb.Finished(
                        reason=finish_reason_to_proto(event.reason), num_prompt_tokens=event.num_prompt_tokens,
                        num_output_tokens=event.num_output_tokens, num_cached_tokens=event.num_cached_tokens,
                        kv_source=_SOURCES[event.kv_source], num_pulled_blocks=event.num_pulled_blocks,
                        num_pulled_bytes=event.num_pulled_bytes)
                    if held is not None:
                        finished.last_chunk.CopyFrom(held)
                        held = None
                    yield pb.DecodeResponse(finished=finished)
        except PodError as exc:
            if held is not None:
                yield pb.DecodeResponse(chunk=held)
            yield pb.DecodeResponse(error=pb.Error(code=exc.code, message=exc.message))
        except Exception as exc:  # noqa: BLE001 - reported in-stream
            logger.exception("unexpected error in Decode")
            if held is not None:
                yield pb.DecodeResponse(chunk=held)
            message = f"internal error: {type(exc).__name__}"
            yield pb.DecodeResponse(error=pb.Error(code="INTERNAL", message=message))

    async def DecodeStream(self, request_iterator: AsyncIterator[pb.DecodeStreamRequest],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DecodeStreamResponse]:
        # Each start runs ``self.Decode`` (a subclass's too), which answers
        # every failure in-stream and never aborts ``context``: the stream is
        # shared, so one request's refusal must not end the others.
        await context.send_initial_metadata((DECODE_STREAM_MARKER,))  # the caller writes only after it
        mux = StreamMultiplexer(lambda request: self.Decode(request, context), DECODE_STREAM)
        async for batch in _multiplexed(mux, request_iterator):
            yield batch

    async def PrefillStream(self, request_iterator: AsyncIterator[pb.PrefillStreamRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PrefillStreamResponse]:
        # Each start runs ``self.Prefill`` (a subclass's too) with a context
        # whose abort answers that request alone.
        await context.send_initial_metadata((PREFILL_STREAM_MARKER,))
        start_context = StartContext(context)

        async def prefill(request: pb.PrefillRequest) -> AsyncIterator[pb.PrefillEvent]:
            try:
                reply = await self.Prefill(request, start_context)  # type: ignore[arg-type]
            except StartAborted as exc:
                yield pb.PrefillEvent(error=pb.Error(code=exc.code.name, message=exc.details))
                return
            yield pb.PrefillEvent(response=reply)

        mux = StreamMultiplexer(prefill, PREFILL_STREAM)
        async for batch in _multiplexed(mux, request_iterator):
            yield batch

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        if not self.core.abort(request.request_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no request {request.request_id!r} on this pod")
        return pb.AbortResponse(found=True)

    async def GetTransferMetadata(self, request: pb.GetTransferMetadataRequest,
                                  context: grpc.aio.ServicerContext) -> pb.TransferMetadata:
        try:
            m = self.core.transfer_metadata()
        except Exception as exc:  # noqa: BLE001
            await _fail(context, exc)
            raise
        layout = m.layout
        return pb.TransferMetadata(
            protocol_version=m.protocol_version, incarnation_id=m.incarnation_id, agent_name=m.agent_name,
            agent_metadata=m.agent_metadata, model_fingerprint=m.model_fingerprint,
            block_hash_version=m.block_hash_version, base_address=m.base_address, encoded=m.to_bytes(),
            layout=pb.KVLayout(num_blocks=layout.num_blocks, num_layers=layout.num_layers,
                               block_size=layout.block_size, num_kv_heads=layout.num_kv_heads,
                               head_dim=layout.head_dim, dtype=layout.dtype))

    async def ClaimKV(self, request: pb.ClaimKVRequest, context: grpc.aio.ServicerContext) -> pb.ClaimKVResponse:
        try:
            return pb.ClaimKVResponse(block_ids=self.core.claim_kv(request.request_id, request.incarnation_id))
        except Exception as exc:  # noqa: BLE001
            await _fail(context, exc)
            raise

    async def ReleaseKV(self, request: pb.ReleaseKVRequest,
                        context: grpc.aio.ServicerContext) -> pb.ReleaseKVResponse:
        try:
            return pb.ReleaseKVResponse(found=self.core.release_kv(request.request_id))
        except Exception as exc:  # noqa: BLE001
            await _fail(context, exc)
            raise

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.LoadReport:
        return load_report(self.core.load())

    async def StreamKVEvents(self, request: pb.StreamKVEventsRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.KVEventBatch]:
        try:
            events = self.core.kv_events(request.event_interval_ms / 1000)
        except Exception as exc:  # noqa: BLE001
            await _fail(context, exc)
            raise
        if not request.load_interval_ms:
            async for batch in events:
                yield _kv_batch(batch)
            return
        async for batch, load in events_with_load(events, self.core.load, request.load_interval_ms / 1000,
                                                  request.load_heartbeat_ms / 1000):
            message = _kv_batch(batch) if batch is not None else pb.KVEventBatch(
                block_hash_version=BLOCK_HASH_VERSION)
            message.load.CopyFrom(load_report(load))
            yield message
