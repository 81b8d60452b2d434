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

from splitserve.decode.peer_client import PeerClient
from splitserve.decode.remote_kv import RemoteKV
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.block_pool import KVCacheEvents
from splitserve.engine.outputs import EngineOutput
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kvtransfer import KVTransport, TransferMetadata
from splitserve.pod.config import PodConfig
from splitserve.pod.engine_submit import submit_to_engine
from splitserve.pod.kv_event_hub import KVEventHub
from splitserve.pod.messages import (
    DecodeChunk, DecodeEvent, DecodeFinished, KVHandle, KVSource, LoadSnapshot, PrefillResult, Role,
    failed_precondition, invalid, not_found, unavailable,
)
from splitserve.pod.metrics import MetricSources, PodMetrics
from splitserve.pod.timing import RequestTimer
from splitserve.prefill.prefill_handler import PrefillHandler

logger = logging.getLogger(__name__)


@dataclass
class _Active:
    """A Prefill or Decode call in progress on this pod."""

    kind: str
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    pulling: bool = False
    drained: bool = False  # aborted by the drain: end with UNAVAILABLE, never a normal finish


def _cut_by_drain(out: EngineOutput, active: _Active) -> bool:
    """A finished output that is no finish: the pod drained and aborted it, so
    the router re-submits prompt + tokens so far elsewhere."""
    return out.finished and active.drained and out.finish_reason in (None, "abort")


