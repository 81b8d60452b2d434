"""What only a prefill pod does: compute a prompt, sample token 0, and lease
the prompt's blocks to the decoder that will pull them (Prefill, ClaimKV,
ReleaseKV).

``PodCore`` checks the pod is serving and tracks the call; this handler runs
it. Everything runs on the pod's event loop, the only thread touching the
transport and the lease table.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kvtransfer import KVTransport, LeaseNotFoundError
from splitserve.pod.config import PodConfig
from splitserve.pod.engine_submit import submit_to_engine
from splitserve.pod.messages import KVHandle, PrefillResult, not_found, unavailable
from splitserve.pod.timing import RequestTimer
from splitserve.prefill.lease_keeper import LeaseKeeper


class PrefillHandler:
    def __init__(self, config: PodConfig, engine: AsyncEngine, transport: KVTransport,
                 incarnation_id: str) -> None:
        self.config = config
        self.engine = engine
        self.incarnation_id = incarnation_id
        self.leases = LeaseKeeper(engine, transport, config.kv_lease_seconds, config.kv_claim_timeout_s)

    async def prefill(self, request_id: str, token_ids: Sequence[int], sampling: SamplingParams,
                      cache_salt: str | None, abort: asyncio.Event, timer: RequestTimer) -> PrefillResult:
        """Run the prompt prefill-only; lease the held blocks unless aborted."""
        stream: AsyncIterator | None = None
        try:
            stream = await submit_to_engine(self.engine, request_id, token_ids, sampling,
                                            cache_salt=cache_salt, prefill_only=True)
            tokens, logprobs = [], []
            prompt_logprobs = None
            handle: KVHandle | None = None
            async for out in stream:
                timer.on_output(len(out.new_token_ids))
                tokens += out.new_token_ids
                logprobs += out.new_logprobs
                prompt_logprobs = out.prompt_logprobs or prompt_logprobs
                if not out.finished:
                    continue
                reason = out.finish_reason
                if reason is None and abort.is_set():
                    reason = "abort"  # Abort raced the handoff; the engine drops the held blocks
                elif reason is None and out.held_block_ids:
                    # No await between the handoff output and the lease: an Abort sees one or the other.
                    _lease, deadline = self.leases.reserve(request_id, out.held_block_ids)
                    handle = KVHandle(request_id, self.config.address, self.config.transfer_agent_name,
                                      self.incarnation_id, tuple(out.held_block_ids), out.num_held_tokens,
                                      deadline)
                timer.on_finish(reason if reason is not None and handle is None else None)
                return PrefillResult(tokens[0] if tokens else 0, logprobs[0] if logprobs else None, handle,
                                     reason, out.num_prompt_tokens, out.num_cached_tokens, prompt_logprobs)
            raise unavailable(f"the engine ended request {request_id!r} without a result; retry elsewhere")
        finally:
            if stream is not None:
                await stream.aclose()  # type: ignore[attr-defined]

    def claim(self, request_id: str, incarnation_id: str) -> tuple[int, ...]:
        """The leased block ids, marking the lease claimed (a READ may follow)."""
        if incarnation_id and incarnation_id != self.incarnation_id:
            raise not_found(f"KV handle of {request_id!r} is from incarnation {incarnation_id}; this pod "
                            f"restarted (now {self.incarnation_id}) and its blocks are gone")
        try:
            return self.leases.claim(request_id)
        except LeaseNotFoundError as exc:
            raise not_found(str(exc)) from None

    def release(self, request_id: str) -> bool:
        """Drop the lease (unpinning its blocks); False if none is held."""
        return self.leases.release(request_id)
