"""A model runner that computes nothing: a latency model says how long each
step takes and the engine thread sleeps that long (simulated pods).

``SimRunner`` satisfies ``engine_core.Runner`` and drives the real scheduler,
block pool and prefix cache. It keeps no KV tensors. Tokens come from
``sim_token``: a deterministic function of (context, seed, output position),
like the real position-keyed sampler, so a request gives the same tokens
unified, prefill->decode, after preemption and after a failover. Greedy
requests (temperature 0) ignore the seed, as a real greedy decode would, so
their outputs are reproducible across runs and routers.

The sleep (``time.sleep``) releases the GIL: hundreds of simulated engines
fit on a couple of cores because an idle or "computing" engine thread costs
nothing but its wake-ups.
"""
from __future__ import annotations

import hashlib
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from splitserve.engine.request import Request, TokenLogprobs
from splitserve.engine.step_io import ModelRunnerOutput, SchedulerOutput

_TOKEN = struct.Struct("<I")
_SEED_POSITION = struct.Struct("<QQ")
_MAX_CACHED_CONTEXTS = 4096


@dataclass(frozen=True)
class StepShape:
    """What a step computes, as a latency model sees it: prompt tokens run
    through the model (prefill chunks, recomputes) and sequences advanced by
    one generated token (decode)."""

    num_prefill_tokens: int = 0
    num_prefill_seqs: int = 0
    num_decode_seqs: int = 0

    @property
    def is_empty(self) -> bool:
        return not (self.num_prefill_tokens or self.num_decode_seqs)


class StepTimer(Protocol):
    """How long a step takes (seconds); called on the engine thread only."""

    def step_seconds(self, shape: StepShape) -> float: ...


def step_shape(scheduler_output: SchedulerOutput) -> StepShape:
    """Classify each scheduled chunk: one new token of a request whose prompt
    is already computed is a decode; anything else is prefill work."""
    prefill_tokens = prefill_seqs = decode_seqs = 0
    for request, num_new in zip(scheduler_output.requests, scheduler_output.num_scheduled_tokens):
        if num_new == 1 and request.num_computed_tokens >= request.num_prompt_tokens:
            decode_seqs += 1
        else:
            prefill_tokens += num_new
            prefill_seqs += 1
    return StepShape(prefill_tokens, prefill_seqs, decode_seqs)


class ContextDigest:
    """A running BLAKE2b over a token sequence; feeding it in pieces equals
    feeding it at once, so a decode step hashes one new token, not the whole
    context."""

    __slots__ = ("_hash", "num_tokens")

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=16)
        self.num_tokens = 0

    def extend(self, token_ids: Sequence[int]) -> None:
        if token_ids:
            self._hash.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
            self.num_tokens += len(token_ids)

    def digest(self) -> bytes:
        return self._hash.digest()


def sim_token(context_digest: bytes, seed: int, position: int, vocab_size: int) -> int:
    """The simulated model: token ``position`` (0 = first output) after a
    context with digest ``context_digest``."""
    h = hashlib.blake2b(context_digest + _SEED_POSITION.pack(seed % 2**64, position), digest_size=8)
    return int.from_bytes(h.digest(), "little") % vocab_size


def sim_tokens(prompt: Sequence[int], num_tokens: int, vocab_size: int, seed: int = 0) -> list[int]:
    """What a sim pod generates for ``prompt`` (greedy: ``seed`` 0), for
    checks outside the engine (tests, the fleet bench's exactness check)."""
    digest = ContextDigest()
    digest.extend(prompt)
    out: list[int] = []
    for position in range(num_tokens):
        token = sim_token(digest.digest(), seed, position, vocab_size)
        out.append(token)
        digest.extend((token,))
    return out


def effective_seed(request: Request) -> int:
    """Greedy ignores the seed; sampled requests are keyed by it."""
    return 0 if request.sampling_params.is_greedy else request.seed


class SimRunner:
    """``Runner`` for simulated pods. Not thread-safe: the engine thread calls
    ``execute``. ``sleep`` and ``clock`` are injectable for tests."""

    def __init__(self, *, num_blocks: int, block_size: int, max_model_len: int, vocab_size: int,
                 eos_token_ids: frozenset[int], step_timer: StepTimer,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if num_blocks < 1 or block_size < 1 or max_model_len < 1 or vocab_size < 2:
            raise ValueError("SimRunner needs num_blocks, block_size, max_model_len >= 1 and vocab_size >= 2")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.step_timer = step_timer
        self._sleep = sleep
        self._clock = clock
        self._contexts: OrderedDict[str, tuple[Request, ContextDigest]] = OrderedDict()
        self.num_steps = 0
        self.modelled_seconds = 0.0  # sum of the latency model's step times
        self.slept_seconds = 0.0

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        start = self._clock()
        for request_id in scheduler_output.finished_request_ids:
            self._contexts.pop(request_id, None)
        out = ModelRunnerOutput()
        for request, num_new, samples in zip(scheduler_output.requests, scheduler_output.num_scheduled_tokens,
                                             scheduler_output.samples):
            if request.num_prompt_logprobs_missing > 0:
                # Placeholders (logprob 0, rank 1), like the sampled tokens' below.
                first = max(request.num_computed_tokens, len(request.prompt_logprobs or ()))
                last = min(request.num_computed_tokens + num_new, request.num_prompt_tokens - 1)
                out.prompt_logprobs[request.request_id] = [
                    TokenLogprobs(t, 0.0, 1) for t in request.token_ids[first + 1:last + 1]]
            if not samples:
                continue
            end = request.num_computed_tokens + num_new
            token = sim_token(self._digest(request, end), effective_seed(request),
                              request.num_output_tokens, self.vocab_size)
            out.request_ids.append(request.request_id)
            out.sampled_token_ids.append(token)
            wants = request.sampling_params.logprobs
            out.logprobs.append(TokenLogprobs(token, 0.0, 1) if wants is not None else None)
        seconds = max(0.0, self.step_timer.step_seconds(step_shape(scheduler_output)))
        self.num_steps += 1
        self.modelled_seconds += seconds
        remaining = seconds - (self._clock() - start)
        if remaining > 0:
            self._sleep(remaining)
            self.slept_seconds += remaining
        return out

    def _digest(self, request: Request, end: int) -> bytes:
        """Digest of ``request.token_ids[:end]``. Token lists only grow, so a
        cached digest of the same request object is extended, never redone."""
        entry = self._contexts.get(request.request_id)
        if entry is None or entry[0] is not request or entry[1].num_tokens > end:
            entry = (request, ContextDigest())
            self._contexts[request.request_id] = entry
        self._contexts.move_to_end(request.request_id)
        digest = entry[1]
        digest.extend(request.token_ids[digest.num_tokens:end])
        while len(self._contexts) > _MAX_CACHED_CONTEXTS:
            self._contexts.popitem(last=False)
        return digest.digest()
