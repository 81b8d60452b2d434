"""One engine: a scheduler and a model runner, advanced one step at a time.

Synchronous and single-threaded; ``LLM`` drives it in a loop and
``AsyncEngine`` from its engine thread.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from splitserve.engine.block_pool import BlockPool
from splitserve.engine.engine_args import EngineArgs
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.outputs import EngineOutput, EngineStats
from splitserve.engine.request import Request
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler, SchedulerConfig
from splitserve.engine.step_io import ModelRunnerOutput, SchedulerOutput
from splitserve.engine.structured.constraint import Constraint
from splitserve.engine.structured.manager import StructuredOutputManager

_SEED_BOUND = 2**63


class Runner(Protocol):
    """What the engine needs from a model runner (``model_runner.ModelRunner``
    or a test fake). ``execute`` computes the scheduled chunks into the KV
    cache and samples one token per ``samples`` flag. A runner with a true
    ``supports_constraints`` attribute samples a constrained request
    (``Request.matcher``) only among the tokens its matcher allows; the
    engine refuses constrained requests on any other runner."""

    num_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...


class EngineCore:
    """Token-in, token-out engine core.

    Not thread-safe: one thread calls every method (but
    ``prepare_constraint``). Bad requests raise
    ``InvalidRequestError`` (or a subclass) from ``add_request`` before
    anything is queued; the engine keeps serving the others.
    """

    def __init__(self, engine_args: EngineArgs, runner: Runner) -> None:
        self.engine_args = engine_args
        self.runner = runner
        self.max_model_len = runner.max_model_len
        self.pool = BlockPool(runner.num_blocks, runner.block_size, engine_args.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=engine_args.max_num_seqs,
                max_num_batched_tokens=engine_args.max_num_batched_tokens,
                max_model_len=runner.max_model_len,
                vocab_size=runner.vocab_size,
                enable_chunked_prefill=engine_args.enable_chunked_prefill,
            ),
            self.pool,
        )
        # Tokenizer and grammars for constrained requests, loaded on the first one.
        self.structured = StructuredOutputManager(self._load_hf_tokenizer, runner.vocab_size,
                                                  runner.eos_token_ids)
        # Seeds for unseeded requests: reproducible per engine seed.
        self._seed_rng = random.Random(engine_args.seed)
        self._num_steps = 0
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._num_finished = 0
        self.last_step_idle = True

    def draw_seed(self) -> int:
        """A fresh request seed from the engine's seeded generator."""
        return self._seed_rng.randrange(_SEED_BOUND)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        *,
        output_token_ids: Sequence[int] = (),
        cache_salt: str | None = None,
        prefill_only: bool = False,
        num_remote_tokens: int = 0,
        arrival_time: float | None = None,
    ) -> Request:
        """Queue one sequence (``n`` must be 1: callers fan out ``n > 1``).

        ``output_token_ids`` are tokens already generated elsewhere (the first
        token from a prefill pod, or the stream so far after a failover); they
        count as outputs, so ``max_tokens`` and the position-keyed seed carry
        on where they stopped. ``num_remote_tokens`` > 0 means the KV of that
        many leading tokens is to be pulled from a remote pod (see
        ``Scheduler.finish_remote_kv``). ``prefill_only`` stops after the
        first token and holds the blocks for a decoder. A constrained request
        gets a matcher that has replayed ``output_token_ids`` (its grammar is
        compiled here unless ``structured.prepare`` did it already).
        Prompt logprobs (``SamplingParams.prompt_logprobs``) are computed only
        where token 0 is sampled, i.e. without ``output_token_ids``: whoever
        continues a request elsewhere got them with token 0 already.
        """
        params = sampling_params if sampling_params is not None else SamplingParams()
        if params.n != 1:
            raise InvalidRequestError(f"the engine core serves one sequence per request; got n={params.n}")
        matcher = None
        if params.constraint is not None:
            self._check_constraints_supported()
            matcher = self.structured.new_matcher(params.constraint, output_token_ids)
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            seed=params.seed if params.seed is not None else self.draw_seed(),
            eos_token_ids=self.runner.eos_token_ids,
            cache_salt=cache_salt,
            prefill_only=prefill_only,
            num_remote_tokens=num_remote_tokens,
        )
        if arrival_time is not None:
            request.arrival_time = arrival_time
        request.token_ids.extend(output_token_ids)
        request.matcher = matcher
        if params.prompt_logprobs is not None and not output_token_ids:
            request.prompt_logprobs = []
        self.scheduler.add_request(request)
        self._prompt_tokens_total += request.num_prompt_tokens
        return request

    def prepare_constraint(self, constraint: Constraint) -> None:
        """Load the tokenizer and compile ``constraint`` ahead of
        ``add_request`` -- the one method safe to call from any thread (a
        service does so off the engine thread). Raises ``InvalidRequestError``
        when it does not compile or this engine cannot serve constraints."""
        self._check_constraints_supported()
        self.structured.prepare(constraint)

    def abort_request(self, request_id: str) -> bool:
        """End a request at once, in any state, freeing its blocks."""
        found = self.scheduler.abort_request(request_id)
        if found:
            self._num_finished += 1
        return found

    def finish_remote_kv(self, request_id: str, ok: bool) -> bool:
        """See ``Scheduler.finish_remote_kv``."""
        return self.scheduler.finish_remote_kv(request_id, ok)

    def release_held_blocks(self, request_id: str) -> bool:
        """See ``Scheduler.release_held_blocks``."""
        return self.scheduler.release_held_blocks(request_id)

    def step(self) -> list[EngineOutput]:
        """Schedule, run the model, apply the results; return per-request
        deltas. Exceptions from the runner propagate; the step's requests keep
        their state, so the caller may abort them."""
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            runner_output = ModelRunnerOutput()
        else:
            runner_output = self.runner.execute(scheduler_output)
            self._num_steps += 1
        outputs = self.scheduler.update(scheduler_output, runner_output)
        self.last_step_idle = scheduler_output.is_empty and not outputs
        for output in outputs:
            self._generation_tokens_total += len(output.new_token_ids)
            if output.finished:
                self._num_finished += 1
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> EngineStats:
        return EngineStats(
            scheduler=self.scheduler.stats(),
            block_size=self.pool.block_size,
            num_steps=self._num_steps,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            num_finished_requests=self._num_finished,
        )

    def _check_constraints_supported(self) -> None:
        if not getattr(self.runner, "supports_constraints", False):
            raise InvalidRequestError("this engine cannot serve constrained requests (structured outputs)")

    def _load_hf_tokenizer(self) -> object:
        from splitserve.engine.tokenizer import load_tokenizer

        if not self.engine_args.model:
            raise FileNotFoundError("the engine was built without a model folder")
        return load_tokenizer(self.engine_args.model)

    def check_no_leaks(self) -> None:
        """Raise ``BlockLeakError`` unless no request holds any block (tests)."""
        self.pool.check_no_leaks()
