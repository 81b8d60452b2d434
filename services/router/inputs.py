"""Validated, tokenized generation input: OpenAI request bodies -> ``GenerationInput``.

Everything a client can get wrong is checked here, before any backend call:
model name, limits, parameter ranges, prompt token ids, refused fields and
structured-output constraints (compiled once: a bad schema is a 400 here).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.structured import Constraint
from splitserve.router.constraints import ConstraintChecker, checked_constraint
from splitserve.router.errors import bad_request, model_not_found
from splitserve.router.protocol import (REFUSED_FIELDS, ChatCompletionRequest, ChatMessage, CompletionRequest,
                                        DetokenizeRequest, TokenizeRequest, _SamplingFields)
from splitserve.router.settings import RouterSettings
from splitserve.router.tool_calls import ToolCallPlan, tool_call_plan

Endpoint = Literal["chat", "completion"]


class ChatTokenizer(Protocol):
    """The Hugging Face tokenizer methods used to build prompts."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: Any, skip_special_tokens: bool = ...) -> str: ...

    def convert_ids_to_tokens(self, ids: Any) -> Any: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class GenerationInput:
    """One OpenAI request, ready for the backend.

    ``prompts`` holds one token-id prompt per completions prompt (chat: one);
    each gets ``sampling_params.n`` choices, numbered prompt-major as vLLM.
    ``logprobs`` is the number of alternatives per token (None: no logprobs).
    ``echo_prompts`` (completions with ``echo``) is each prompt's text, put
    before its choices' text; ``tool_plan`` (chat with tools) says how the
    output becomes ``tool_calls``.
    """

    endpoint: Endpoint
    model: str
    prompts: tuple[tuple[int, ...], ...]
    sampling_params: SamplingParams
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    continuous_usage_stats: bool = False
    logprobs: int | None = None
    cache_salt: str | None = None
    user: str | None = None
    echo_prompts: tuple[str, ...] | None = None
    tool_plan: ToolCallPlan | None = None
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.sampling_params.n

    def choice_seed(self, choice: int) -> int | None:
        """Seed of choice ``choice`` of a prompt: the parent seed for choice 0,
        then values derived from it (stable across routers and restarts)."""
        seed = self.sampling_params.seed
        if seed is None or choice == 0:
            return seed
        digest = hashlib.sha256(f"splitserve.seed:{seed}:{choice}".encode()).digest()
        return int.from_bytes(digest[:8], "little") % 2**63


def chat_input(request: ChatCompletionRequest, tokenizer: ChatTokenizer,
               settings: RouterSettings, arrival_time: float,
               constraints: ConstraintChecker | None = None) -> GenerationInput:
    """Apply the chat template (as vLLM: render text with the tools, then
    tokenize without adding special tokens again) and validate."""
    _check_model(request.model, settings)
    _refuse_fields(request)
    plan = tool_call_plan(request.tools, request.tool_choice, settings.tool_call_parser)
    constraint = checked_constraint(constraints, request.response_format, request.structured_outputs,
                                    plan.schema if plan is not None else None)
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    conversation = [_message_dict(m) for m in request.messages]
    template_kwargs: dict[str, Any] = {}
    if request.tools:  # as vLLM (default): the template sees the tools under "none" too
        template_kwargs["tools"] = [t.model_dump(exclude_none=True) for t in request.tools]
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False,
                                             **template_kwargs)
    except Exception as exc:  # jinja errors: the template refused these messages
        raise bad_request(f"the chat template failed on these messages: {exc}", "messages") from None
    prompt = tuple(tokenizer.encode(text, add_special_tokens=False))
    return _build("chat", request, (prompt,), max_tokens, logprobs, settings, arrival_time, constraint,
                  tool_plan=plan)