class PodCore:
    """One pod's RPCs over its engine. A prefill pod's Prefill/ClaimKV/
    ReleaseKV are run by ``PrefillHandler`` (``splitserve.prefill``), a
    decode pod's KV pulls by ``RemoteKV`` (``splitserve.decode``); this class
    checks roles and drain state and tracks every call in progress."""

    def __init__(self, config: PodConfig, engine: AsyncEngine, transport: KVTransport | None = None,
                 peer_client: PeerClient | None = None, kv_events: KVEventHub | None = None) -> None:
        self.config = config
        self.role = config.role
        self.engine = engine
        self.transport = transport
        self.peer_client = peer_client
        self.kv_event_hub = kv_events
        if self.role is not Role.UNIFIED and transport is None:
            raise ValueError(f"a {self.role.value} pod needs a KV transport")
        if self.role is Role.DECODE and peer_client is None:
            raise ValueError("a decode pod needs a peer client (to reach prefill pods)")
        self.incarnation_id = transport.local_metadata().incarnation_id if transport else uuid.uuid4().hex
        self.prefill_handler = (PrefillHandler(config, engine, transport, self.incarnation_id)
                                if self.role is Role.PREFILL and transport is not None else None)
        leases = self.prefill_handler.leases if self.prefill_handler else None
        self.metrics = PodMetrics(MetricSources(
            engine_stats=engine.stats,
            transport=lambda: transport.metrics if transport is not None else None,
            leased_blocks=lambda: leases.table.num_leased_blocks if leases else 0,
            leases_expired=lambda: leases.counters.expired if leases else 0,
            transfer_failures=lambda: self.remote_kv.failures if self.remote_kv else 0,
        ))
        self.remote_kv: RemoteKV | None = None
        if self.role is Role.DECODE and transport is not None and peer_client is not None:
            self.remote_kv = RemoteKV(engine, transport, peer_client, config.kv_transfer_timeout_s,
                                      observe_seconds=self.metrics.kv_transfer_seconds.observe)
        self.draining = False
        self._active: dict[str, _Active] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        if self.prefill_handler is not None:
            self.prefill_handler.leases.start()

    # -- Prefill ---------------------------------------------------------------

    async def prefill(self, request_id: str, token_ids: Sequence[int], sampling: SamplingParams,
                      cache_salt: str | None = None) -> PrefillResult:
        """Compute the prompt, sample token 0, lease the blocks for a decoder."""
        self._check_serving()
        handler = self.prefill_handler
        if handler is None:
            raise failed_precondition(f"a {self.role.value} pod does not serve Prefill; send it to a prefill pod")
        active = self._begin(request_id, "prefill")
        try:
            result = await handler.prefill(request_id, token_ids, sampling, cache_salt, active.abort,
                                           RequestTimer(self.metrics))
            if active.drained and result.kv_handle is None and result.finish_reason == "abort":
                raise unavailable(f"this pod shut down before the prefill of {request_id!r} ended; "
                                  "retry on another pod")
            return result
        finally:
            self._end(request_id)

    def claim_kv(self, request_id: str, incarnation_id: str) -> tuple[int, ...]:
        if self.prefill_handler is None:
            raise failed_precondition(f"a {self.role.value} pod holds no KV leases")
        return self.prefill_handler.claim(request_id, incarnation_id)

    def release_kv(self, request_id: str) -> bool:
        if self.prefill_handler is None:
            raise failed_precondition(f"a {self.role.value} pod holds no KV leases")
        if not self.prefill_handler.release(request_id):
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
            if self.remote_kv is None:
                raise failed_precondition(f"a {self.role.value} pod cannot pull KV; send the request without "
                                          "kv_handle or to a decode pod")
            self.remote_kv.check_handle(kv_handle)
        active = self._begin(request_id, "decode")
        finished = False
        stream: AsyncIterator | None = None
        try:
            timer = RequestTimer(self.metrics)
            stream = await submit_to_engine(self.engine, request_id, token_ids[:n_prompt], sampling,
                                            output_token_ids=token_ids[n_prompt:], cache_salt=cache_salt,
                                            num_remote_tokens=kv_handle.num_tokens if kv_handle else 0)
            source, blocks, nbytes = KVSource.LOCAL, 0, 0
            async for out in stream:
                timer.on_output(len(out.new_token_ids))
                if out.remote_kv_load is not None and kv_handle is not None and self.remote_kv is not None:
                    active.pulling = True
                    try:
                        outcome = await self.remote_kv.pull(kv_handle, out.remote_kv_load, active.abort)
                    finally:
                        active.pulling = False
                    source, blocks, nbytes = outcome.source, outcome.num_blocks, outcome.num_bytes
                    if outcome.aborted or active.abort.is_set():
                        self.engine.abort(request_id)
                if out.new_token_ids:
                    yield DecodeChunk(list(out.new_token_ids), list(out.new_logprobs), out.prompt_logprobs,
                                      last=out.finished and not _cut_by_drain(out, active))
                if out.finished:
                    if _cut_by_drain(out, active):  # asked again: the drain may have begun during the yield
                        raise unavailable(f"this pod shut down before {request_id!r} finished; "
                                          "continue on another pod")
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
        if self.prefill_handler is not None and self.prefill_handler.release(request_id):
            found = True
        return found

    def load(self) -> LoadSnapshot:
        s = self.engine.stats()
        sched = s.scheduler
        return LoadSnapshot(self.role, self.incarnation_id, sched.num_running, sched.num_waiting,
                            sched.num_waiting_for_remote_kv, sched.queued_prompt_tokens, sched.num_free_blocks,
                            sched.num_total_blocks, sched.kv_cache_usage, s.block_size,
                            self.prefill_handler.leases.table.num_leased_blocks if self.prefill_handler else 0)

    def kv_events(self, min_interval_s: float = 0.0) -> AsyncIterator[KVCacheEvents]:
        if self.kv_event_hub is None:
            raise failed_precondition("this pod's engine does not publish KV events")
        return self.kv_event_hub.subscribe(min_interval_s)

    # -- lifetime --------------------------------------------------------------

    async def drain(self, grace_seconds: float) -> None:
        """The pod got SIGTERM (``PodServer`` calls this once /health already
        says "draining"). New Prefill/Decode calls are refused at once
        (UNAVAILABLE); running ones get ``grace_seconds``; whatever still runs
        then ends with UNAVAILABLE, never a normal finish, so the router moves
        it to another pod (a Decode continues there with prompt + tokens so far).

        A prefill pod then keeps serving ClaimKV, ReleaseKV, the handshake and
        the READs of every lease it granted until each is released or expires
        (at most ``kv_lease_seconds + kv_claim_timeout_s``). Returns when
        nothing is left; ``close`` frees whatever a timeout left behind."""
        self.draining = True
        if not await _wait(self._idle, grace_seconds):
            logger.warning("ending %d call(s) still running after %.1fs with UNAVAILABLE",
                           len(self._active), grace_seconds)
            for request_id, active in list(self._active.items()):
                active.drained = True
                self.abort(request_id)
            if not await _wait(self._idle, self.config.kv_transfer_timeout_s + 5):
                logger.error("%d call(s) did not end after abort", len(self._active))
        if self.prefill_handler is not None:
            leases = self.prefill_handler.leases
            bound = self.config.kv_lease_seconds + self.config.kv_claim_timeout_s
            if len(leases.table):
                logger.info("serving %d granted KV lease(s) until released or expired (at most %.0fs)",
                            len(leases.table), bound)
            if not await leases.wait_released(bound + 1.0):
                logger.error("%d KV lease(s) still held after %.0fs; freeing them", len(leases.table), bound)

    async def close(self) -> None:
        """Release leases, stop the engine thread, close the transport."""
        if self.prefill_handler is not None:
            await self.prefill_handler.leases.stop()
        if self.remote_kv is not None:
            await self.remote_kv.drain()
        if self.peer_client is not None:
            await self.peer_client.close()
        await asyncio.to_thread(self.engine.shutdown)
        if self.kv_event_hub is not None:
            self.kv_event_hub.close()
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


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    """``event.wait()`` for at most ``timeout`` seconds; False if it timed out."""
    try:
        await asyncio.wait_for(event.wait(), timeout=timeout)
    except asyncio.TimeoutError:
        return False
    return True
