"""serving_peer: the vLLM 1P1D client (TTFT = prefill reply, ITL from the decode stream) with fake clients."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from bench.peers.serving_peer import pd_one_request  # noqa: E402
from bench.workload import ChatMessage, ServingRequest  # noqa: E402


def _chunk(tokens: int, usage: int | None = None) -> Any:
    logprobs = SimpleNamespace(content=[object()] * tokens)
    return SimpleNamespace(usage=SimpleNamespace(completion_tokens=usage) if usage is not None else None,
                           choices=[SimpleNamespace(logprobs=logprobs)] if tokens else [])


class _Completions:
    def __init__(self, reply: Any, calls: list[dict]) -> None:
        self.reply, self.calls = reply, calls

    async def create(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        if kwargs.get("stream"):
            async def gen() -> Any:
                for c in self.reply:
                    await asyncio.sleep(0.01)
                    yield c
            return gen()
        await asyncio.sleep(0.02)
        return self.reply


def _client(reply: Any, calls: list[dict]) -> Any:
    return SimpleNamespace(chat=SimpleNamespace(completions=_Completions(reply, calls)))


REQUEST = ServingRequest("r0", 0.0, "chat", 0, 0, (ChatMessage("user", "hi"),), 3, 1)


def test_pd_request_sends_kv_params_and_times_ttft_as_prefill() -> None:
    calls: list[dict] = []
    prefill = _client(SimpleNamespace(model_extra={"kv_transfer_params": {"remote_block_ids": [1]}}), calls)
    decode = _client([_chunk(1), _chunk(1), _chunk(1), _chunk(0, usage=3)], calls)
    s = asyncio.run(pd_one_request((prefill, decode), "m", REQUEST))
    assert s.ok and s.output_tokens == 3 and len(s.itls_s) == 2
    assert 0.015 < s.ttft_s < s.e2e_s
    assert calls[0]["max_tokens"] == 1 and calls[0]["extra_body"]["kv_transfer_params"] == {"do_remote_decode": True}
    assert calls[1]["extra_body"]["kv_transfer_params"] == {"remote_block_ids": [1]} and calls[1]["stream"]


def test_pd_request_without_kv_params_is_a_failed_sample() -> None:
    calls: list[dict] = []
    s = asyncio.run(pd_one_request((_client(SimpleNamespace(model_extra={}), calls), _client([], calls)), "m",
                                   REQUEST))
    assert not s.ok and len(calls) == 1