def completion_input(request: CompletionRequest, tokenizer: ChatTokenizer,
                     settings: RouterSettings, arrival_time: float,
                     constraints: ConstraintChecker | None = None) -> GenerationInput:
    """Tokenize the prompt(s): a string, strings, token ids or lists of ids."""
    _check_model(request.model, settings)
    _refuse_fields(request)
    if request.suffix:
        raise bad_request("suffix is not supported by this server", "suffix")
    raw = request.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]  # type: ignore[list-item]
    if not raw:
        raise bad_request("prompt must not be empty", "prompt")
    prompts: list[tuple[int, ...]] = []
    texts: list[str] = []
    vocab_size = len(tokenizer)
    for item in raw:
        if isinstance(item, str):
            prompts.append(tuple(tokenizer.encode(item, add_special_tokens=True)))
            texts.append(item)
        else:
            if item and (min(item) < 0 or max(item) >= vocab_size):  # C-speed scans; walk only to refuse
                bad = next(t for t in item if not 0 <= t < vocab_size)
                raise bad_request(f"token id {bad} is out of vocabulary (size {vocab_size})", "prompt")
            prompts.append(tuple(item))
            if request.echo:
                texts.append(tokenizer.decode(list(item)))
    if request.logprobs is not None and not 0 <= request.logprobs <= SamplingParams.MAX_LOGPROBS:
        raise bad_request(f"logprobs must be in [0, {SamplingParams.MAX_LOGPROBS}], got {request.logprobs}",
                          "logprobs")
    constraint = checked_constraint(constraints, request.response_format, request.structured_outputs)
    return _build("completion", request, tuple(prompts), request.max_tokens, request.logprobs,
                  settings, arrival_time, constraint,
                  echo_prompts=tuple(texts) if request.echo else None)


def _build(endpoint: Endpoint, request: _SamplingFields, prompts: tuple[tuple[int, ...], ...],
           max_tokens: int | None, logprobs: int | None, settings: RouterSettings,
           arrival_time: float, constraint: Constraint | None,
           echo_prompts: tuple[str, ...] | None = None, tool_plan: ToolCallPlan | None = None) -> GenerationInput:
    for prompt in prompts:
        if not prompt:
            raise bad_request("the prompt has no tokens; send a non-empty prompt", "prompt")
        if len(prompt) > settings.max_prompt_tokens:
            raise bad_request(
                f"the prompt has {len(prompt)} tokens, more than this server's limit of "
                f"{settings.max_prompt_tokens}; shorten it", "prompt")
    if not 1 <= request.n <= settings.max_n:
        raise bad_request(f"n must be in [1, {settings.max_n}], got {request.n}", "n")
    if max_tokens is None:
        max_tokens = settings.default_max_tokens or settings.max_tokens_limit
    elif not 1 <= max_tokens <= settings.max_tokens_limit:
        raise bad_request(f"max_tokens must be in [1, {settings.max_tokens_limit}], got {max_tokens}",
                          "max_tokens")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > settings.max_stop_strings:
        raise bad_request(f"at most {settings.max_stop_strings} stop strings, got {len(stop)}", "stop")
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options can only be given when stream=true", "stream_options")
    sampling = _sampling_params(request, max_tokens, logprobs, constraint)
    options = request.stream_options
    return GenerationInput(
        endpoint=endpoint, model=request.model, prompts=prompts, sampling_params=sampling,
        stop=tuple(s for s in stop if s), stream=request.stream,
        include_usage=bool(options and options.include_usage),
        continuous_usage_stats=bool(options and options.continuous_usage_stats),
        logprobs=logprobs, cache_salt=request.cache_salt, user=request.user,
        echo_prompts=echo_prompts, tool_plan=tool_plan, arrival_time=arrival_time)


def _refuse_fields(request: _SamplingFields) -> None:
    """A 400 naming the first known-but-unserved field the request sets."""
    for name, why in REFUSED_FIELDS.items():
        if name in request.model_fields_set and getattr(request, name) not in (None, False, {}, []):
            raise bad_request(f"{why}; leave {name} unset", name)
    if request.best_of is not None and request.best_of != request.n:
        raise bad_request(f"best_of other than n is not supported by this server (got best_of={request.best_of}, "
                          f"n={request.n})", "best_of")


