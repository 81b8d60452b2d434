"""The transport-free core of an engine pod: what every RPC does.

The gRPC servicer converts messages and calls these methods; unit tests call
them directly with two cores in one process (``FakeTransport`` + a local peer
client). Everything runs on one asyncio loop, which is also the only thread
touching the KV transport and the lease table; the engine runs on its own
thread behind ``AsyncEngine``.

Roles: a *prefill* pod serves Prefill (leasing the prompt's blocks), ClaimKV,
ReleaseKV and the handshake; a *decode* pod serves Decode (pulling KV named by
a handle, or computing locally without one); a *unified* pod serves Decode
without handles and refuses Prefill (FAILED_PRECONDITION: it has no KV
transport to hand blocks over). Every role serves Abort, GetLoad and
StreamKVEvents. Refusals raise ``PodError``.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from splitserve.decode.kv_puller import KVPuller
from splitserve.decode.peer_client import PeerClient
from splitserve.decode.peer_directory import PeerDirectory
from splitserve.engine.async_engine import AsyncEngine, EngineDeadError
from splitserve.engine.block_pool import KVCacheEvents
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kvtransfer import IncompatiblePeerError, KVTransport, LeaseNotFoundError, TransferMetadata
from splitserve.pod_config import PodConfig
from splitserve.pod_messages import (
    DecodeChunk, DecodeEvent, DecodeFinished, KVHandle, KVSource, LoadSnapshot, PrefillResult, Role,
    failed_precondition, invalid, not_found, unavailable,
)
from splitserve.pod_metrics import MetricSources, PodMetrics
from splitserve.pod_timing import RequestTimer
from splitserve.prefill.lease_keeper import LeaseKeeper

logger = logging.getLogger(__name__)


@dataclass
class _Active:
    """A Prefill or Decode call in progress on this pod."""

    kind: str
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    pulling: bool = False


class PodCore:
    def __init__(self, config: PodConfig, engine: AsyncEngine, transport: KVTransport | None = None,
                 peer_client: PeerClient | None = None) -> None:
        self.config = config
        self.role = config.role
        self.engine = engine
        self.transport = transport
        self.peer_client = peer_client
        if self.role is not Role.UNIFIED and transport is None:
            raise ValueError(f"a {self.role.value} pod needs a KV transport")
        if self.role is Role.DECODE and peer_client is None:
            raise ValueError("a decode pod needs a peer client (to reach prefill pods)")
        self.incarnation_id = transport.local_metadata().incarnation_id if transport else uuid.uuid4().hex
        self.leases = (LeaseKeeper(engine, transport, config.kv_lease_seconds, config.kv_claim_timeout_s)
                       if self.role is Role.PREFILL and transport is not None else None)
        self.metrics = PodMetrics(MetricSources(
            engine_stats=engine.stats,
            transport=lambda: transport.metrics if transport is not None else None,
            leased_blocks=lambda: self.leases.table.num_leased_blocks if self.leases else 0,
            leases_expired=lambda: self.leases.counters.expired if self.leases else 0,
            transfer_failures=lambda: self.puller.counters.failures if self.puller else 0,
        ))
        self.puller: KVPuller | None = None
        if self.role is Role.DECODE and transport is not None and peer_client is not None:
            self.puller = KVPuller(engine, transport, PeerDirectory(transport, peer_client), peer_client,
                                   config.kv_transfer_timeout_s,
                                   observe_seconds=self.metrics.kv_transfer_seconds.observe)
        self.draining = False
        self._active: dict[str, _Active] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        if self.leases is not None:
            self.leases.start()

    # -- Prefill ---------------------------------------------------------------

    async def prefill(self, request_id: str, token_ids: Sequence[int], sampling: SamplingParams,
                      cache_salt: str | None = None) -> PrefillResult:
        """Compute the prompt, sample token 0, lease the blocks for a decoder."""
        self._check_serving()
        if self.leases is None:
            raise failed_precondition(f"a {self.role.value} pod does not serve Prefill; send it to a prefill pod")
        active = self._begin(request_id, "prefill")
        timer = RequestTimer(self.metrics)
        stream: AsyncIterator | None = None
        try:
            stream = await self._submit(request_id, token_ids, sampling, cache_salt=cache_salt, prefill_only=True)
            tokens, logprobs = [], []
            handle: KVHandle | None = None
            async for out in stream:
                timer.on_output(len(out.new_token_ids))
                tokens += out.new_token_ids
                logprobs += out.new_logprobs
                if not out.finished:
                    continue
                reason = out.finish_reason
                if reason is None and active.abort.is_set():
                    reason = "abort"  # Abort raced the handoff; the engine drops the held blocks
                elif reason is None and out.held_block_ids:
                    # No await between the handoff output and the lease: an Abort sees one or the other.
                    _lease, deadline = self.leases.reserve(request_id, out.held_block_ids)
                    handle = KVHandle(request_id, self.config.address, self.config.transfer_agent_name,
                                      self.incarnation_id, tuple(out.held_block_ids), out.num_held_tokens,
                                      deadline)
                timer.on_finish(reason if reason is not None and handle is None else None)
                return PrefillResult(tokens[0] if tokens else 0, logprobs[0] if logprobs else None, handle,
                                     reason, out.num_prompt_tokens, out.num_cached_tokens)
            raise unavailable(f"the engine ended request {request_id!r} without a result; retry elsewhere")
        finally:
            if stream is not None:
                await stream.aclose()  # type: ignore[attr-defined]
            self._end(request_id)

    def claim_kv(self, request_id: str, incarnation_id: str) -> tuple[int, ...]:
        if self.leases is None:
            raise failed_precondition(f"a {self.role.value} pod holds no KV leases")
        if incarnation_id and incarnation_id != self.incarnation_id:
            raise not_found(f"KV handle of {request_id!r} is from incarnation {incarnation_id}; this pod "
                            f"restarted (now {self.incarnation_id}) and its blocks are gone")
        try:
            return self.leases.claim(request_id)
        except LeaseNotFoundError as exc:
            raise not_found(str(exc)) from None

    def release_kv(self, request_id: str) -> bool:
        if self.leases is None:
            raise failed_precondition(f"a {self.role.value} pod holds no KV leases")
        if not self.leases.release(request_id):
            raise not_found(f"no KV lease for request {request_id!r} (released, expired or unknown)")
        return True

    def transfer_metadata(self) -> TransferMetadata:
        if self.transport is None:
            raise failed_precondition(f"a {self.role.value} pod has no KV transport")
        return self.transport.local_metadata()

    # -- Decode ----------------------------------------------------------------

    async def decode(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: int,
                     sampling: SamplingParams, kv_handle: KVHandle | None = None,
                     cache_salt: str | None = None) -> AsyncIterator[DecodeEvent]:
        """Stream chunks then one ``DecodeFinished``. ``num_prompt_tokens`` 0
        means every token is prompt. Closing the iterator aborts the request."""
        self._check_serving()
        if self.role is Role.PREFILL:
            raise failed_precondition("a prefill pod does not serve Decode; send it to a decode pod")
        if not token_ids:
            raise invalid("the prompt is empty: send at least one token")
        n_prompt = num_prompt_tokens or len(token_ids)
        if not 0 < n_prompt <= len(token_ids):
            raise invalid(f"num_prompt_tokens={num_prompt_tokens} must be in [1, {len(token_ids)}]")
        if kv_handle is not None:
            self._check_handle(kv_handle)
        active = self._begin(request_id, "decode")
        finished = False
        stream: AsyncIterator | None = None
        try:
            timer = RequestTimer(self.metrics)
            stream = await self._submit(request_id, token_ids[:n_prompt], sampling,
                                        output_token_ids=token_ids[n_prompt:], cache_salt=cache_salt,
                                        num_remote_tokens=kv_handle.num_tokens if kv_handle else 0)
            source, blocks, nbytes = KVSource.LOCAL, 0, 0
            async for out in stream:
                timer.on_output(len(out.new_token_ids))
                if out.remote_kv_load is not None and kv_handle is not None:
                    active.pulling = True
                    try:
                        outcome = await self.puller.pull(kv_handle, out.remote_kv_load, active.abort)
                    except IncompatiblePeerError as exc:
                        raise failed_precondition(str(exc)) from None
                    finally:
                        active.pulling = False
                    source, blocks, nbytes = outcome.source, outcome.num_blocks, outcome.num_bytes
                    if outcome.aborted or active.abort.is_set():
                        self.engine.abort(request_id)
                if out.new_token_ids:
                    yield DecodeChunk(list(out.new_token_ids), list(out.new_logprobs))
                if out.finished:
                    finished = True
                    timer.on_finish(out.finish_reason)
                    yield DecodeFinished(out.finish_reason or "abort", out.num_prompt_tokens,
                                         out.num_output_tokens, out.num_cached_tokens, source, blocks, nbytes)
                    return
        finally:
            if not finished:
                self.engine.abort(request_id)  # idempotent; no READ is in flight here (see KVPuller)
            if stream is not None:
                await stream.aclose()  # type: ignore[attr-defined]
            self._end(request_id)

    def _check_handle(self, handle: KVHandle) -> None:
        if self.puller is None:
            raise failed_precondition(f"a {self.role.value} pod cannot pull KV; send the request without "
                                      "kv_handle or to a decode pod")
        if handle.num_tokens < 1:
            raise invalid("kv_handle.num_tokens must be >= 1")
        # Too few block ids for num_tokens is judged after the handshake (a peer
        # with another block size must be refused as such) and recomputes.
        if not handle.peer_address or not handle.agent_name:
            raise invalid("kv_handle needs peer_address and agent_name")

    # -- any role --------------------------------------------------------------

    def abort(self, request_id: str) -> bool:
        """Abort a Prefill/Decode in progress and/or drop a lease; False if unknown."""
        found = False
        active = self._active.get(request_id)
        if active is not None:
            found = True
            active.abort.set()
            if not active.pulling:  # a pull in flight aborts once its READ has ended
                self.engine.abort(request_id)
        if self.leases is not None and self.leases.release(request_id):
            found = True
        return found

    def load(self) -> LoadSnapshot:
        s = self.engine.stats()
        sched = s.scheduler
        return LoadSnapshot(self.role, self.incarnation_id, sched.num_running, sched.num_waiting,
                            sched.num_waiting_for_remote_kv, sched.queued_prompt_tokens, sched.num_free_blocks,
                            sched.num_total_blocks, sched.kv_cache_usage, s.block_size,
                            self.leases.table.num_leased_blocks if self.leases else 0)

    def kv_events(self) -> AsyncIterator[KVCacheEvents]:
        hub = getattr(self.engine, "kv_events", None)
        if hub is None:
            raise failed_precondition("this pod's engine does not publish KV events")
        return hub.subscribe()

    # -- lifetime --------------------------------------------------------------

    async def drain(self, grace_seconds: float) -> None:
        """Refuse new calls (UNAVAILABLE), let running ones finish for up to
        ``grace_seconds``, then abort the rest and wait for them to end."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace_seconds)
        except asyncio.TimeoutError:
            logger.warning("aborting %d request(s) still running after %.0fs", len(self._active), grace_seconds)
            for request_id in list(self._active):
                self.abort(request_id)
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=self.config.kv_transfer_timeout_s + 5)
            except asyncio.TimeoutError:
                logger.error("%d request(s) did not end after abort", len(self._active))

    async def close(self) -> None:
        """Release leases, stop the engine thread, close the transport."""
        if self.leases is not None:
            await self.leases.stop()
        if self.puller is not None:
            await self.puller.drain()
        if self.peer_client is not None:
            await self.peer_client.close()
        await asyncio.to_thread(self.engine.shutdown)
        if self.transport is not None:
            self.transport.close()

    # -- helpers ---------------------------------------------------------------

    def _check_serving(self) -> None:
        if self.draining:
            raise unavailable("this pod is shutting down; retry on another pod")

    def _begin(self, request_id: str, kind: str) -> _Active:
        if not request_id:
            raise invalid("request_id must be non-empty")
        if request_id in self._active:
            raise invalid(f"request id {request_id!r} is already running on this pod")
        active = self._active[request_id] = _Active(kind)
        self._idle.clear()
        return active

    def _end(self, request_id: str) -> None:
        self._active.pop(request_id, None)
        if not self._active:
            self._idle.set()

    async def _submit(self, request_id: str, token_ids: Sequence[int], sampling: SamplingParams,
                      **kwargs: object) -> AsyncIterator:
        try:
            return await self.engine.submit(request_id, token_ids, sampling, **kwargs)  # type: ignore[arg-type]
        except InvalidRequestError as exc:
            raise invalid(str(exc)) from None
        except EngineDeadError:
            raise unavailable("the engine is shut down; retry on another pod") from None
