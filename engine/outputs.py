"""What the engine hands back: per-step deltas, stats, and offline results."""
from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.engine.request import TokenLogprobs
from splitserve.engine.step_io import RemoteKVLoad


@dataclass
class EngineOutput:
    """One request's news from one engine step.

    ``new_token_ids`` are the tokens sampled this step (usually one; none for
    a pure ``remote_kv_load`` notice). ``finished`` is the last output of the
    request on this engine: ``finish_reason`` is then "stop", "length" or
    "abort", or ``None`` for a prefill-only request handed off to a decoder,
    whose blocks are named in ``held_block_ids`` and stay pinned until
    ``release_held_blocks``. ``remote_kv_load`` tells the caller which blocks
    to fill by a KV pull before calling ``finish_remote_kv``.
    ``prompt_logprobs`` rides on the output of token 0 of a request that
    asked for them and computed its prompt here: ``None`` for the first
    prompt token (nothing precedes it), then one entry per prompt token.
    """

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    held_block_ids: tuple[int, ...] | None = None
    num_held_tokens: int = 0
    remote_kv_load: RemoteKVLoad | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of the scheduler's gauges and counters (metrics layer)."""

    num_running: int
    num_waiting: int
    num_waiting_for_remote_kv: int
    num_held: int  # prefill-only requests whose blocks await a decoder
    num_held_blocks: int
    queued_prompt_tokens: int  # prompt tokens of waiting requests not yet computed
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float  # 0..1
    num_preemptions: int  # total since start
    prefix_cache_queries: int  # tokens, total since start
    prefix_cache_hits: int  # tokens, total since start


@dataclass(frozen=True)
class EngineStats:
    """``EngineCore.stats()``: scheduler gauges plus the engine's totals."""

    scheduler: SchedulerStats
    block_size: int
    num_steps: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_finished_requests: int


@dataclass
class CompletionOutput:
    """One sampled sequence of an offline ``LLM.generate`` call.

    ``logprobs`` holds one entry per token when the request asked for them
    (``SamplingParams.logprobs`` not None), else None; ``cumulative_logprob``
    is their sum.
    """

    index: int
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """All sequences of one prompt, shaped like vLLM's ``RequestOutput``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)
