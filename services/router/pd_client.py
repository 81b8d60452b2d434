"""A thin grpc.aio client of one pod's ``Engine`` service.

Converts protobuf to the router's dataclasses (through ``proto_convert``) and
gRPC failures to ``PodCallError``; holds no request state but the routing of
the pod's shared DecodeStream and PrefillStream (``tagged_stream_client``). The orchestrator
and the pod watcher are its only users.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import grpc

from splitserve.engine.block_hash import BlockHash
from splitserve.grpc_limits import MAX_MESSAGE_BYTES
from splitserve.grpc_tls import GrpcTLS, aio_channel
from splitserve.engine.request import TokenLogprobs
from splitserve.engine.sampling_params import SamplingParams
from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.proto import splitserve_v1_pb2_grpc as pb_grpc
from splitserve.pod.proto_convert import (decode_tokens, finish_reason_from_proto, logprobs_from_proto,
                                      logprobs_list_from_proto, prompt_logprobs_from_proto, sampling_to_proto)
from splitserve.router.backend import BackendError
from splitserve.router.tagged_stream_client import (DECODE_STREAM, PREFILL_STREAM, TaggedStreamClient,
                                                   TaggedStreamError, TaggedStreamUnsupported)
from splitserve.router.pod_state import PodLoad

logger = logging.getLogger(__name__)

# A frozen pod (SIGSTOP, a hung node) keeps its TCP connection open and a
# Decode stream has no deadline: only an unanswered keepalive ping ends it
# (UNAVAILABLE, then the mid-stream failover), within about 10 s. gRPC waits
# for a ping's ack for ``ping_timeout_ms`` (default 60 s), not only for
# ``keepalive_timeout_ms``: both are set (measured: 60.1 s -> 5.1 s after the
# freeze). The pods' servers accept pings this often (``pod.server``).
_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
)

KV_SOURCES = {pb.KV_SOURCE_PULLED: "pulled", pb.KV_SOURCE_LOCAL: "local",
              pb.KV_SOURCE_RECOMPUTED: "recomputed"}
ROLES = {pb.ROLE_PREFILL: "prefill", pb.ROLE_DECODE: "decode", pb.ROLE_UNIFIED: "unified"}


class PodCallError(BackendError):
    """An RPC to a pod failed. ``code`` is the gRPC status (a Decode stream's
    ``Error`` event is turned into one too)."""

    def __init__(self, pod: str, rpc: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{rpc} on pod {pod} failed with {code.name}: {message}")
        self.pod = pod
        self.rpc = rpc
        self.code = code
        self.details = message


@dataclass(frozen=True)
class PrefillResult:
    """The prefill pod's answer. ``kv_handle`` is None when token 0 already
    finished the request (then ``finish_reason`` is set). ``prompt_logprobs``
    (None for token 0, then one per prompt token) when they were asked."""

    first_token_id: int
    first_logprobs: TokenLogprobs | None
    kv_handle: pb.KVHandle | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None


@dataclass(frozen=True)
class DecodeChunk:
    """New tokens; ``prompt_logprobs`` on token 0's chunk when the pod
    computed the prompt and they were asked."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] | None
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None


@dataclass(frozen=True)
class DecodeFinished:
    """The stream's last event. ``kv_source``: pulled, local or recomputed."""

    reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    kv_source: str | None
    num_pulled_blocks: int
    num_pulled_bytes: int


DecodeEvent = DecodeChunk | DecodeFinished


@dataclass(frozen=True)
class LoadSnapshot:
    """A pod's ``GetLoad`` answer: the routing view (``load``) plus the rest."""

    role: str | None
    incarnation_id: str
    load: PodLoad
    kv_cache_usage: float
    block_size: int
    num_leased_blocks: int
    num_waiting_for_remote_kv: int

    @property
    def num_used_blocks(self) -> int:
        return self.load.total_blocks - self.load.free_blocks


@dataclass(frozen=True)
class KVEvents:
    """One batch of a pod's prefix-cache events (``cleared``: forget all
    first), with the pod's load when the stream was asked for it."""

    stored: tuple[BlockHash, ...]
    removed: tuple[BlockHash, ...]
    cleared: bool
    load: LoadSnapshot | None = None


