"""A deterministic in-process ``GenerationBackend`` for tests and demos."""
from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from splitserve.engine.request import TokenLogprobs
from splitserve.router.backend import BackendError, BackendRequest, TokenChunk

Script = Callable[[BackendRequest], Sequence[int]]


@dataclass
class FakeBackend:
    """Yields tokens from ``script(request)`` (default: a hash of prompt and seed).

    Honours ``max_tokens`` ("length"), ``stop_token_ids`` and ``eos_token_id``
    (unless ``ignore_eos``; both after ``min_tokens``), ``logprobs`` (synthetic
    values: the sampled token is rank 1 at ``-0.5``, alternatives follow),
    ``prompt_logprobs`` on the first chunk (synthetic: prompt token ``i`` at
    ``-1.0 - i``, rank 2 after ``(token + 1) % vocab``).
    ``tokens_per_chunk`` groups tokens; ``token_delay_s`` sleeps before each
    chunk; ``fail_after`` raises ``BackendError`` after that many tokens.

    Records every request it saw (``requests``), ids whose stream was closed
    before finishing (``cancelled``) and ids that finished (``finished``: the
    last chunk was sent and the consumer then closed or exhausted the
    stream); an id in neither is a stream still open.
    """

    vocab_size: int = 256
    script: Script | None = None
    eos_token_id: int | None = None
    tokens_per_chunk: int = 1
    token_delay_s: float = 0.0
    fail_after: int | None = None
    num_cached_tokens: int = 0
    requests: list[BackendRequest] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    def tokens_for(self, request: BackendRequest) -> list[int]:
        if self.script is not None:
            return list(self.script(request))
        seed = request.sampling_params.seed or 0
        material = f"{list(request.prompt_token_ids)}|{seed}".encode()
        limit = request.sampling_params.max_tokens or 64
        out: list[int] = []
        digest = b""
        while len(out) < limit:
            digest = hashlib.sha256(material + digest).digest()
            out.extend(b % self.vocab_size for b in digest)
        return out[:limit]

    async def generate(self, request: BackendRequest) -> AsyncIterator[TokenChunk]:
        self.requests.append(request)
        params = request.sampling_params
        script = self.tokens_for(request)
        stops = set(params.stop_token_ids)
        if self.eos_token_id is not None and not params.ignore_eos:
            stops.add(self.eos_token_id)
        done = False
        emitted = 0
        try:
            while not done:
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                else:
                    await asyncio.sleep(0)
                batch: list[int] = []
                finish: str | None = None
                while len(batch) < self.tokens_per_chunk and finish is None:
                    if self.fail_after is not None and emitted >= self.fail_after:
                        raise BackendError(f"fake failure after {emitted} tokens")
                    if emitted >= len(script):
                        finish = "length" if params.max_tokens is not None else "stop"
                        break
                    token = script[emitted]
                    batch.append(token)
                    emitted += 1
                    if token in stops and emitted > params.min_tokens:
                        finish = "stop"
                    elif params.max_tokens is not None and emitted >= params.max_tokens:
                        finish = "length"
                done = finish is not None
                yield TokenChunk(
                    token_ids=tuple(batch),
                    num_prompt_tokens=len(request.prompt_token_ids),
                    logprobs=self._logprobs(batch, params.logprobs),
                    finish_reason=finish,
                    num_cached_tokens=self.num_cached_tokens,
                    prompt_logprobs=(self._prompt_logprobs(request.prompt_token_ids, params.prompt_logprobs)
                                     if emitted == len(batch) else None),
                )
        finally:  # runs once the consumer exhausts or closes the stream, never while it hangs open
            (self.finished if done else self.cancelled).append(request.request_id)

    def _logprobs(self, tokens: list[int], k: int | None) -> tuple[TokenLogprobs, ...] | None:
        if k is None:
            return None
        out = []
        for token in tokens:
            alts = [(token + j) % self.vocab_size for j in range(k)]
            out.append(TokenLogprobs(
                token_id=token, logprob=-0.5, rank=1,
                top_token_ids=tuple(alts),
                top_logprobs=tuple(-0.5 - j for j in range(k)),
            ))
        return tuple(out)

    def _prompt_logprobs(self, prompt: Sequence[int], k: int | None) -> tuple[TokenLogprobs | None, ...] | None:
        if k is None:
            return None
        out: list[TokenLogprobs | None] = [None]
        for i, token in enumerate(prompt[1:], start=1):
            alts = [(token + 1 + j) % self.vocab_size for j in range(k)]
            out.append(TokenLogprobs(token_id=token, logprob=-1.0 - i, rank=2, top_token_ids=tuple(alts),
                                     top_logprobs=tuple(-0.25 - j for j in range(k))))
        return tuple(out)
