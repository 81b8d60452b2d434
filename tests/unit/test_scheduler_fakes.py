"""A fake model runner for scheduler/engine tests (no torch, no device).

It keeps a fake paged KV cache: computing position p writes token_ids[p] into
slot p of the request's block table, and a sampled token is a function of the
tokens *read back from the blocks*, not of the request's token list. A wrong
block table, a bad prefix hit or a block reused while still in use therefore
changes the outputs, which the tests compare against an unconstrained run.
"""
from __future__ import annotations

import hashlib

from splitserve.engine.engine_args import EngineArgs
from splitserve.engine.engine_core import EngineCore
from splitserve.engine.request import TokenLogprobs
from splitserve.engine.step_io import ModelRunnerOutput, SchedulerOutput

EMPTY = -1


def next_token(context: list[int], seed: int, position: int, vocab_size: int) -> int:
    """Deterministic 'model': a hash of the whole context, the seed and the
    output position (position-keyed like the real sampler)."""
    digest = hashlib.blake2b(repr((context, seed, position)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % vocab_size


class FakeRunner:
    def __init__(
        self,
        num_blocks: int = 64,
        block_size: int = 4,
        max_model_len: int = 128,
        vocab_size: int = 50,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.kv = [[EMPTY] * block_size for _ in range(num_blocks)]
        self.steps: list[SchedulerOutput] = []
        self.fail_next = False

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected runner failure")
        self.steps.append(so)
        out = ModelRunnerOutput()
        bs = self.block_size
        for request, num_new, samples in zip(so.requests, so.num_scheduled_tokens, so.samples):
            start = request.num_computed_tokens
            if start + num_new > len(request.block_ids) * bs:
                raise RuntimeError(f"{request.request_id}: blocks do not cover the chunk")
            for pos in range(start, start + num_new):
                self.kv[request.block_ids[pos // bs]][pos % bs] = request.token_ids[pos]
            if samples:
                end = start + num_new
                context = [self.kv[request.block_ids[p // bs]][p % bs] for p in range(end)]
                token = next_token(context, request.seed, request.num_output_tokens, self.vocab_size)
                out.request_ids.append(request.request_id)
                out.sampled_token_ids.append(token)
                wants = request.sampling_params.logprobs
                out.logprobs.append(TokenLogprobs(token, -0.5, 1) if wants is not None else None)
        return out

    def copy_blocks_from(self, other: FakeRunner, src: list[int], dst: list[int]) -> None:
        """A fake KV pull: other's blocks ``src`` into this runner's ``dst``."""
        for s, d in zip(src, dst):
            self.kv[d] = list(other.kv[s])


def make_core(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    max_model_len: int = 128,
    vocab_size: int = 50,
    eos_token_ids: frozenset[int] = frozenset(),
    **engine_kwargs: object,
) -> EngineCore:
    runner = FakeRunner(num_blocks, block_size, max_model_len, vocab_size, eos_token_ids)
    args = EngineArgs.from_kwargs(**engine_kwargs)  # the runner's block_size wins
    return EngineCore(args, runner)


def run_to_completion(
    core: EngineCore, max_steps: int = 10_000
) -> tuple[dict[str, list[int]], dict[str, str | None]]:
    """Step until nothing is unfinished; return each request's output tokens
    and finish reason."""
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str | None] = {}
    for _ in range(max_steps):
        if not core.has_unfinished_requests():
            break
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    else:
        raise AssertionError("engine did not drain")
    return tokens, reasons
