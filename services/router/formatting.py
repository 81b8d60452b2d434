"""OpenAI response shapes (plain JSON-able dicts, built at the edge).

Logprob token strings follow vLLM: each token decoded on its own
(``tokenizer.decode([id])``), logprobs clamped at -9999.0; chat ``bytes`` are
the UTF-8 of that string. Chat ``top_logprobs`` lists the top-k alternatives in
rank order; completions ``top_logprobs`` maps the sampled token and the top-k
alternatives (at most ``logprobs + 1`` entries, as OpenAI documents).
``prompt_logprobs`` (vLLM's extension) is a list with ``None`` for prompt
token 0, then per token ``{token_id: {"logprob", "rank", "decoded_token"}}``:
the prompt token first, then the top-k in rank order.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from splitserve.engine.request import TokenLogprobs

_MIN_LOGPROB = -9999.0


class TokenDecoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage; ``prompt_tokens_details.cached_tokens`` when
    ``cached_tokens`` is given (vLLM: ``--enable-prompt-tokens-details``)."""
    body: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


def model_list(names: Sequence[str], created: int, root: str, max_model_len: int) -> dict[str, Any]:
    """``/v1/models`` as vLLM's server answers it."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "splitserve", "root": root,
         "parent": None, "max_model_len": max_model_len,
         "permission": [{"id": f"modelperm-{name}", "object": "model_permission", "created": created,
                         "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                         "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                         "organization": "*", "group": None, "is_blocking": False}]}
        for name in names]}


def _token_str(tokenizer: TokenDecoder, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def chat_logprobs_content(tokenizer: TokenDecoder, entries: Sequence[TokenLogprobs],
                          top_k: int) -> list[dict[str, Any]]:
    """``choices[i].logprobs.content`` items for ``entries``."""
    out = []
    for entry in entries:
        token = _token_str(tokenizer, entry.token_id)
        top = []
        for token_id, logprob in list(zip(entry.top_token_ids, entry.top_logprobs))[:top_k]:
            alt = _token_str(tokenizer, token_id)
            top.append({"token": alt, "logprob": _clamp(logprob),
                        "bytes": list(alt.encode("utf-8", errors="replace"))})
        out.append({"token": token, "logprob": _clamp(entry.logprob),
                    "bytes": list(token.encode("utf-8", errors="replace")), "top_logprobs": top})
    return out


def prompt_logprobs_body(tokenizer: TokenDecoder,
                         entries: Sequence[TokenLogprobs | None]) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs`` list for one prompt."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        body = {str(entry.token_id): {"logprob": _clamp(entry.logprob), "rank": entry.rank,
                                      "decoded_token": _token_str(tokenizer, entry.token_id)}}
        for rank, (token_id, logprob) in enumerate(zip(entry.top_token_ids, entry.top_logprobs), start=1):
            body.setdefault(str(token_id), {"logprob": _clamp(logprob), "rank": rank,
                                            "decoded_token": _token_str(tokenizer, token_id)})
        out.append(body)
    return out


class CompletionLogprobsBuilder:
    """Builds completions ``logprobs`` objects for one choice; ``text_offset``
    continues across streamed chunks (offsets in characters of token strings,
    as vLLM). A ``None`` entry (echoed prompt token 0) has its token but no
    logprobs, as vLLM's ``null``s."""

    def __init__(self, tokenizer: TokenDecoder, top_k: int, initial_offset: int = 0) -> None:
        self._tokenizer = tokenizer
        self._top_k = top_k
        self._offset = initial_offset

    def build(self, entries: Sequence[TokenLogprobs | None],
              token_ids: Sequence[int] = ()) -> dict[str, Any]:
        """``token_ids[i]`` names the token of a ``None`` entry ``i``."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        text_offset: list[int] = []
        for i, entry in enumerate(entries):
            if entry is None:
                token = _token_str(self._tokenizer, token_ids[i])
                tokens.append(token)
                token_logprobs.append(None)
                top_logprobs.append(None)
                text_offset.append(self._offset)
                self._offset += len(token)
                continue
            token = _token_str(self._tokenizer, entry.token_id)
            tokens.append(token)
            token_logprobs.append(_clamp(entry.logprob))
            top: dict[str, float] = {token: _clamp(entry.logprob)}
            for token_id, logprob in list(zip(entry.top_token_ids, entry.top_logprobs))[:self._top_k]:
                top.setdefault(_token_str(self._tokenizer, token_id), _clamp(logprob))
            top_logprobs.append(top)
            text_offset.append(self._offset)
            self._offset += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs, "text_offset": text_offset}


def chat_choice(index: int, text: str | None, finish_reason: str | None,
                logprobs: list[dict[str, Any]] | None,
                tool_calls: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = list(tool_calls)
    return {"index": index, "message": message,
            "logprobs": None if logprobs is None else {"content": logprobs},
            "finish_reason": finish_reason}


def chat_delta_choice(index: int, delta: dict[str, Any], finish_reason: str | None,
                      logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {"index": index, "delta": delta,
            "logprobs": None if logprobs is None else {"content": logprobs},
            "finish_reason": finish_reason}


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict[str, Any] | None,
                      prompt_logprobs: list[Any] | None = None) -> dict[str, Any]:
    body = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs
    return body


def envelope(request_id: str, obj: str, created: int, model: str,
             choices: list[dict[str, Any]], usage_: dict[str, int] | None = None,
             include_usage_key: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"id": request_id, "object": obj, "created": created,
                            "model": model, "choices": choices}
    if usage_ is not None or include_usage_key:
        body["usage"] = usage_
    return body
