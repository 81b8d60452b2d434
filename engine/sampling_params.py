"""Per-request sampling parameters, shaped like vLLM's ``SamplingParams``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.structured.constraint import Constraint

_GREEDY_EPSILON = 1e-5


@dataclass
class SamplingParams:
    """How to pick output tokens for one request.

    ``temperature == 0`` is greedy. ``top_k`` of 0 or -1 disables top-k.
    ``seed`` makes sampling reproducible: the draw for output token ``i``
    depends only on ``(seed, i)``, so a seeded request yields the same tokens
    unified or disaggregated, after preemption and after failover. Without a
    seed the engine draws one per request.
    ``logprobs`` is the number of top alternatives to return per output token
    (0 returns only the sampled token's logprob; ``None`` returns nothing).
    Logprobs are computed from the raw model distribution, as vLLM does
    (under a ``constraint``: after its mask, as vLLM's).
    ``prompt_logprobs`` asks, like vLLM's, for each prompt token after the
    first its logprob given the tokens before it, its rank and that many top
    alternatives (raw distribution); the engine that computes the prompt
    returns them with the first output token (``EngineOutput.prompt_logprobs``).
    ``constraint`` (structured outputs) restricts the output to a JSON
    schema, regex, choice or grammar: each token is sampled among those that
    keep the text a valid prefix, eos only once it is complete, and the
    request stops ("stop") as soon as nothing else can follow. A mapping is
    read as vLLM's ``structured_outputs`` field.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    constraint: Constraint | None = None

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.constraint, dict):
            self.constraint = Constraint.from_structured_outputs(self.constraint)
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPSILON

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def validate(self) -> None:
        """Raise ``InvalidRequestError`` naming the first bad field."""
        if not (isinstance(self.n, int) and self.n >= 1):
            raise InvalidRequestError(f"n must be an integer >= 1, got {self.n!r}")
        if self.max_tokens is not None:
            if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
                raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.min_tokens, int) and self.min_tokens >= 0):
            raise InvalidRequestError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None:
            if not (self.min_tokens <= self.max_tokens):
                raise InvalidRequestError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if not (_is_number(self.temperature) and self.temperature >= 0.0):
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (_is_number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and 0 <= self.top_k < 2**31):
            raise InvalidRequestError(
                f"top_k must be -1, 0 (disabled) or a positive integer below 2^31, got {self.top_k!r}")
        if not (_is_number(self.min_p) and 0.0 <= self.min_p <= 1.0):
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not (_is_number(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0):
            raise InvalidRequestError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        if not (_is_number(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0):
            raise InvalidRequestError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        if not (_is_number(self.repetition_penalty) and self.repetition_penalty > 0.0):
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None:
            if not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
                raise InvalidRequestError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if not all(isinstance(t, int) and 0 <= t < 2**32 for t in self.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be integers in [0, 2^32), got {self.stop_token_ids!r}")
        if self.logprobs is not None:
            if not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= self.MAX_LOGPROBS):
                raise InvalidRequestError(
                    f"logprobs must be an integer in [0, {self.MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None:
            if not (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= self.MAX_LOGPROBS):
                raise InvalidRequestError(
                    f"prompt_logprobs must be an integer in [0, {self.MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        if not (self.constraint is None or isinstance(self.constraint, Constraint)):
            raise InvalidRequestError(
                f"constraint must be a structured.Constraint, got {type(self.constraint).__name__}")

    def for_choice(self, seed: int | None) -> SamplingParams:
        """These parameters for one choice of the request: ``n`` = 1 and
        ``seed``. Only the seed is checked again (the rest was validated when
        ``self`` was made), which keeps this off the router's per-request cost."""
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
            raise InvalidRequestError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        choice = object.__new__(SamplingParams)
        choice.__dict__.update(self.__dict__)
        choice.stop_token_ids = list(self.stop_token_ids)
        choice.n = 1
        choice.seed = seed
        return choice

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplingParams:
        """Build from a plain mapping (services); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidRequestError(
                f"unknown sampling parameter(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)


def _is_number(value: object) -> bool:
    """A real, finite number (NaN and infinities are refused everywhere)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


