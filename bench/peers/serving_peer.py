"""``serving.py --peer vllm``: the same client load against vLLM's CPU servers.

Two vLLM deployments, each on cores 0-1 like splitserve's pods:

* ``vllm unified``: one OpenAI server, ``VLLM_CPU_OMP_THREADS_BIND=0-1``;
  replayed with serving.py's own streaming client (TTFT, ITL, e2e as there);
* ``vllm 1P1D``: a NixlConnector prefill server on core 0 and a decode server
  on core 1, driven by the two-step client of ``vllm_server.pd_completion``
  in streaming form: the chat request to the prefill server (``max_tokens=1``,
  ``kv_transfer_params={"do_remote_decode": true}``, not streamed), then the
  same request plus the returned ``kv_transfer_params`` to the decode server,
  streamed. **TTFT = the prefill response time** (it carries the first token);
  ITL = gaps between tokens of the decode stream (the gap from the prefill
  reply to the decode stream's first token is in e2e, not in ITL); e2e = both.
"""
from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.peers.vllm_server import VllmServerConfig, VllmServers, free_port

# serving.py's Sample/one_request live beside it (imported by the caller's sys.path).
from serving import RateResult, Sample, one_request, replay_at_arrivals, summarize, time_stream  # noqa: E402

from workload import ServingRequest, serving_workload  # noqa: E402

VLLM_KV_GIB = 1
Replay = Callable[[Any, str, ServingRequest], Awaitable[Sample]]


async def pd_one_request(clients: tuple[Any, Any], model: str, request: ServingRequest) -> Sample:
    """One vLLM 1P1D request: prefill (max_tokens=1, do_remote_decode), then a streamed decode."""
    prefill, decode = clients
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    start = time.perf_counter()
    try:
        first = await prefill.chat.completions.create(
            model=model, messages=messages, max_tokens=1, temperature=0,
            extra_body={"kv_transfer_params": {"do_remote_decode": True}, "ignore_eos": True})
        ttft = time.perf_counter() - start
        params = (first.model_extra or {}).get("kv_transfer_params")
        if params is None:
            raise RuntimeError("prefill reply has no kv_transfer_params (server not started with NixlConnector?)")
        stream = await decode.chat.completions.create(
            model=model, messages=messages, max_tokens=request.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, logprobs=True,
            extra_body={"kv_transfer_params": params, "ignore_eos": True})
        timing = await time_stream(stream)
    except Exception as exc:  # counted, not fatal
        print(f"  request {request.request_id} failed: {exc}", file=sys.stderr)
        return Sample(0.0, (), 0.0, 0, False)
    return Sample(ttft, timing.itls_s, time.perf_counter() - start, timing.num_tokens, True)


async def _replay_with(make_clients: Callable[[], Any], model: str, requests: tuple[ServingRequest, ...],
                       one: Callable[[Any, str, ServingRequest], Awaitable[Sample]]) -> tuple[list[Sample], float]:
    clients = make_clients()
    try:
        return await replay_at_arrivals(requests, lambda request: one(clients, model, request))
    finally:
        for c in clients if isinstance(clients, tuple) else (clients,):
            await c.close()


def _client(base_url: str) -> Any:
    import openai

    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0, timeout=600)


def run_vllm_deployments(model_dir: Path, rates: list[float], num_requests: int, seed: int,
                         workload_kwargs: dict[str, Any], log_dir: Path | None = None,
                         dtype: str = "float32", ours: bool = True,
                         second_client: Callable[[str, str, str], list[RateResult]] | None = None,
                         pd_pair: bool = True) -> tuple[list[RateResult], dict[str, float]]:
    """vLLM unified (cores 0-1), then vLLM 1P1D (core 0 + core 1): every rate; returns rows and startup times.
    ``ours``: replay serving.py's workload; ``second_client(name, base_url, served_model)``: another
    client's rows for the unified server (``vllm bench serve`` cannot drive the two-step 1P1D pair)."""
    results: list[RateResult] = []
    startup: dict[str, float] = {}

    def rates_loop(name: str, make: Callable[[], Any], model: str, one: Any) -> None:
        warm = serving_workload(100.0, 2, seed=99, **workload_kwargs)
        asyncio.run(_replay_with(make, model, warm.requests, one))
        for index, rate in enumerate(rates if ours else ()):
            # A seed per rate: each cell's prompts are new to the prefix cache.
            wl = serving_workload(rate, num_requests, seed=seed + index, **workload_kwargs)
            samples, duration = asyncio.run(_replay_with(make, model, wl.requests, one))
            row = summarize(name, rate, samples, duration)
            results.append(row)
            print(f"[{name}] {rate:g} req/s: TTFT p50 {row.ttft_p50_ms:.1f} ms, e2e p50 {row.e2e_p50_ms:.1f} ms, "
                  f"{row.output_tok_per_s:.1f} tok/s", flush=True)

    print("[vllm unified] starting (50-90 s) ...", flush=True)
    t0 = time.monotonic()
    with VllmServers(log_dir=log_dir) as servers:
        s = servers.start_unified(VllmServerConfig(model_dir=model_dir, port=free_port(), dtype=dtype,
                                                   cpu_bind="0-1", kv_cache_gib=VLLM_KV_GIB))
        startup["vllm unified"] = time.monotonic() - t0
        rates_loop("vllm unified", lambda: _client(s.base_url), s.config.model_name, one_request)
        if second_client is not None:
            results += second_client("vllm unified", s.base_url, s.config.model_name)
    if not pd_pair:
        return results, startup
    print("[vllm 1P1D] starting prefill (core 0) + decode (core 1) with NixlConnector ...", flush=True)
    t0 = time.monotonic()
    with VllmServers(log_dir=log_dir) as servers:
        p, d = servers.start_pd_pair(model_dir, dtype=dtype, prefill_bind="0", decode_bind="1",
                                     kv_cache_gib=VLLM_KV_GIB)
        startup["vllm 1P1D"] = time.monotonic() - t0
        rates_loop("vllm 1P1D", lambda: (_client(p.base_url), _client(d.base_url)), p.config.model_name,
                   pd_one_request)
    return results, startup
