"""The offline API, shaped like vLLM's: ``LLM(model=DIR).generate(prompts, params)``."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Sequence
from typing import Any, Union

from splitserve.engine.engine_args import EngineArgs
from splitserve.engine.engine_core import EngineCore
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.outputs import CompletionOutput, RequestOutput
from splitserve.engine.request import TokenLogprobs
from splitserve.engine.sampling_params import SamplingParams

PromptType = Union[str, dict[str, Any]]


def child_seed(parent_seed: int, index: int) -> int:
    """Seed of sequence ``index`` of an ``n > 1`` request; index 0 keeps the
    parent's seed so ``n=1`` and the first of ``n`` sample alike."""
    if index == 0:
        return parent_seed
    digest = hashlib.sha256(f"splitserve.child_seed:{parent_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class LLM:
    """Runs prompts to completion in the calling thread.

    ``LLM(model=DIR, **engine_args)`` loads the checkpoint and its tokenizer;
    ``LLM.from_engine_core(core, tokenizer)`` wraps an engine already built
    (tests use a fake runner). Bad prompts raise ``InvalidRequestError`` from
    ``generate`` with nothing left queued.
    """

    def __init__(self, model: str, **engine_kwargs: Any) -> None:
        from splitserve.engine.model_runner import load_model_runner
        from splitserve.engine.tokenizer import load_tokenizer

        args = EngineArgs.from_kwargs(model=model, **engine_kwargs)
        self._init(EngineCore(args, load_model_runner(args)), load_tokenizer(model))

    @classmethod
    def from_engine_core(cls, core: EngineCore, tokenizer: Any = None) -> LLM:
        llm = cls.__new__(cls)
        llm._init(core, tokenizer)
        return llm

    def _init(self, core: EngineCore, tokenizer: Any) -> None:
        self.engine_core = core
        self.tokenizer = tokenizer
        core.structured.offer_tokenizer(tokenizer)  # constrained requests reuse it
        self._counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns one ``RequestOutput`` per prompt,
        in order. A prompt is a string (needs a tokenizer) or
        ``{"prompt_token_ids": [...]}``. ``SamplingParams.constraint``
        (``splitserve.engine.structured.Constraint``) gives structured
        outputs; a bad one raises ``InvalidRequestError`` here."""
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if sampling_params is None:
            params_list = [SamplingParams()] * len(prompt_list)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise InvalidRequestError(
                    f"got {len(prompt_list)} prompts but {len(params_list)} sampling params; pass one or one per prompt"
                )
        results: list[RequestOutput] = []
        children: dict[str, tuple[CompletionOutput, SamplingParams]] = {}
        try:
            for prompt, params in zip(prompt_list, params_list):
                results.append(self._add(prompt, params, children))
            prompt_logprobs = self._run(children)
        except BaseException:
            for child_id in children:
                self.engine_core.abort_request(child_id)
            raise
        for result in results:
            result.prompt_logprobs = prompt_logprobs.get(f"{result.request_id}-0")
            for completion in result.outputs:
                params = children[f"{result.request_id}-{completion.index}"][1]
                completion.text = self._decode(completion.token_ids, params)
        return results

    def _add(
        self, prompt: PromptType, params: SamplingParams,
        children: dict[str, tuple[CompletionOutput, SamplingParams]],
    ) -> RequestOutput:
        text, token_ids = self._tokenize(prompt)
        request_id = str(next(self._counter))
        parent_seed = params.seed
        if parent_seed is None and params.n > 1:
            parent_seed = self.engine_core.draw_seed()
        result = RequestOutput(request_id, text, token_ids, [])
        for index in range(params.n):
            seed = None if parent_seed is None else child_seed(parent_seed, index)
            child_params = dataclasses.replace(params, n=1, seed=seed)
            completion = CompletionOutput(index=index, token_ids=[])
            if params.logprobs is not None:
                completion.logprobs, completion.cumulative_logprob = [], 0.0
            child_id = f"{request_id}-{index}"
            self.engine_core.add_request(child_id, token_ids, child_params)
            children[child_id] = (completion, child_params)
            result.outputs.append(completion)
        return result

    def _run(self, children: dict[str, tuple[CompletionOutput, SamplingParams]],
             ) -> dict[str, list[TokenLogprobs | None]]:
        """Step until every child finished; returns the prompt logprobs by child id."""
        prompt_logprobs: dict[str, list[TokenLogprobs | None]] = {}
        pending = set(children)
        while pending:
            for out in self.engine_core.step():
                entry = children.get(out.request_id)
                if entry is None:
                    continue
                completion = entry[0]
                if out.prompt_logprobs is not None:
                    prompt_logprobs[out.request_id] = out.prompt_logprobs
                completion.token_ids.extend(out.new_token_ids)
                if completion.logprobs is not None:
                    completion.logprobs.extend(out.new_logprobs)
                    completion.cumulative_logprob = sum(lp.logprob for lp in completion.logprobs)
                if out.finished:
                    completion.finish_reason = out.finish_reason
                    pending.discard(out.request_id)
            if pending and not self.engine_core.has_unfinished_requests():
                raise RuntimeError(f"engine went idle with {len(pending)} request(s) unfinished")
        return prompt_logprobs

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("text prompts need a tokenizer; pass {'prompt_token_ids': [...]}")
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        raise InvalidRequestError(
            f"a prompt is a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}"
        )

    def _decode(self, token_ids: list[int], params: SamplingParams) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)
