"""The transport-free OpenAI core: ``GenerationInput`` in, a response body or
SSE event strings out. FastAPI routes only convert and call this."""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import orjson

from splitserve.engine.request import TokenLogprobs
from splitserve.router import formatting as fmt
from splitserve.router.backend import BackendError, BackendRequest, BackendUnavailableError, GenerationBackend
from splitserve.router.block_hasher import PromptBlockHasher
from splitserve.router.choice_stream import ChoiceDelta, merge_choices, stream_choice
from splitserve.router.constraints import ConstraintChecker
from splitserve.router.detokenizer import TokenText, Tokenizer
from splitserve.router.errors import OpenAIError, internal_error, service_unavailable
from splitserve.router.inputs import (ChatTokenizer, GenerationInput, chat_input, completion_input, detokenize,
                                     tokenize)
from splitserve.router.metrics import RouterMetrics
from splitserve.router.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from splitserve.router.settings import RouterSettings
from splitserve.router.tool_calls import ToolCallStream, parse_output

logger = logging.getLogger(__name__)

_OBJECTS = {"chat": ("chatcmpl", "chat.completion"), "completion": ("cmpl", "text_completion")}
SSE_DONE = b"data: [DONE]\n\n"
"""The last server-sent event of every stream, as OpenAI and vLLM end theirs."""


class ServingTokenizer(Tokenizer, ChatTokenizer, Protocol):
    """Encode, decode, chat template: a Hugging Face tokenizer satisfies it."""


@dataclass
class _Choice:
    """Per-choice totals while a request runs."""

    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None