class PodClient:
    """One channel to one pod (``address`` = host:port, also the pod's id).

    Decodes share one ``DecodeStream`` per pod and prefills one
    ``PrefillStream`` (``multiplex``; a pod without them gets a call per
    request, found out on first use: ``multiplex`` / ``multiplex_prefill``
    turn False).

    Every method raises ``PodCallError`` on a gRPC failure; cancelling the
    awaiting task cancels the RPC (the pod sees the cancellation).
    """

    def __init__(self, address: str, channel: grpc.aio.Channel | None = None, tls: GrpcTLS | None = None,
                 multiplex: bool = True) -> None:
        self.address = address
        self._channel = channel or aio_channel(address, tls, _CHANNEL_OPTIONS)
        self._stub = pb_grpc.EngineStub(self._channel)
        self.multiplex = multiplex
        self.multiplex_prefill = multiplex
        self._decode_stream = TaggedStreamClient(DECODE_STREAM.opener(self._channel), DECODE_STREAM)
        self._prefill_stream = TaggedStreamClient(PREFILL_STREAM.opener(self._channel), PREFILL_STREAM)

    async def close(self) -> None:
        await self._decode_stream.close()
        await self._prefill_stream.close()
        await self._channel.close()

    async def prefill(self, request_id: str, token_ids: tuple[int, ...], sampling: SamplingParams,
                      cache_salt: str | None = None, timeout: float | None = None) -> PrefillResult:
        message = pb.PrefillRequest(request_id=request_id, token_ids=token_ids,
                                    sampling=sampling_to_proto(sampling), cache_salt=cache_salt or "")
        response = await self._prefill_response(message, timeout)
        return PrefillResult(
            first_token_id=response.first_token_id,
            first_logprobs=(logprobs_from_proto(response.first_logprobs)
                            if response.HasField("first_logprobs") else None),
            kv_handle=response.kv_handle if response.HasField("kv_handle") else None,
            finish_reason=finish_reason_from_proto(response.finish_reason),
            num_prompt_tokens=response.num_prompt_tokens,
            num_cached_tokens=response.num_cached_tokens,
            prompt_logprobs=(prompt_logprobs_from_proto(response.prompt_logprobs)
                             if sampling.prompt_logprobs is not None else None))

    async def _prefill_response(self, message: pb.PrefillRequest, timeout: float | None) -> pb.PrefillResponse:
        """The pod's answer over its shared PrefillStream, or a Prefill call of
        its own when it has none (or ``multiplex`` is off)."""
        if self.multiplex_prefill:
            try:
                first = _first_event(self._prefill_stream.events(message))
                event = await (first if timeout is None else asyncio.wait_for(first, timeout))
            except TaggedStreamUnsupported:  # before any answer: the call below is the first try
                logger.info("pod %s has no PrefillStream (an older version): one Prefill call per request",
                            self.address)
                self.multiplex_prefill = False
            except TaggedStreamError as exc:
                raise PodCallError(self.address, "Prefill", exc.code, exc.details) from None
            except asyncio.TimeoutError:  # (TimeoutError from 3.11) the pod got the stream's cancel of it
                raise PodCallError(self.address, "Prefill", grpc.StatusCode.DEADLINE_EXCEEDED,
                                   "Deadline Exceeded") from None
            else:
                if event.WhichOneof("event") == "error":
                    raise self._in_stream_error("Prefill", event.error)
                return event.response
        try:
            return await self._stub.Prefill(message, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error("Prefill", exc) from None

    async def decode(self, request_id: str, token_ids: tuple[int, ...], num_prompt_tokens: int,
                     sampling: SamplingParams, kv_handle: pb.KVHandle | None = None,
                     cache_salt: str | None = None) -> AsyncIterator[DecodeEvent]:
        """Stream a Decode; closing the iterator cancels the request on the pod."""
        message = pb.DecodeRequest(request_id=request_id, token_ids=token_ids,
                                   num_prompt_tokens=num_prompt_tokens,
                                   sampling=sampling_to_proto(sampling), cache_salt=cache_salt or "",
                                   accept_last_chunk=True)
        if kv_handle is not None:
            message.kv_handle.CopyFrom(kv_handle)
        # The pod samples token 0 (and computes prompt logprobs) only when no
        # output token came along.
        wants_prompt_logprobs = (sampling.prompt_logprobs is not None
                                 and num_prompt_tokens in (0, len(token_ids)))
        while True:
            # The shared stream, or a Decode call of its own when the pod has
            # no DecodeStream (or ``multiplex`` is off).
            responses = self._decode_stream.events(message) if self.multiplex else self._decode_call(message)
            async with aclosing(responses) as stream:
                try:
                    async for response in stream:
                        kind = response.WhichOneof("event")
                        chunk = decode_tokens(response)
                        if chunk is not None:
                            prompt_logprobs = None
                            if wants_prompt_logprobs and len(chunk.token_ids):
                                prompt_logprobs = prompt_logprobs_from_proto(chunk.prompt_logprobs)
                                wants_prompt_logprobs = False
                            yield DecodeChunk(tuple(chunk.token_ids),
                                              tuple(logprobs_list_from_proto(chunk.logprobs))
                                              if len(chunk.logprobs) else None, prompt_logprobs)
                        if kind == "finished":
                            yield _finished(response.finished)
                            return
                        elif kind == "error":
                            raise self._in_stream_error("Decode", response.error)
                    raise PodCallError(self.address, "Decode", grpc.StatusCode.UNAVAILABLE,
                                       "the stream ended without a Finished event")
                except TaggedStreamUnsupported:  # before any event: nothing was sent to the client
                    logger.info("pod %s has no DecodeStream (an older version): one Decode call per request",
                                self.address)
                    self.multiplex = False
                except TaggedStreamError as exc:
                    raise PodCallError(self.address, "Decode", exc.code, exc.details) from None
                except grpc.aio.AioRpcError as exc:
                    raise self._error("Decode", exc) from None

    async def _decode_call(self, message: pb.DecodeRequest) -> AsyncIterator[pb.DecodeResponse]:
        """The request's responses over a Decode call of its own."""
        call = self._stub.Decode(message)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()  # a no-op once the stream is done

    async def abort(self, request_id: str, timeout: float = 5.0) -> bool:
        try:
            response = await self._stub.Abort(pb.AbortRequest(request_id=request_id), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise self._error("Abort", exc) from None
        return bool(response.found)

    async def get_load(self, timeout: float = 1.0) -> LoadSnapshot:
        try:
            r: pb.LoadReport = await self._stub.GetLoad(pb.GetLoadRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error("GetLoad", exc) from None
        return load_snapshot(r)

    async def kv_events(self, load_interval_s: float = 0.0, load_heartbeat_s: float = 0.0,
                        event_interval_s: float = 0.0) -> AsyncIterator[KVEvents]:
        """The pod's prefix-cache events until the stream breaks
        (``PodCallError``). With ``load_interval_s``, ask for the pod's load
        on the stream too (changes at most that often, unchanged at least
        every ``load_heartbeat_s``); a pod that predates it sends none. With
        ``event_interval_s``, ask for events at most that often, merged (an
        older pod sends each step's at once)."""
        call = self._stub.StreamKVEvents(pb.StreamKVEventsRequest(
            load_interval_ms=round(load_interval_s * 1000), load_heartbeat_ms=round(load_heartbeat_s * 1000),
            event_interval_ms=round(event_interval_s * 1000)))
        try:
            async for batch in call:
                yield KVEvents(tuple(batch.stored_block_hashes), tuple(batch.removed_block_hashes),
                               batch.all_cleared, load_snapshot(batch.load) if batch.HasField("load") else None)
        except grpc.aio.AioRpcError as exc:
            raise self._error("StreamKVEvents", exc) from None
        finally:
            call.cancel()

    def _error(self, rpc: str, exc: grpc.aio.AioRpcError) -> PodCallError:
        return PodCallError(self.address, rpc, exc.code(), exc.details() or "")

    def _in_stream_error(self, rpc: str, error: pb.Error) -> PodCallError:
        """An ``Error`` event (a status a call would have ended with, by name)."""
        return PodCallError(self.address, rpc, getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN),
                            error.message)


async def _first_event(events: AsyncIterator[pb.PrefillEvent]) -> pb.PrefillEvent:
    async with aclosing(events) as stream:  # type: ignore[type-var]
        async for event in stream:
            return event
    raise TaggedStreamError(grpc.StatusCode.UNAVAILABLE, "the PrefillStream gave no answer")


def load_snapshot(r: pb.LoadReport) -> LoadSnapshot:
    load = PodLoad(queued_prompt_tokens=r.queued_prompt_tokens, running_seqs=r.num_running,
                   waiting_seqs=r.num_waiting + r.num_waiting_for_remote_kv,
                   free_blocks=r.num_free_blocks, total_blocks=r.num_total_blocks)
    return LoadSnapshot(role=ROLES.get(r.role), incarnation_id=r.incarnation_id, load=load,
                        kv_cache_usage=r.kv_cache_usage, block_size=r.block_size,
                        num_leased_blocks=r.num_leased_blocks,
                        num_waiting_for_remote_kv=r.num_waiting_for_remote_kv)


def _finished(message: pb.Finished) -> DecodeFinished:
    return DecodeFinished(
        reason=finish_reason_from_proto(message.reason),
        num_prompt_tokens=message.num_prompt_tokens,
        num_output_tokens=message.num_output_tokens,
        num_cached_tokens=message.num_cached_tokens,
        kv_source=KV_SOURCES.get(message.kv_source),
        num_pulled_blocks=message.num_pulled_blocks,
        num_pulled_bytes=message.num_pulled_bytes)
