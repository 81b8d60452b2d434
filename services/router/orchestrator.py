"""The P/D orchestrator: a ``GenerationBackend`` over the pods' gRPC ``Engine``.

Per request (one choice): resolve its seed, pick pods with ``PodRouter``, then

- **disaggregated**: Prefill on a prefill pod -> the first token goes to the
  client at once -> Decode(prompt + first, kv_handle) on a decode pod, which
  pulls the KV and streams the rest;
- **decode_only** (conditional disaggregation): when the part of the prompt
  the chosen decode pod does not already hold is shorter than
  ``pd_threshold_tokens``, Decode without a handle (the decode pod computes
  it; a transfer would cost more than it saves);
- **unified**: unified pods, Decode without a handle.

The pod set changes while requests run (discovery): each RPC holds its pod's
channel (``PodChannels.hold``) so a pod that leaves finishes what it runs,
and a pod gone between routing and the call counts as UNAVAILABLE (retried
on another pod). Without ``config.unified`` the path is chosen per request:
P/D while a decode pod is ready, else the ``unified`` pool when it has a
ready pod.

Failures: Prefill failing before the handoff is retried on another prefill
pod (bounded), then falls back to decode_only; a Decode stream lost mid-way is
re-submitted (prompt + tokens so far) to another pod, and the position-keyed
sampler keeps a seeded stream identical. Every path, retry and fallback is
counted in ``RouterMetrics``.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

import grpc

from splitserve.engine.request import TokenLogprobs
from splitserve.engine.sampling_params import SamplingParams
from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.router.backend import BackendError, BackendRequest, BackendUnavailableError, TokenChunk
from splitserve.router.errors import bad_request
from splitserve.router.metrics import RouterMetrics
from splitserve.router.pd_client import DecodeChunk, PodCallError, PodClient, PrefillResult
from splitserve.router.pod_channels import PodChannels
from splitserve.router.policies import NoReadyPodError, RouteRequest
from splitserve.router.routing import PodRouter

# Failures that say "this pod, now" rather than "this request": worth another pod.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN})


@dataclass(frozen=True)
class OrchestratorConfig:
    """``unified``: pods are unified (they sit in ``PodRouter``'s prefill pool).
    ``pd_threshold_tokens``: disaggregate only when at least this many prompt
    tokens are missing on the chosen decode pod (0: always).
    ``eos_token_ids``: the model's end tokens (to send a stream's last token
    together with its finish reason). Timeouts are seconds (None: none)."""

    block_size: int = 16
    unified: bool = False
    pd_threshold_tokens: int = 64
    max_prefill_retries: int = 2
    max_decode_retries: int = 2
    prefill_timeout_s: float | None = 600.0
    eos_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.pd_threshold_tokens < 0:
            raise ValueError("block_size must be >= 1 and pd_threshold_tokens >= 0")
        if self.max_prefill_retries < 0 or self.max_decode_retries < 0:
            raise ValueError("retry limits must be >= 0")


def draw_seed() -> int:
    return secrets.randbits(63)


class PrefillObserver(Protocol):
    """Told about every Prefill call (the scaler measures the pool's rate)."""

    def prefill_started(self, pod: str, now: float) -> None: ...

    def prefill_finished(self, pod: str, computed_tokens: int, now: float) -> None: ...


class Orchestrator:
    """Implements ``GenerationBackend`` on prefill/decode (or unified) pods.

    ``clients`` maps pod ids (host:port) to their ``PodClient`` (a fixed
    dict, or the live ``PodChannels``); ``router`` knows the same ids.
    ``prefill_observer`` (optional) sees each Prefill's start and end. Call
    from one event loop; ``aclose`` waits for the background aborts and
    closes the channels.
    """

    def __init__(self, router: PodRouter, clients: Mapping[str, PodClient], config: OrchestratorConfig,
                 metrics: RouterMetrics | None = None, seed_source: Callable[[], int] = draw_seed,
                 prefill_observer: PrefillObserver | None = None) -> None:
        self.router = router
        self.clients = clients
        self.config = config
        self.metrics = metrics or router.metrics
        self._seed_source = seed_source
        self._prefill_observer = prefill_observer
        self._background: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if isinstance(self.clients, PodChannels):
            await self.clients.aclose()
        else:
            await asyncio.gather(*(c.close() for c in self.clients.values()), return_exceptions=True)

    @contextmanager
    def _hold(self, pod: str, rpc: str) -> Iterator[PodClient]:
        """``pod``'s client for one call, its channel kept open meanwhile; a
        pod that already left raises a retryable UNAVAILABLE."""
        if pod not in self.clients:
            raise PodCallError(pod, rpc, grpc.StatusCode.UNAVAILABLE, "the pod left the pool")
        if isinstance(self.clients, PodChannels):
            with self.clients.hold(pod) as client:
                yield client
        else:
            yield self.clients[pod]

    def unified_path(self) -> bool:
        """True when this request goes to unified pods (see the module doc)."""
        if self.config.unified:
            return True
        return not self.router.has_ready("decode") and self.router.has_ready("unified")

    async def generate(self, request: BackendRequest) -> AsyncIterator[TokenChunk]:
        params = request.sampling_params
        if params.seed is None:
            # Prefill samples token 0 and decode the rest: both need one seed.
            request = replace(request, sampling_params=params.for_choice(self._seed_source()))
        route = RouteRequest.from_prompt(request.prompt_token_ids, self.config.block_size,
                                         request.cache_salt, request.block_hashes or None)
        run = _Run(request)
        try:
            if self.unified_path():
                role = "prefill" if self.config.unified else "unified"
                decision = self.router.route(role, route)
                self.metrics.pd_decisions.labels("unified").inc()
                stream = self._decode(run, role, decision.pod_id, route, None)
            else:
                stream = self._disaggregated(run, route)
            async with aclosing(stream) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            if not run.finished:
                for pod in run.pods_to_abort:
                    self._abort_later(pod, request.request_id)

    async def _disaggregated(self, run: _Run, route: RouteRequest) -> AsyncIterator[TokenChunk]:
        decode = self.router.route_decode(route)
        missing = route.num_prompt_tokens - decode.matched_blocks * self.config.block_size
        if missing < self.config.pd_threshold_tokens:
            self.metrics.pd_decisions.labels("decode_only").inc()
            async for chunk in self._decode(run, "decode", decode.pod_id, route, None):
                yield chunk
            return
        prefill = await self._prefill(run, route)
        if prefill is None:  # every prefill pod failed: the decode pod computes the prompt
            self.metrics.pd_decisions.labels("decode_only").inc()
            async for chunk in self._decode(run, "decode", decode.pod_id, route, None):
                yield chunk
            return
        self.metrics.pd_decisions.labels("disaggregated").inc()
        first = TokenChunk((prefill.first_token_id,), run.num_prompt_tokens,
                           (prefill.first_logprobs,) if prefill.first_logprobs is not None else None,
                           prefill.finish_reason, prefill.num_cached_tokens, prefill.prompt_logprobs)
        run.outputs.append(prefill.first_token_id)
        run.num_cached_tokens = prefill.num_cached_tokens
        if prefill.finish_reason is not None:
            run.finished = True
        yield first
        if run.finished:
            return
        async for chunk in self._decode(run, "decode", decode.pod_id, route, prefill.kv_handle):
            yield chunk

    async def _prefill(self, run: _Run, route: RouteRequest) -> PrefillResult | None:
        """Prefill on up to 1 + max_prefill_retries pods; None when all failed."""
        request = run.request
        for attempt in range(1 + self.config.max_prefill_retries):
            try:
                pod = self.router.route_prefill(route).pod_id
            except NoReadyPodError:
                break
            run.prefill_pod = pod
            observer = self._prefill_observer
            try:
                with self._hold(pod, "Prefill") as client:
                    if observer is not None:
                        observer.prefill_started(pod, time.monotonic())
                    computed = 0
                    try:
                        result = await client.prefill(
                            request.request_id, request.prompt_token_ids, request.sampling_params,
                            request.cache_salt, timeout=self.config.prefill_timeout_s)
                        computed = result.num_prompt_tokens - result.num_cached_tokens
                        return result
                    finally:
                        if observer is not None:
                            observer.prefill_finished(pod, computed, time.monotonic())
            except PodCallError as exc:
                self._raise_if_fatal(exc)
                self.metrics.retries.labels("prefill", exc.code.name.lower()).inc()
                self.router.pools["prefill"].set_ready(pod, False)  # until its next good poll
                self._abort_later(pod, request.request_id)
                run.prefill_pod = None
            finally:
                self.router.pools["prefill"].note_done(pod, run.num_prompt_tokens)
        self.metrics.retries.labels("prefill", "fallback_decode_only").inc()
        return None

    async def _decode(self, run: _Run, role: str, pod: str, route: RouteRequest,
                      handle: pb.KVHandle | None) -> AsyncIterator[TokenChunk]:
        """Stream Decode from ``pod``; on a retryable failure re-submit prompt +
        tokens so far to another pod of ``role`` (bounded)."""
        request = run.request
        retries = 0
        while True:
            run.decode_pod = attempt_pod = pod
            held: TokenChunk | None = None
            try:
                with self._hold(pod, "Decode") as client:
                    events = client.decode(
                        request.request_id, request.prompt_token_ids + tuple(run.outputs),
                        run.num_prompt_tokens, request.sampling_params, handle, request.cache_salt)
                    async with aclosing(events) as stream:
                        async for event in stream:
                            if isinstance(event, DecodeChunk):
                                if held is not None:
                                    yield held
                                chunk = run.add(event.token_ids, event.logprobs, event.prompt_logprobs)
                                # The last tokens must travel with the finish reason (the
                                # detokenizer drops a final stop token only then), so a chunk
                                # that may end the stream waits for the Finished event.
                                if self._may_end(request.sampling_params, run):
                                    held = chunk
                                else:
                                    held = None
                                    yield chunk
                                continue
                            if event.kv_source == "recomputed":
                                self.metrics.retries.labels("decode", "kv_pull_recomputed").inc()
                            if handle is not None and event.kv_source != "pulled" and run.prefill_pod:
                                self._abort_later(run.prefill_pod, request.request_id)  # drop the lease
                            if event.num_cached_tokens and run.num_cached_tokens == 0:
                                run.num_cached_tokens = event.num_cached_tokens
                            run.finished = True
                            base = held or TokenChunk((), run.num_prompt_tokens,
                                                      () if request.sampling_params.logprobs is not None
                                                      else None)
                            yield TokenChunk(base.token_ids, base.num_prompt_tokens, base.logprobs,
                                             event.reason or "stop", run.num_cached_tokens,
                                             base.prompt_logprobs)
                            return
            except PodCallError as exc:
                self._raise_if_fatal(exc, allow_not_found=handle is not None)
                if held is not None:
                    yield held
                if exc.code == grpc.StatusCode.NOT_FOUND:
                    # The KV handle expired or its prefill pod restarted: compute here.
                    self.metrics.retries.labels(role, "kv_handle_not_found").inc()
                    self.router.pools[role].note_assigned(pod, run.num_prompt_tokens)  # same pod again
                    handle = None
                    continue
                if retries >= self.config.max_decode_retries:
                    raise BackendError(f"decode failed after {retries} retries: {exc}") from None
                retries += 1
                self.metrics.retries.labels(role, exc.code.name.lower()).inc()
                self.router.pools[role].set_ready(pod, False)
                self._abort_later(pod, request.request_id)
                if handle is not None and run.prefill_pod:
                    self._abort_later(run.prefill_pod, request.request_id)
                handle = None
                try:
                    pod = self.router.route(role, route).pod_id
                except NoReadyPodError:
                    raise BackendUnavailableError(
                        f"decode pod {pod} failed ({exc.code.name}) and no other {role} pod is ready"
                    ) from None
            finally:
                self.router.pools[role].note_done(attempt_pod, run.num_prompt_tokens)

    def _may_end(self, params: SamplingParams, run: _Run) -> bool:
        count = len(run.outputs)
        if params.max_tokens is not None and count >= params.max_tokens:
            return True
        if count <= params.min_tokens:
            return False
        stops: Collection[int] = params.stop_token_ids
        last = run.outputs[-1]
        return last in stops or (not params.ignore_eos and last in self.config.eos_token_ids)

    def _raise_if_fatal(self, exc: PodCallError, allow_not_found: bool = False) -> None:
        if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
            raise bad_request(f"the engine rejected the request: {exc.details}") from None
        if exc.code == grpc.StatusCode.NOT_FOUND and allow_not_found:
            return
        if exc.code not in RETRYABLE:
            raise BackendError(str(exc)) from None

    def _abort_later(self, pod: str, request_id: str) -> None:
        """Abort ``request_id`` on ``pod`` in the background (best effort: a
        closing stream must not wait for the network)."""
        if pod not in self.clients:
            return  # the pod left and its channel closed: its blocks went with it, or its lease expires

        async def abort() -> None:
            try:
                with self._hold(pod, "Abort") as client:
                    await client.abort(request_id)
            except PodCallError:
                pass  # the pod is gone; its blocks went with it, or its lease expires

        task = asyncio.get_running_loop().create_task(abort())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _Run:
    """One request's progress across pods: tokens out so far and which pods
    may hold its state (to abort them if it does not finish)."""

    def __init__(self, request: BackendRequest) -> None:
        self.request = request
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.outputs: list[int] = []
        self.num_cached_tokens = 0
        self.prefill_pod: str | None = None
        self.decode_pod: str | None = None
        self.finished = False

    @property
    def pods_to_abort(self) -> list[str]:
        return [p for p in (self.prefill_pod, self.decode_pod) if p is not None]

    def add(self, token_ids: tuple[int, ...], logprobs: tuple[TokenLogprobs, ...] | None,
            prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None) -> TokenChunk:
        if self.outputs:
            prompt_logprobs = None  # the client got them with token 0 already
        self.outputs.extend(token_ids)
        return TokenChunk(token_ids, self.num_prompt_tokens, logprobs, None, self.num_cached_tokens,
                          prompt_logprobs)
