"""The router's view of generation: a token stream per request.

The router (HTTP ingress, detokenizer, stop strings) talks to pods only through
``GenerationBackend``. The gRPC orchestrator (prefill on one pod, decode on
another) implements it; ``FakeBackend`` implements it for tests.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from splitserve.engine.block_hash import BlockHash
from splitserve.engine.request import TokenLogprobs
from splitserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class BackendRequest:
    """One sequence to generate (a choice of an OpenAI request; ``n`` is already
    fanned out, so ``sampling_params.n == 1`` and ``seed`` is per choice).

    ``block_hashes`` are the prompt's full-block hashes
    (``splitserve.engine.block_hash.hash_prompt_blocks`` salted with
    ``cache_salt``), computed once by the router for routing.
    ``arrival_time`` is ``time.monotonic()`` when the HTTP request arrived.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    block_hashes: tuple[BlockHash, ...] = ()
    cache_salt: str | None = None
    user: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class TokenChunk:
    """New output tokens of one sequence, in order.

    ``logprobs`` has one entry per token in ``token_ids`` when the request asked
    for logprobs, else ``None``. ``finish_reason`` ("stop" or "length") is set
    on the last chunk only; a chunk may then carry zero tokens. When the engine
    stops on EOS or a stop token id, that token is included in ``token_ids``
    (the router leaves it out of the text). ``num_prompt_tokens`` and
    ``num_cached_tokens`` (prompt tokens served from a prefix cache) repeat on
    every chunk so a consumer may read them from whichever it sees.
    ``prompt_logprobs`` (asked by ``sampling_params.prompt_logprobs``) rides
    on the first chunk only: ``None`` for prompt token 0, then one entry per
    prompt token.
    """

    token_ids: tuple[int, ...]
    num_prompt_tokens: int
    logprobs: tuple[TokenLogprobs, ...] | None = None
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None


class BackendError(RuntimeError):
    """Generation failed after the request was accepted (pod lost, retries
    exhausted). Maps to HTTP 500, or to an error event mid-stream."""


class BackendUnavailableError(BackendError):
    """No pod can take the request right now (none ready). Maps to HTTP 503."""


@runtime_checkable
class GenerationBackend(Protocol):
    """Generates token streams; implemented by the orchestrator and FakeBackend.

    Contract of ``generate``:

    - It is an async generator: the request starts when the caller first
      awaits ``__anext__`` and yields ``TokenChunk``s until one carries a
      ``finish_reason``, then it ends.
    - **Cancellation**: the caller may stop early (stop string reached, client
      disconnected) by calling ``aclose()`` on the iterator or by cancelling the
      task awaiting it. Either way the implementation must abort the request on
      the pods (free its KV blocks) in a ``finally``; the router always closes
      iterators it stops consuming (``contextlib.aclosing``).
    - Failures raise ``BackendError`` (``BackendUnavailableError`` when nothing
      was started). The request is already validated: ``InvalidRequestError``
      from a pod means the router's validation missed a case.
    """

    def generate(self, request: BackendRequest) -> AsyncIterator[TokenChunk]: ...
