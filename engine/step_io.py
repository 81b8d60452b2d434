"""Messages between the scheduler and the model runner, one pair per step."""
from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.engine.request import Request, TokenLogprobs


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
