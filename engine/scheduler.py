"""Continuous batching by iteration: which requests compute which tokens next.

Pure Python; touches no tensors. There is no prefill phase and no decode
phase: each step gives every running request ``num_tokens -
num_computed_tokens`` tokens (capped by the step's token budget), so a decode
is a one-token chunk and a long prompt is several chunks. Running requests go
first, then waiting ones in arrival order. When blocks run out the newest
running request is preempted by recompute: its blocks go back to the pool
(committed ones stay in the prefix cache, so it re-hits them) and it returns to
the head of the waiting queue.

One engine thread calls everything here; the scheduler itself has no locks.
"""
from __future__ import annotations

import time
from collections import deque

from splitserve.engine.block_hash import hash_prompt_blocks
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.outputs import EngineOutput, SchedulerStats
from splitserve.engine.request import Request, RequestStatus
from splitserve.engine.request_validation import SchedulerConfig, validate_request
from splitserve.engine.step_io import ModelRunnerOutput, RemoteKVLoad, SchedulerOutput


class Scheduler:
    """Owns every request from ``add_request`` until it ends (or, for a
    prefill-only request, until its held blocks are released)."""

    def __init__(self, config: SchedulerConfig, block_pool: BlockPool) -> None:
        self.config = config
        self.pool = block_pool
        self.block_size = block_pool.block_size
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_for_remote_kv: dict[str, Request] = {}
        self.held: dict[str, Request] = {}
        self._needs_kv_plan: set[str] = set()
        self._finished_ids: list[str] = []
        self._pending_outputs: list[EngineOutput] = []  # ended inside schedule()
        self.num_preemptions = 0

    # -- requests in and out ----------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request. Raises ``InvalidRequestError`` (or a subclass)
        before anything is queued when the request cannot be served."""
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use on this engine")
        validate_request(request, self.config, self.pool.num_blocks * self.block_size)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        if request.num_remote_tokens:
            self._needs_kv_plan.add(request.request_id)
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> bool:
        """End a request in any state and free its blocks at once; also drops
        a prefill-only request's held blocks. Returns False if unknown.

        A request in ``WAITING_FOR_REMOTE_KV`` may have a pull writing into
        its blocks: the transfer's owner cancels or completes the pull before
        aborting, since the freed blocks can be handed out in the next step.
        """
        request = self.requests.get(request_id)
        if request is None:
            return False
        if request.status == RequestStatus.FINISHED_HANDED_OFF:
            return self.release_held_blocks(request_id)
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING_FOR_REMOTE_KV:
            del self.waiting_for_remote_kv[request_id]
        else:
            self.waiting.remove(request)
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return True

    def finish_remote_kv(self, request_id: str, ok: bool) -> bool:
        """Report the end of a request's KV pull (from the transfer layer,
        after the ``RemoteKVLoad`` it was given). With ``ok`` the request
        continues from ``num_remote_tokens``; otherwise it recomputes the
        prompt after its local prefix hits. Returns False for a request not
        waiting for KV (unknown, aborted, or already reported)."""
        request = self.waiting_for_remote_kv.pop(request_id, None)
        if request is None:
            return False
        if ok:
            request.num_computed_tokens = max(request.num_computed_tokens, request.num_remote_tokens)
            self._commit_blocks(request)
        request.status = RequestStatus.WAITING
        # It arrived earlier than anything still queued behind it.
        self.waiting.appendleft(request)
        return True

    def release_held_blocks(self, request_id: str) -> bool:
        """Unpin a handed-off prefill-only request's blocks (the decoder pulled
        them, or the lease expired). They return to the pool as cached blocks.
        Returns False if nothing is held under this id."""
        request = self.held.pop(request_id, None)
        if request is None:
            return False
        self._free_blocks(request)
        del self.requests[request_id]
        return True

    # -- one step ---------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work. Allocates the blocks the chunks need; the
        counters advance only in ``update``."""
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:
                index += 1
                continue
            if self._blocks_needed(request, num_new) + len(request.block_ids) > self.pool.num_blocks:
                # Even an empty cache could not hold this sequence.
                self.running.pop(index)
                self._finish(request, RequestStatus.FINISHED_LENGTH)
                self._pending_outputs.append(self._final_output(request))
                continue
            while not self._try_allocate(request, num_new):
                # Blocks parked under waiting requests (pulled KV) yield first:
                # otherwise a running request could preempt itself forever.
                if self._release_waiting_blocks(None):
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted_request_ids.append(victim.request_id)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break
            self._add_to_output(out, request, num_new)
            budget -= num_new
            index += 1

        # Admitting new work right after preempting would just thrash.
        while self.waiting and not out.preempted_request_ids:
            request = self.waiting[0]
            if request.request_id in self._needs_kv_plan:
                if not self._plan_remote_kv(request, out):
                    break
                continue
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            num_new = self._admit(request, budget)
            if num_new is None:
                if not self.running and self._release_waiting_blocks(request):
                    continue
                break
            self.waiting.popleft()
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_to_output(out, request, num_new)
            budget -= num_new
        return out

    def update(self, out: SchedulerOutput, runner_out: ModelRunnerOutput) -> list[EngineOutput]:
        """Advance the counters of the requests ``out`` scheduled, append the
        sampled tokens, apply stop conditions and free finished requests.
        Raises ``RuntimeError`` if the runner left out a token it owed."""
        sampled = {
            rid: (token, logprobs)
            for rid, token, logprobs in zip(
                runner_out.request_ids,
                runner_out.sampled_token_ids,
                runner_out.logprobs or [None] * len(runner_out.request_ids),
            )
        }
        results, self._pending_outputs = self._pending_outputs, []
        for load in out.remote_kv_loads:
            request = self.requests[load.request_id]
            results.append(EngineOutput(
                request_id=load.request_id,
                num_prompt_tokens=request.num_prompt_tokens,
                num_output_tokens=request.num_output_tokens,
                num_cached_tokens=request.num_cached_tokens,
                remote_kv_load=load,
            ))
        for request, num_new, samples in zip(out.requests, out.num_scheduled_tokens, out.samples):
            if request.status != RequestStatus.RUNNING:
                continue
            new_prompt_logprobs = runner_out.prompt_logprobs.get(request.request_id)
            if new_prompt_logprobs and request.prompt_logprobs is not None:
                request.prompt_logprobs.extend(new_prompt_logprobs[:request.num_prompt_logprobs_missing])
            request.num_computed_tokens += num_new
            self._commit_blocks(request)
            if not samples:
                continue
            if request.request_id not in sampled:
                raise RuntimeError(f"model runner returned no token for request {request.request_id!r}")
            token, logprobs = sampled[request.request_id]
            request.append_output_token(token, logprobs)
            status = request.check_stop(self.config.max_model_len)
            if status is None and request.prefill_only:
                status = RequestStatus.FINISHED_HANDED_OFF
            result = EngineOutput(
                request_id=request.request_id,
                new_token_ids=[token],
                new_logprobs=[logprobs] if logprobs is not None else [],
                num_prompt_tokens=request.num_prompt_tokens,
                num_output_tokens=request.num_output_tokens,
                num_cached_tokens=request.num_cached_tokens,
            )
            if request.prompt_logprobs is not None and request.num_output_tokens == 1:
                result.prompt_logprobs = [None, *request.prompt_logprobs]
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
                result.finished = True
                result.finish_reason = status.finish_reason
                if status == RequestStatus.FINISHED_HANDED_OFF:
                    result.held_block_ids = tuple(request.block_ids)
                    result.num_held_tokens = request.num_computed_tokens
            results.append(result)
        return results

    # -- queries ----------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        """True while some request still needs steps or a KV pull (held
        prefill-only blocks do not count)."""
        return bool(self.running or self.waiting or self.waiting_for_remote_kv)

    def has_schedulable_requests(self) -> bool:
        return bool(self.running or self.waiting)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_waiting_for_remote_kv=len(self.waiting_for_remote_kv),
            num_held=len(self.held),
            num_held_blocks=sum(len(r.block_ids) for r in self.held.values()),
            queued_prompt_tokens=sum(max(r.num_tokens - r.num_computed_tokens, 0) for r in self.waiting),
            num_free_blocks=self.pool.num_free_blocks,
            num_total_blocks=self.pool.num_blocks,
            kv_cache_usage=self.pool.usage,
            num_preemptions=self.num_preemptions,
            prefix_cache_queries=self.pool.prefix_cache_queries,
            prefix_cache_hits=self.pool.prefix_cache_hits,
        )

    # -- internals --------------------------------------------------------

    def _add_to_output(self, out: SchedulerOutput, request: Request, num_new: int) -> None:
        out.requests.append(request)
        out.num_scheduled_tokens.append(num_new)
        out.samples.append(request.num_computed_tokens + num_new == request.num_tokens)

    def _blocks_needed(self, request: Request, num_new: int) -> int:
        total = -(-(request.num_computed_tokens + num_new) // self.block_size)
        return max(total - len(request.block_ids), 0)

    def _try_allocate(self, request: Request, num_new: int) -> bool:
        needed = self._blocks_needed(request, num_new)
        if needed > self.pool.num_free_blocks:
            return False
        request.block_ids.extend(self.pool.allocate(needed))
        return True

    def _find_prefix_hits(self, request: Request) -> list[int]:
        """Leading cached blocks of ``request``, at most ``num_tokens - 1``
        tokens' worth: the last token is always computed so there are logits
        to sample. Hits are whole blocks, so the block being computed is never
        a shared cached one being rewritten.

        A request still missing prompt logprobs gets no hits, as in vLLM:
        cached positions have no logits, so its whole prompt is computed
        (its blocks are still committed to the cache for others)."""
        self._extend_hashes(request)
        if request.num_prompt_logprobs_missing > 0:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        return self.pool.find_cached_prefix(request.block_hashes, request.token_ids, max_blocks)

    def _claim(self, request: Request, hits: list[int], num_tokens_to_cover: int) -> bool:
        """Give a request with no blocks its prefix hits plus fresh blocks up to
        ``num_tokens_to_cover`` tokens, or change nothing and return False."""
        num_fresh = max(-(-num_tokens_to_cover // self.block_size) - len(hits), 0)
        revived = sum(1 for block_id in hits if self.pool.blocks[block_id].ref_count == 0)
        if num_fresh + revived > self.pool.num_free_blocks:
            return False
        self.pool.touch(hits)
        request.block_ids = list(hits) + self.pool.allocate(num_fresh)
        request.num_committed_blocks = len(hits)
        request.num_computed_tokens = len(hits) * self.block_size
        self.pool.record_query(request.num_tokens, request.num_computed_tokens)
        if request.first_scheduled_time is None:
            request.num_cached_tokens = request.num_computed_tokens
        return True

    def _admit(self, request: Request, budget: int) -> int | None:
        """Allocate for the waiting head's next chunk; return its size, or
        None when it does not fit this step."""
        if request.block_ids:  # its KV arrived from a remote pod
            num_computed, hits = request.num_computed_tokens, []
        else:
            hits = self._find_prefix_hits(request)
            num_computed = len(hits) * self.block_size
        num_new = request.num_tokens - num_computed
        if num_new > budget:
            if not self.config.enable_chunked_prefill:
                return None
            num_new = budget
        if request.block_ids:
            return num_new if self._try_allocate(request, num_new) else None
        return num_new if self._claim(request, hits, num_computed + num_new) else None

    def _plan_remote_kv(self, request: Request, out: SchedulerOutput) -> bool:
        """Allocate the blocks a remote-KV request pulls into and park it in
        ``WAITING_FOR_REMOTE_KV``. Returns False (request stays queued) when
        blocks are short."""
        hits = self._find_prefix_hits(request)
        if not self._claim(request, hits, max(request.num_remote_tokens, len(hits) * self.block_size)):
            return False
        self.waiting.popleft()
        self._needs_kv_plan.discard(request.request_id)
        num_hit = request.num_computed_tokens
        first = len(hits)
        last = -(-request.num_remote_tokens // self.block_size)
        out.remote_kv_loads.append(RemoteKVLoad(
            request_id=request.request_id,
            block_ids=tuple(request.block_ids[first:last]),
            remote_block_indices=tuple(range(first, last)),
            num_remote_tokens=request.num_remote_tokens,
            num_local_hit_tokens=num_hit,
        ))
        if first >= last:
            # Every block was a local hit: nothing to pull, nothing to wait for.
            request.num_computed_tokens = max(num_hit, request.num_remote_tokens)
            self.waiting.appendleft(request)
            return True
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.waiting_for_remote_kv[request.request_id] = request
        return True

    def _release_waiting_blocks(self, blocked: Request | None) -> bool:
        """Free the blocks of the newest other waiting request that holds some
        (its KV arrived but it is not running), so ``blocked`` can proceed
        instead of every queued request holding blocks and none running."""
        for request in reversed(self.waiting):
            if request is not blocked and request.block_ids:
                self._preempt(request, requeue=False)
                return True
        return False

    def _preempt(self, request: Request, requeue: bool = True) -> None:
        self._free_blocks(request)
        request.num_computed_tokens = 0
        request.num_committed_blocks = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        if requeue:
            self.waiting.appendleft(request)

    def _final_output(self, request: Request) -> EngineOutput:
        return EngineOutput(
            request_id=request.request_id,
            finished=True,
            finish_reason=request.status.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens,
        )

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        request.matcher = None  # nothing samples for it again
        self._needs_kv_plan.discard(request.request_id)
        self._finished_ids.append(request.request_id)
        if status == RequestStatus.FINISHED_HANDED_OFF:
            self.held[request.request_id] = request
            return
        self._free_blocks(request)
        del self.requests[request.request_id]

    def _free_blocks(self, request: Request) -> None:
        self.pool.free(request.block_ids)
        request.block_ids = []

    def _extend_hashes(self, request: Request) -> None:
        if not self.pool.enable_prefix_caching:
            return
        done = len(request.block_hashes) * self.block_size
        if request.num_tokens - done < self.block_size:
            return
        if request.block_hashes:
            new = hash_prompt_blocks(request.token_ids[done:], self.block_size, parent_hash=request.block_hashes[-1])
        else:
            new = hash_prompt_blocks(request.token_ids, self.block_size, salt=request.cache_salt)
        request.block_hashes.extend(new)

    def _commit_blocks(self, request: Request) -> None:
        """Publish the request's newly computed full blocks to the prefix cache."""
        num_full = request.num_computed_tokens // self.block_size
        if num_full <= request.num_committed_blocks or not self.pool.enable_prefix_caching:
            return
        self._extend_hashes(request)
        size = self.block_size
        for i in range(request.num_committed_blocks, num_full):
            self.pool.commit(request.block_ids[i], request.block_hashes[i], request.token_ids[i * size : (i + 1) * size])
        request.num_committed_blocks = num_full
