"""Replays a ``workload`` against one or more router replicas (OpenAI
completions with token-id prompts, streamed) and times every request.

Requests go to the replicas in turn (a load balancer with no affinity, the
hard case for replicas sharing no state). A request counts as ``ok`` only
when its stream ends normally with exactly ``max_tokens`` tokens (the
workload sets ``ignore_eos``); anything else is a lost request, with the
reason in ``error``. With ``expected`` the token strings are also checked
against what the simulated model must produce (``exact``).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from splitserve.sim.workload import Session, Turn


@dataclass
class RequestResult:
    session_id: int
    turn: int
    router: int
    prompt_tokens: int
    max_tokens: int
    sent_at_s: float = 0.0  # since the replay started
    ok: bool = False
    error: str = ""
    ttft_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    tokens: list[str] = field(default_factory=list)
    exact: bool | None = None


Expected = Callable[[Turn], list[str]]
"""The token strings a turn must produce (for the exactness check)."""


def completion_body(model: str, prompt: Sequence[int], max_tokens: int) -> dict[str, Any]:
    """The streamed, greedy, ignore_eos completion every replayed turn sends."""
    return {"model": model, "prompt": list(prompt), "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True, "logprobs": 0, "stream_options": {"include_usage": True}}


class StreamTally:
    """Folds one streamed completion's SSE ``data:`` payloads into ``result``
    (TTFT, ITLs, tokens); ``close`` judges it. Any HTTP client feeds it."""

    def __init__(self, result: RequestResult, max_tokens: int) -> None:
        self.result, self.max_tokens = result, max_tokens
        self.start = self.last = time.perf_counter()
        self.finish: str | None = None
        self.usage_tokens: int | None = None

    def feed(self, data: str) -> bool:
        """Take one payload; False once the stream is over ([DONE] or an error event)."""
        if data == "[DONE]":
            return False
        chunk = json.loads(data)
        result = self.result
        if "error" in chunk:
            result.error = f"stream error: {chunk['error'].get('message', chunk['error'])}"
            return False
        if chunk.get("usage"):
            self.usage_tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices") or ():
            tokens = (choice.get("logprobs") or {}).get("tokens") or []
            now = time.perf_counter()
            if tokens:
                if result.ttft_s is None:
                    result.ttft_s = now - self.start
                else:
                    result.itls_s.extend([(now - self.last) / len(tokens)] * len(tokens))
                self.last = now
                result.tokens.extend(tokens)
            self.finish = choice.get("finish_reason") or self.finish
        return True

    def close(self) -> None:
        """Set e2e time and ``ok`` (or why not) once the stream ended."""
        result = self.result
        result.e2e_s = time.perf_counter() - self.start
        if result.error:
            return
        if self.finish is None:
            result.error = "the stream ended without a finish_reason"
        elif len(result.tokens) != self.max_tokens or (self.usage_tokens is not None
                                                       and self.usage_tokens != self.max_tokens):
            result.error = f"{len(result.tokens)} tokens (usage {self.usage_tokens}), expected {self.max_tokens}"
        else:
            result.ok = True


async def stream_completion(client: httpx.AsyncClient, base_url: str, model: str, prompt: Sequence[int],
                            max_tokens: int, result: RequestResult, timeout_s: float = 120.0) -> None:
    """Send one streamed completion; fill ``result`` (never raises for a
    failed request: the failure is recorded)."""
    tally = StreamTally(result, max_tokens)
    try:
        async with client.stream("POST", f"{base_url}/v1/completions", json=completion_body(model, prompt, max_tokens),
                                 timeout=timeout_s) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if line.startswith("data: ") and not tally.feed(line[6:]):
                    break
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        tally.close()


async def replay_sessions(sessions: Sequence[Session], base_urls: Sequence[str], model: str, *,
                          expected: Expected | None = None, time_scale: float = 1.0,
                          max_connections: int = 512) -> tuple[list[RequestResult], float]:
    """Run every session (first turn at its start time, each later turn its
    think time after the previous finished); return results and wall time."""
    if not base_urls:
        raise ValueError("replay needs at least one router URL")
    turn_robin = itertools.count()
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    async with httpx.AsyncClient(limits=limits, timeout=None) as client:
        start = time.perf_counter()

        async def session(s: Session) -> None:
            await asyncio.sleep(max(0.0, start + s.start_s * time_scale - time.perf_counter()))
            for turn in s.turns:
                if turn.think_s:
                    await asyncio.sleep(turn.think_s * time_scale)
                router = next(turn_robin) % len(base_urls)
                result = RequestResult(s.session_id, turn.turn, router, len(turn.prompt), turn.max_tokens,
                                       sent_at_s=time.perf_counter() - start)
                results.append(result)
                await stream_completion(client, base_urls[router], model, turn.prompt, turn.max_tokens, result)
                if expected is not None and result.ok:
                    result.exact = result.tokens == expected(turn)

        await asyncio.gather(*(session(s) for s in sessions))
        return results, time.perf_counter() - start
