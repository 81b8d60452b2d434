"""Messages between the scheduler and the model runner, one pair per step."""
from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.engine.request import Request, TokenLogprobs


@dataclass(frozen=True)
class RemoteKVLoad:
    """Blocks a request waiting for remote KV needs filled by a pull.

    ``block_ids[j]`` (this engine's block) must receive the remote block at
    position ``remote_block_indices[j]`` of the sender's block list (the KV
    handle's ``block_ids``, in token order). Leading blocks this engine
    already had in its prefix cache (``num_local_hit_tokens``) are left out.
    """

    request_id: str
    block_ids: tuple[int, ...]
    remote_block_indices: tuple[int, ...]
    num_remote_tokens: int
    num_local_hit_tokens: int


@dataclass
class SchedulerOutput:
    """What one engine step computes.

    For ``requests[i]`` the runner computes positions
    ``[num_computed_tokens, num_computed_tokens + num_scheduled_tokens[i])``
    using ``request.token_ids`` at those positions; KV blocks covering them are
    already allocated in ``request.block_ids``. When ``samples[i]`` is true the
    chunk reaches the end of the request's tokens and the runner samples one
    token from the last position's logits. The scheduler advances the counters
    only in ``update()``, after the runner returns.
    """

    requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    # Requests that got their blocks this step and now wait for a KV pull;
    # the runner ignores these, the engine's caller starts the transfers.
    remote_kv_loads: list[RemoteKVLoad] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.requests


@dataclass
class ModelRunnerOutput:
    """Tokens sampled in one step, for the requests whose ``samples`` flag was set,
    in the order they appear in the ``SchedulerOutput``."""

    request_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    # Per request id, the prompt logprobs this step's chunk produced, in
    # prompt order, continuing ``Request.prompt_logprobs``.
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