def _sampling_params(request: _SamplingFields, max_tokens: int, logprobs: int | None,
                     constraint: Constraint | None) -> SamplingParams:
    prompt_logprobs = request.prompt_logprobs
    if request.stream and prompt_logprobs is not None and (prompt_logprobs > 0 or prompt_logprobs == -1):
        raise bad_request("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")  # vLLM's
    echo_logprobs = getattr(request, "echo", False) and logprobs is not None
    if prompt_logprobs is None and echo_logprobs:
        prompt_logprobs = logprobs  # as vLLM: echoed prompt tokens carry logprobs too
    elif request.stream and not echo_logprobs:
        prompt_logprobs = None  # 0 is accepted with a stream, as vLLM, which shows none there
    if prompt_logprobs is not None and not 0 <= prompt_logprobs <= SamplingParams.MAX_LOGPROBS:
        raise bad_request(f"prompt_logprobs must be in [0, {SamplingParams.MAX_LOGPROBS}], got {prompt_logprobs}",
                          "prompt_logprobs")
    values: dict[str, Any] = {
        "n": request.n, "max_tokens": max_tokens, "min_tokens": request.min_tokens,
        "seed": request.seed, "stop_token_ids": list(request.stop_token_ids or []),
        "ignore_eos": request.ignore_eos, "logprobs": logprobs, "prompt_logprobs": prompt_logprobs,
        "skip_special_tokens": request.skip_special_tokens, "constraint": constraint,
    }
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                 "frequency_penalty", "repetition_penalty"):
        value = getattr(request, name)
        if value is not None:
            values[name] = value
    try:
        return SamplingParams(**values)
    except InvalidRequestError as exc:
        raise bad_request(str(exc)) from None


def tokenize(request: TokenizeRequest, tokenizer: ChatTokenizer, settings: RouterSettings) -> dict[str, Any]:
    """vLLM's ``/tokenize``: the prompt's ids as a completions (``prompt``,
    special tokens added by default) or chat (``messages``, templated, none
    added by default) request would send them."""
    if request.model is not None:
        _check_model(request.model, settings)
    if (request.prompt is None) == (request.messages is None):
        raise bad_request("send exactly one of prompt and messages", "prompt")
    if request.messages is not None:
        if request.continue_final_message and request.add_generation_prompt:
            raise bad_request("cannot set both continue_final_message and add_generation_prompt to true",
                              "continue_final_message")
        kwargs: dict[str, Any] = {"add_generation_prompt": request.add_generation_prompt,
                                  "continue_final_message": request.continue_final_message}
        if request.tools:
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in request.tools]
        try:
            text = tokenizer.apply_chat_template([_message_dict(m) for m in request.messages], tokenize=False,
                                                 **kwargs)
        except Exception as exc:  # jinja errors: the template refused these messages
            raise bad_request(f"the chat template failed on these messages: {exc}", "messages") from None
        add_special = bool(request.add_special_tokens)
    else:
        text = request.prompt or ""
        add_special = request.add_special_tokens is not False
    ids = tokenizer.encode(text, add_special_tokens=add_special)
    strs = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
    return {"count": len(ids), "max_model_len": settings.max_prompt_tokens, "tokens": ids, "token_strs": strs}


def detokenize(request: DetokenizeRequest, tokenizer: ChatTokenizer, settings: RouterSettings) -> dict[str, Any]:
    """vLLM's ``/detokenize``: ``{"prompt": text}`` (special tokens kept)."""
    if request.model is not None:
        _check_model(request.model, settings)
    vocab_size = len(tokenizer)
    bad = [t for t in request.tokens if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"token id {bad[0]} is out of vocabulary (size {vocab_size})", "tokens")
    return {"prompt": tokenizer.decode(request.tokens)}


def _check_model(model: str, settings: RouterSettings) -> None:
    if model not in settings.served_model_names:
        raise model_not_found(model)


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        content = "\n".join(part.text for part in content)
    out: dict[str, Any] = dict(message.model_extra or {})
    out.update(role=message.role, content=content if content is not None else "")
    if message.name is not None:
        out["name"] = message.name
    return out

