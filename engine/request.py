"""One request's state inside an engine: the scheduler's unit of work.

Progress is two counters (DESIGN.md section 3): ``num_computed_tokens`` (KV
exists for these positions) and ``num_tokens`` (prompt + generated so far).
There is no separate prefill or decode path: a request whose
``num_computed_tokens < num_tokens - 1`` still has prompt to compute; when a
step computes up to ``num_tokens`` the runner samples the next token.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from splitserve.engine.block_hash import BlockHash
from splitserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from splitserve.engine.structured.matcher import RequestMatcher


class RequestStatus(enum.IntEnum):
    WAITING = 1
    WAITING_FOR_REMOTE_KV = 2
    RUNNING = 3
    PREEMPTED = 4
    FINISHED_STOPPED = 5
    FINISHED_LENGTH = 6
    FINISHED_ABORTED = 7
    # A prefill-only request sampled its first token; its KV blocks stay held
    # for a decoder to pull. Finished here, but the request goes on elsewhere.
    FINISHED_HANDED_OFF = 8

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason for a finished status, else None."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprob of one sampled token and its top alternatives (raw distribution)."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely token
    top_token_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass(eq=False)
class Request:
    """A request owned by one engine; mutated only by the scheduler.

    ``seed`` is always resolved (drawn at arrival when the client gave none)
    so sampling is position-keyed and reproducible.

    Disaggregation: a ``prefill_only`` request finishes after its first sampled
    token with its blocks held for a decoder (``FINISHED_HANDED_OFF``). A
    request with ``num_remote_tokens > 0`` arrives with the KV of its first
    ``num_remote_tokens`` tokens on a remote pod; the scheduler parks it in
    ``WAITING_FOR_REMOTE_KV`` until the pull completes.

    A constrained request (``sampling_params.constraint``) carries a
    ``matcher`` that has consumed exactly its output tokens: the engine core
    builds it at arrival (replaying output tokens made elsewhere) and
    ``append_output_token`` advances it; it is dropped when the request ends.

    ``prompt_logprobs`` is None unless this engine computes the request's
    prompt logprobs (asked for, and token 0 is sampled here); it then holds
    one entry per prompt token from the second on, appended chunk by chunk.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int
    eos_token_ids: frozenset[int] = frozenset()
    cache_salt: str | None = None
    prefill_only: bool = False
    num_remote_tokens: int = 0
    arrival_time: float = field(default_factory=time.monotonic)

    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    first_scheduled_time: float | None = None
    # Chained hashes of every full block of token_ids (extended as tokens are
    # appended) and how many leading blocks are committed to the prefix cache.
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_committed_blocks: int = 0
    matcher: RequestMatcher | None = field(default=None, repr=False)
    prompt_logprobs: list[TokenLogprobs] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def num_prompt_logprobs_missing(self) -> int:
        """Prompt logprobs still to compute (0 when none are computed here)."""
        if self.prompt_logprobs is None:
            return 0
        return self.num_prompt_tokens - 1 - len(self.prompt_logprobs)

    def append_output_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        self.token_ids.append(token_id)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        if self.matcher is not None:
            self.matcher.accept(token_id)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """The finished status the last appended token causes, else None.

        ``min_tokens`` holds back eos and stop tokens, never the length limits
        nor a constraint that nothing can follow any more (a matcher in an
        error state counts as such: it is logged by the matcher).
        """
        params = self.sampling_params
        if self.matcher is not None and self.num_output_tokens > 0 and self.matcher.is_stopped():
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= params.min_tokens and self.num_output_tokens > 0:
            last = self.token_ids[-1]
            if not params.ignore_eos and last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if last in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and self.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
