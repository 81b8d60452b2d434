"""One choice's pipeline: backend tokens -> text deltas with stop strings; and
the merge of several choices into one stream."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from splitserve.engine.request import TokenLogprobs
from splitserve.router.backend import BackendRequest, GenerationBackend
from splitserve.router.detokenizer import IncrementalDetokenizer, TextDecoder
from splitserve.router.stop_strings import StopStringMatcher


@dataclass(frozen=True)
class ChoiceDelta:
    """What one choice produced since its previous delta.

    ``token_ids`` and ``logprobs`` are the backend's new tokens (counted in
    usage even when a stop string hides their text); ``text`` is the new text
    safe to show; ``finish_reason`` is set on the choice's last delta.
    ``prompt_logprobs`` (when asked) comes on the choice's first delta.
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None


async def stream_choice(backend: GenerationBackend, request: BackendRequest, index: int,
                        tokenizer: TextDecoder, stop: Sequence[str]) -> AsyncIterator[ChoiceDelta]:
    """Run ``request`` on ``backend`` and yield its deltas.

    A stop string finishes the choice with "stop" and closes the backend
    stream, which cancels the request on the pods. So does closing this
    iterator.
    """
    params = request.sampling_params
    detok = IncrementalDetokenizer(tokenizer, request.prompt_token_ids, params.skip_special_tokens)
    matcher = StopStringMatcher(stop)
    stop_ids = set(params.stop_token_ids)
    if tokenizer.eos_token_id is not None and not params.ignore_eos:
        stop_ids.add(tokenizer.eos_token_id)
    async with aclosing(backend.generate(request)) as chunks:
        async for chunk in chunks:
            finish = chunk.finish_reason
            text_ids = chunk.token_ids
            if finish == "stop" and text_ids and text_ids[-1] in stop_ids:
                text_ids = text_ids[:-1]  # as vLLM: the stop token is not in the text
            text = detok.add(text_ids)
            if finish is not None:
                text += detok.flush()
            result = matcher.feed(text)
            text = result.text
            if result.stopped:
                finish = "stop"
            elif finish is not None:
                text += matcher.flush()
            yield ChoiceDelta(index=index, text=text, token_ids=chunk.token_ids,
                              logprobs=chunk.logprobs, finish_reason=finish,
                              num_prompt_tokens=chunk.num_prompt_tokens,
                              num_cached_tokens=chunk.num_cached_tokens,
                              prompt_logprobs=chunk.prompt_logprobs)
            if finish is not None:
                return


_DONE = object()


def merge_choices(streams: Sequence[AsyncIterator[ChoiceDelta]]) -> AsyncIterator[ChoiceDelta]:
    """Interleave choices in arrival order. An error in one choice raises here
    and cancels the others; closing this iterator cancels them all. One
    choice is its own stream (no generator in between on every delta)."""
    if len(streams) == 1:
        return streams[0]
    return _interleaved(streams)


async def _interleaved(streams: Sequence[AsyncIterator[ChoiceDelta]]) -> AsyncIterator[ChoiceDelta]:
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump(stream: AsyncIterator[ChoiceDelta]) -> None:
        try:
            async with aclosing(stream):  # type: ignore[type-var]
                async for delta in stream:
                    await queue.put(delta)
        except Exception as exc:
            await queue.put(exc)
            return
        await queue.put(_DONE)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
