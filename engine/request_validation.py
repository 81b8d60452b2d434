"""The scheduler's limits and the check every request passes before it is
queued: the one place that decides whether the engine can ever serve it."""
from __future__ import annotations

from dataclasses import dataclass

from splitserve.engine.errors import EmptyPromptError, InvalidRequestError, PromptTooLongError
from splitserve.engine.request import Request


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    vocab_size: int
    enable_chunked_prefill: bool = True


def validate_request(request: Request, config: SchedulerConfig, cache_tokens: int) -> None:
    """Refuse a request the engine can never serve, naming what to change.

    Raises ``InvalidRequestError`` (or a subclass) and changes nothing;
    ``cache_tokens`` is what the whole KV cache holds."""
    if request.num_prompt_tokens == 0:
        raise EmptyPromptError("the prompt is empty: send at least one token")
    bad = next((t for t in request.token_ids if not isinstance(t, int) or not 0 <= t < config.vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad!r} is outside the vocabulary [0, {config.vocab_size})")
    if request.num_tokens + 1 > config.max_model_len:
        raise PromptTooLongError(
            f"the prompt has {request.num_tokens} tokens; with at least one output token it exceeds "
            f"max_model_len={config.max_model_len}: shorten it or raise --max-model-len"
        )
    if request.num_tokens + 1 > cache_tokens:
        raise PromptTooLongError(
            f"the prompt needs KV for {request.num_tokens + 1} tokens but the whole cache holds "
            f"{cache_tokens}: shorten it or give the KV cache more memory"
        )
    if not config.enable_chunked_prefill and request.num_tokens > config.max_num_batched_tokens:
        raise PromptTooLongError(
            f"the prompt has {request.num_tokens} tokens, more than max_num_batched_tokens="
            f"{config.max_num_batched_tokens} without chunked prefill: enable chunked prefill or raise the budget"
        )
    max_tokens = request.sampling_params.max_tokens
    if max_tokens is not None and request.num_output_tokens >= max_tokens:
        raise InvalidRequestError(
            f"the request already has {request.num_output_tokens} output tokens, max_tokens={max_tokens}: "
            "nothing left to generate"
        )
    if not 0 <= request.num_remote_tokens < request.num_tokens:
        raise InvalidRequestError(
            f"num_remote_tokens must be in [0, {request.num_tokens}) for a request of "
            f"{request.num_tokens} tokens, got {request.num_remote_tokens}"
        )
    if request.prefill_only and request.num_remote_tokens:
        raise InvalidRequestError("a request cannot be both prefill-only and waiting for remote KV")