class OpenAIServing:
    """Serves chat and completions requests on a ``GenerationBackend``."""

    def __init__(self, backend: GenerationBackend, tokenizer: ServingTokenizer,
                 settings: RouterSettings, metrics: RouterMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.text = TokenText(tokenizer)  # decode and EOS for the per-token work
        self.settings = settings
        self.block_hasher = PromptBlockHasher(settings.block_size)
        self.metrics = metrics or RouterMetrics()
        self.constraints = ConstraintChecker()
        self._clock = clock

    def list_models(self) -> dict[str, Any]:
        """vLLM's ``/v1/models`` entries (``root``, ``parent``,
        ``max_model_len``, ``permission``)."""
        return fmt.model_list(self.settings.served_model_names, int(self._clock()),
                              self.settings.model_root or self.settings.model_name,
                              self.settings.max_prompt_tokens)

    def tokenize(self, request: TokenizeRequest) -> dict[str, Any]:
        """vLLM's ``/tokenize``: ``{count, max_model_len, tokens, token_strs}``."""
        return tokenize(request, self.tokenizer, self.settings)

    def detokenize(self, request: DetokenizeRequest) -> dict[str, Any]:
        """vLLM's ``/detokenize``: ``{prompt}``."""
        return detokenize(request, self.tokenizer, self.settings)

    def chat_input(self, request: ChatCompletionRequest, arrival_time: float) -> GenerationInput:
        return self._counted("chat", chat_input, request, arrival_time)

    def completion_input(self, request: CompletionRequest, arrival_time: float) -> GenerationInput:
        return self._counted("completion", completion_input, request, arrival_time)

    def _counted(self, endpoint: str, build: Callable[..., GenerationInput], request: Any,
                 arrival_time: float) -> GenerationInput:
        try:
            return build(request, self.tokenizer, self.settings, arrival_time, self.constraints)
        except OpenAIError:
            self.metrics.requests.labels(endpoint, "rejected").inc()
            raise

    async def generate(self, inp: GenerationInput) -> dict[str, Any]:
        """Run a non-streaming request to completion and return its body.
        Raises ``OpenAIError`` (500/503) when the backend fails."""
        prefix, obj = _OBJECTS[inp.endpoint]
        request_id = f"{prefix}-{os.urandom(16).hex()}"
        created = int(self._clock())
        choices = [_Choice() for _ in range(inp.num_choices)]
        try:
            async with aclosing(self._deltas(inp, request_id)) as deltas:
                async for delta in deltas:
                    choice = choices[delta.index]
                    choice.text.append(delta.text)
                    choice.num_tokens += len(delta.token_ids)
                    choice.logprobs.extend(delta.logprobs or ())
                    choice.finish_reason = delta.finish_reason or choice.finish_reason
                    choice.num_cached_tokens = max(choice.num_cached_tokens, delta.num_cached_tokens)
                    choice.prompt_logprobs = choice.prompt_logprobs or delta.prompt_logprobs
        except BackendError as exc:
            raise _backend_error(exc) from None
        bodies = []
        for index, choice in enumerate(choices):
            text = "".join(choice.text)
            if inp.endpoint == "chat":
                lp = (fmt.chat_logprobs_content(self.text, choice.logprobs, inp.logprobs or 0)
                      if inp.logprobs is not None else None)
                if inp.tool_plan is None:
                    bodies.append(fmt.chat_choice(index, text, choice.finish_reason, lp))
                    continue
                parsed = parse_output(inp.tool_plan, text)
                # As vLLM: "tool_calls" only when the auto parser found calls.
                finish = ("tool_calls" if parsed.tool_calls and inp.tool_plan.mode == "auto"
                          else choice.finish_reason)
                bodies.append(fmt.chat_choice(index, parsed.content, finish, lp, parsed.tool_calls))
            else:
                prompt = inp.prompts[index // inp.sampling_params.n]
                entries: list[TokenLogprobs | None] = list(choice.logprobs)
                if inp.echo_prompts is not None:
                    text = inp.echo_prompts[index // inp.sampling_params.n] + text
                    entries = [*(choice.prompt_logprobs or ()), *entries]
                clp = (fmt.CompletionLogprobsBuilder(self.text, inp.logprobs).build(entries, prompt)
                       if inp.logprobs is not None else None)
                bodies.append(fmt.completion_choice(index, text, choice.finish_reason, clp,
                                                    self._prompt_logprobs(inp, choice.prompt_logprobs)))
        usage = fmt.usage(sum(len(p) for p in inp.prompts), sum(c.num_tokens for c in choices),
                          self._cached_tokens(inp, [c.num_cached_tokens for c in choices]))
        body = fmt.envelope(request_id, obj, created, inp.model, bodies, usage)
        if inp.endpoint == "chat" and inp.sampling_params.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._prompt_logprobs(inp, choices[0].prompt_logprobs)  # as vLLM: top level
        return body

    def _prompt_logprobs(self, inp: GenerationInput,
                         entries: tuple[TokenLogprobs | None, ...] | None) -> list[Any] | None:
        """vLLM's ``prompt_logprobs`` body when asked, else None."""
        if inp.sampling_params.prompt_logprobs is None:
            return None
        return fmt.prompt_logprobs_body(self.text, entries or (None,))

    def _cached_tokens(self, inp: GenerationInput, per_choice: list[int]) -> int | None:
        """Prompt tokens served from a prefix cache, summed over prompts (each
        prompt counted once: the most any of its choices found), when
        ``enable_prompt_tokens_details`` and there are some (as vLLM, which
        leaves ``prompt_tokens_details`` out at 0); else None."""
        if not self.settings.enable_prompt_tokens_details:
            return None
        n = inp.sampling_params.n
        return sum(max(per_choice[i:i + n]) for i in range(0, len(per_choice), n)) or None

    async def generate_stream(self, inp: GenerationInput) -> AsyncIterator[str]:
        """Yield server-sent events (``data: ...\\n\\n``) ending with ``[DONE]``.

        Closing this iterator (client disconnect) cancels every backend request
        of it. A backend failure becomes an error event, as vLLM does.

        Prompt logprobs show only through ``echo`` with ``logprobs`` here, as
        vLLM (which refuses ``prompt_logprobs`` > 0 with a stream).

        Events that are ready together leave as one string (one socket write):
        the chat role chunks ride with the first token, and the last choice's
        finish with the usage chunk and ``[DONE]``.
        """
        prefix, obj = _OBJECTS[inp.endpoint]
        request_id = f"{prefix}-{os.urandom(16).hex()}"
        created = int(self._clock())
        obj = obj + ".chunk" if inp.endpoint == "chat" else obj
        prompt_tokens = sum(len(p) for p in inp.prompts)
        completion_tokens = 0
        cached = [0] * inp.num_choices
        builders = [fmt.CompletionLogprobsBuilder(self.text, inp.logprobs or 0)
                    for _ in range(inp.num_choices)]
        tools = ([ToolCallStream(inp.tool_plan) for _ in range(inp.num_choices)]
                 if inp.tool_plan is not None else None)
        echo = list(range(inp.num_choices)) if inp.echo_prompts is not None else []

        def event(choices: list[dict[str, Any]], with_usage: bool) -> str:
            usage = (fmt.usage(prompt_tokens, completion_tokens, self._cached_tokens(inp, cached))
                     if with_usage else None)
            body = fmt.envelope(request_id, obj, created, inp.model, choices, usage)
            return f"data: {orjson.dumps(body).decode()}\n\n"

        held = ""  # written with the next event
        if inp.endpoint == "chat":
            held = "".join(event([fmt.chat_delta_choice(index, {"role": "assistant", "content": ""}, None, None)],
                                 inp.continuous_usage_stats) for index in range(inp.num_choices))
        unfinished = inp.num_choices
        try:
            async with aclosing(self._deltas(inp, request_id)) as deltas:
                async for delta in deltas:
                    completion_tokens += len(delta.token_ids)
                    cached[delta.index] = max(cached[delta.index], delta.num_cached_tokens)
                    echoed: tuple[TokenLogprobs | None, ...] = ()
                    if inp.echo_prompts is not None and delta.index in echo:
                        # As vLLM: a choice's prompt text (and logprobs) come with its first delta.
                        echo.remove(delta.index)
                        prompt_text = inp.echo_prompts[delta.index // inp.sampling_params.n]
                        delta = replace(delta, text=prompt_text + delta.text)
                        echoed = delta.prompt_logprobs or ()
                    unfinished -= delta.finish_reason is not None
                    if tools is not None:
                        choice = self._tool_choice(inp, delta, tools[delta.index])
                    elif not delta.text and delta.finish_reason is None and inp.logprobs is None:
                        choice = None
                    else:
                        choice = self._stream_choice(inp, delta, builders, echoed)
                    if choice is None:
                        continue
                    held += event([choice], inp.continuous_usage_stats)
                    if unfinished > 0:
                        yield held
                        held = ""
        except (BackendError, OpenAIError) as exc:
            error = _backend_error(exc) if isinstance(exc, BackendError) else exc
            held += f"data: {json.dumps(error.body())}\n\n"
        else:
            if inp.include_usage:
                held += event([], True)
        yield held + SSE_DONE.decode()

    def _tool_choice(self, inp: GenerationInput, delta: ChoiceDelta,
                     stream: ToolCallStream) -> dict[str, Any] | None:
        body, finish = stream.feed(delta.text, delta.finish_reason is not None)
        if body is None and inp.logprobs is None:
            return None
        lp = (fmt.chat_logprobs_content(self.text, delta.logprobs or (), inp.logprobs or 0)
              if inp.logprobs is not None else None)
        return fmt.chat_delta_choice(delta.index, body or {}, finish or delta.finish_reason, lp)

    def _stream_choice(self, inp: GenerationInput, delta: ChoiceDelta,
                       builders: list[fmt.CompletionLogprobsBuilder],
                       echoed: tuple[TokenLogprobs | None, ...] = ()) -> dict[str, Any]:
        """``echoed``: prompt logprobs that lead this delta's (echo with logprobs)."""
        entries = delta.logprobs or ()
        if inp.endpoint == "chat":
            lp = (fmt.chat_logprobs_content(self.text, entries, inp.logprobs or 0)
                  if inp.logprobs is not None else None)
            body = {"content": delta.text} if delta.text or delta.finish_reason is None else {}
            return fmt.chat_delta_choice(delta.index, body, delta.finish_reason, lp)
        clp = None
        if inp.logprobs is not None:
            clp = builders[delta.index].build([*echoed, *entries], inp.prompts[delta.index // inp.sampling_params.n])
        return fmt.completion_choice(delta.index, delta.text, delta.finish_reason, clp)

    async def _deltas(self, inp: GenerationInput, request_id: str) -> AsyncIterator[ChoiceDelta]:
        """All choices' deltas, with router-side latency metrics and outcome."""
        metrics = self.metrics
        streams = [stream_choice(self.backend, r, i, self.text, inp.stop)
                   for i, r in enumerate(self.backend_requests(inp, request_id))]
        metrics.prompt_tokens.inc(sum(len(p) for p in inp.prompts))
        metrics.request_queue_time.observe(time.monotonic() - inp.arrival_time)
        status = "cancelled"
        last_token_time: list[float | None] = [None] * inp.num_choices
        texts: list[list[str]] | None = None
        if self.settings.enable_log_requests:  # the only place prompt and output text reach a log
            texts = [[] for _ in range(inp.num_choices)]
            logger.info("request %s: prompt %r, prompt_token_ids %s, params %s", request_id,
                        [self.tokenizer.decode(list(p)) for p in inp.prompts], [list(p) for p in inp.prompts],
                        inp.sampling_params)
        try:
            async with aclosing(merge_choices(streams)) as merged:
                async for delta in merged:
                    if texts is not None:
                        texts[delta.index].append(delta.text)
                    now = time.monotonic()
                    if delta.token_ids:
                        previous = last_token_time[delta.index]
                        if previous is None:
                            metrics.time_to_first_token.observe(now - inp.arrival_time)
                        else:
                            metrics.inter_token_latency.observe((now - previous) / len(delta.token_ids))
                        last_token_time[delta.index] = now
                        metrics.generation_tokens.inc(len(delta.token_ids))
                    yield delta
            status = "success"
            metrics.e2e_request_latency.observe(time.monotonic() - inp.arrival_time)
        except BackendError:
            status = "error"
            raise
        finally:
            metrics.requests.labels(inp.endpoint, status).inc()
            if texts is not None:
                logger.info("request %s %s: output %r", request_id, status, ["".join(t) for t in texts])

    def backend_requests(self, inp: GenerationInput, request_id: str) -> list[BackendRequest]:
        """Fan out prompts x n into per-choice requests (choice = prompt * n + i)."""
        params = inp.sampling_params
        out = []
        for p_index, prompt in enumerate(inp.prompts):
            hashes = self.block_hasher.hashes(prompt, inp.cache_salt)
            for i in range(params.n):
                index = p_index * params.n + i
                out.append(BackendRequest(
                    request_id=f"{request_id}-{index}", prompt_token_ids=prompt,
                    sampling_params=params.for_choice(inp.choice_seed(i)),
                    block_hashes=hashes, cache_salt=inp.cache_salt, user=inp.user,
                    arrival_time=inp.arrival_time))
        return out


def _backend_error(exc: BackendError) -> OpenAIError:
    if isinstance(exc, BackendUnavailableError):
        return service_unavailable(f"no pod could take the request: {exc}")
    return internal_error(f"generation failed: {exc}")
