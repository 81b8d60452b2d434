"""Transport-free messages of a pod's core (the servicer maps them to protobuf).

``PodError`` carries a gRPC status code *name* so the core never imports
grpc; the servicer turns it into a status (unary RPCs) or an ``error`` event
(the Decode stream).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from splitserve.engine.request import TokenLogprobs


class PodError(Exception):
    """A refusal the caller can act on. ``code`` is a gRPC status code name:
    INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION or UNAVAILABLE."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> PodError:
    return PodError("INVALID_ARGUMENT", message)


def not_found(message: str) -> PodError:
    return PodError("NOT_FOUND", message)


def failed_precondition(message: str) -> PodError:
    return PodError("FAILED_PRECONDITION", message)


def unavailable(message: str) -> PodError:
    return PodError("UNAVAILABLE", message)


class Role(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    UNIFIED = "unified"


class KVSource(enum.Enum):
    PULLED = "pulled"          # READ from the prefill pod (maybe partly local prefix hits)
    LOCAL = "local"            # no handle: computed here
    RECOMPUTED = "recomputed"  # the pull failed; this pod recomputed the prompt


@dataclass(frozen=True)
class KVHandle:
    """Where a prompt's KV waits (proto ``KVHandle``)."""

    request_id: str
    peer_address: str
    agent_name: str
    incarnation_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    lease_deadline_unix: float = 0.0


@dataclass(frozen=True)
class PrefillResult:
    """First token of a prompt; ``kv_handle`` is None when token 0 ended the
    request (``finish_reason`` then says why). ``prompt_logprobs`` as
    ``EngineOutput.prompt_logprobs`` (None unless asked)."""

    first_token_id: int
    first_logprobs: TokenLogprobs | None
    kv_handle: KVHandle | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass(frozen=True)
class DecodeChunk:
    """New tokens; ``prompt_logprobs`` on token 0's chunk when this pod
    computed them (``EngineOutput.prompt_logprobs``). ``last``: the step
    that produced them ended the request, a ``DecodeFinished`` follows at
    once (a transport may send the two as one message)."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    last: bool = False


@dataclass(frozen=True)
class DecodeFinished:
    reason: str
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    kv_source: KVSource
    num_pulled_blocks: int = 0
    num_pulled_bytes: int = 0


DecodeEvent = DecodeChunk | DecodeFinished


@dataclass(frozen=True)
class LoadSnapshot:
    """proto ``LoadReport``; used blocks = total - free (cached-free count as free)."""

    role: Role
    incarnation_id: str
    num_running: int
    num_waiting: int
    num_waiting_for_remote_kv: int
    queued_prompt_tokens: int
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float
    block_size: int
    num_leased_blocks: int
