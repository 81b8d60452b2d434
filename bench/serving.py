"""Online serving benchmark: disaggregated 1P+1D vs unified x2, same workload.

For each deployment, ``splitserve up`` is started locally; for each request
rate, the seeded serving workload of ``bench/workload.py`` (chat turns sharing
a system prompt + occasional long documents, Poisson arrivals) is replayed
with the ``openai`` SDK (AsyncOpenAI, streaming). Reported per deployment and
rate: TTFT, ITL and end-to-end latency p50/p99 and output throughput. Then the
router's added latency: time to first token through the router (a short
prompt, served decode-only) minus a direct gRPC Decode stream of the same
prompt to the decode pod, p50 over sequential samples.

Baseline: unified x2 (colocated prefill+decode, 2 engines) vs 1 prefill + 1
decode (2 engines). Model: the built-in tiny Llama (random weights) unless
--model. Numbers on a shared CPU box are provisional.

    python bench/serving.py --quick --json .cache/bench/serving.json

``--peer vllm`` (bench/peers/serving_peer.py): on the 56M bench model,
splitserve 1P+1D and ``--unified 1``, then vLLM's CPU build as one unified
server (cores 0-1) and as a NixlConnector 1P1D pair (core 0 + core 1, the
two-step client: TTFT = the prefill reply, ITL = the decode stream's gaps),
same rates and requests, one table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import ServingRequest, serving_workload, write_json  # noqa: E402

from splitserve.local.launcher import LocalCluster, LocalClusterConfig, free_port  # noqa: E402


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    itls_s: tuple[float, ...]
    e2e_s: float
    output_tokens: int
    ok: bool


@dataclass(frozen=True)
class RateResult:
    deployment: str
    rate_rps: float
    num_requests: int
    num_failed: int
    duration_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    output_tok_per_s: float


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass(frozen=True)
class StreamTiming:
    """When a streamed completion's first token arrived, the gaps between later
    token-carrying chunks (spread over the tokens each carries), and the
    completion token count from the usage chunk."""

    first_token_at: float | None
    itls_s: tuple[float, ...]
    num_tokens: int


async def time_stream(stream: Any) -> StreamTiming:
    first: float | None = None
    last = 0.0
    itls: list[float] = []
    tokens = 0
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        count = _tokens_in(chunk)
        if not count:
            continue
        if first is None:
            first = now
        else:
            itls.extend([(now - last) / count] * count)
        last = now
    return StreamTiming(first, tuple(itls), tokens)


async def one_request(client: Any, model: str, request: ServingRequest) -> Sample:
    start = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": m.role, "content": m.content} for m in request.messages],
            max_tokens=request.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            logprobs=True)  # every token then has a chunk, even when its text is empty
        timing = await time_stream(stream)
    except Exception as exc:  # a failed request is counted, not fatal to the run
        print(f"  request {request.request_id} failed: {exc}", file=sys.stderr)
        return Sample(0.0, (), 0.0, 0, False)
    end = time.perf_counter()
    return Sample((timing.first_token_at or end) - start, timing.itls_s, end - start, timing.num_tokens, True)


def _tokens_in(chunk: Any) -> int:
    if not chunk.choices or chunk.choices[0].logprobs is None:
        return 0
    return len(chunk.choices[0].logprobs.content or ())


async def replay_at_arrivals(
    requests: tuple[ServingRequest, ...], send: Callable[[ServingRequest], Awaitable[Sample]]
) -> tuple[list[Sample], float]:
    """Send each request at its arrival offset; return the samples and the wall time."""
    start = time.perf_counter()

    async def at(request: ServingRequest) -> Sample:
        await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
        return await send(request)

    samples = await asyncio.gather(*(at(r) for r in requests))
    return list(samples), time.perf_counter() - start


async def replay(base_url: str, model: str, requests: tuple[ServingRequest, ...]) -> tuple[list[Sample], float]:
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600) as client:
        return await replay_at_arrivals(requests, lambda request: one_request(client, model, request))


def summarize(deployment: str, rate: float, samples: list[Sample], duration: float) -> RateResult:
    ok = [s for s in samples if s.ok]
    itls = [x for s in ok for x in s.itls_s]
    ms = 1000.0
    return RateResult(
        deployment=deployment, rate_rps=rate, num_requests=len(samples), num_failed=len(samples) - len(ok),
        duration_s=round(duration, 3),
        ttft_p50_ms=percentile([s.ttft_s for s in ok], 50) * ms,
        ttft_p99_ms=percentile([s.ttft_s for s in ok], 99) * ms,
        itl_p50_ms=percentile(itls, 50) * ms, itl_p99_ms=percentile(itls, 99) * ms,
        e2e_p50_ms=percentile([s.e2e_s for s in ok], 50) * ms,
        e2e_p99_ms=percentile([s.e2e_s for s in ok], 99) * ms,
        output_tok_per_s=sum(s.output_tokens for s in ok) / duration if duration else 0.0)


async def router_overhead(cluster: LocalCluster, samples: int) -> dict[str, float]:
    """TTFT via the router (decode-only path) minus a direct Decode stream's.

    The router's TTFT is taken with the lean client (``splitserve.sim.lean_http``:
    what the router adds) and with the ``openai`` SDK (what a typical Python
    client sees: httpx's own ~1.5 ms more). Every stream is read to its end:
    one cut after its first token leaves the pod a step to finish, which the
    next request would wait for (that was ~3 ms of the "overhead" once measured).
    """
    import openai

    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.engine.tokenizer import load_tokenizer
    from splitserve.router.pd_client import PodClient
    from splitserve.sim.lean_http import LeanConnection
    from splitserve.sim.replay_client import RequestResult

    model = cluster.config.model
    messages = [{"role": "user", "content": "hi"}]
    tok = load_tokenizer(model)
    ids = tuple(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False))
    decode = next(p for p in cluster.pods if p.role == "decode")
    pod = PodClient(f"{cluster.config.host}:{decode.grpc_port}")
    lean = LeanConnection(cluster.base_url.removesuffix("/v1"))
    via_router: list[float] = []
    via_sdk: list[float] = []
    direct: list[float] = []
    async with openai.AsyncOpenAI(base_url=cluster.base_url, api_key="bench", max_retries=0) as client:
        for i in range(samples):
            result = RequestResult(-1, i, 0, len(ids), 2)
            await lean.stream_completion(model, ids, 2, result)
            if result.ok and result.ttft_s is not None:
                via_router.append(result.ttft_s)
            start, first = time.perf_counter(), None
            stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=2,
                                                          temperature=0, stream=True, logprobs=True,
                                                          extra_body={"ignore_eos": True})
            async for chunk in stream:
                if first is None and _tokens_in(chunk):
                    first = time.perf_counter() - start
            if first is not None:
                via_sdk.append(first)
            start, first = time.perf_counter(), None
            params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, seed=i)
            async for _ in pod.decode(f"bench-direct-{i}", ids, len(ids), params):
                first = first if first is not None else time.perf_counter() - start
            if first is not None:
                direct.append(first)
    await lean.close()
    await pod.close()
    router_p50, sdk_p50, direct_p50 = (statistics.median(x) for x in (via_router, via_sdk, direct))
    return {"samples": samples, "router_ttft_p50_ms": router_p50 * 1000,
            "openai_sdk_ttft_p50_ms": sdk_p50 * 1000,
            "direct_decode_ttft_p50_ms": direct_p50 * 1000,
            "router_added_ms_p50": (router_p50 - direct_p50) * 1000,
            "router_added_ms_p99": (_p99(via_router) - _p99(direct)) * 1000,
            "openai_sdk_added_ms_p50": (sdk_p50 - direct_p50) * 1000}


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


DEPLOYMENTS = {"disaggregated 1P+1D": 0, "unified x2": 2}
# --peer vllm: the splitserve side of the comparison (1P+1D and one unified engine, like vLLM's).
PEER_DEPLOYMENTS = {"splitserve 1P+1D": 0, "splitserve unified x1": 1}


def run_deployment(name: str, args: argparse.Namespace, model: str, rates: list[float],
                   workload_kwargs: dict[str, Any], overhead: bool) -> tuple[list[RateResult], dict | None]:
    unified = {**DEPLOYMENTS, **PEER_DEPLOYMENTS}[name]
    config = LocalClusterConfig(model=model, num_unified=unified, port=free_port(),
                                engine_args=["--kv-cache-memory", str(256 * 1024 * 1024)],
                                log_dir=args.log_dir / name.replace(" ", "-") if args.log_dir else None)
    cluster = LocalCluster(config)
    print(f"[{name}] starting ...", flush=True)
    cluster.start()
    results = []
    extra = None
    try:
        warm = serving_workload(100.0, 2, seed=99, **workload_kwargs)
        asyncio.run(replay(cluster.base_url, model, warm.requests))
        for index, rate in enumerate(rates if args.client in ("ours", "both") else ()):
            # A seed per rate: each cell's prompts are new to the prefix cache.
            workload = serving_workload(rate, args.num_requests, seed=args.seed + index, **workload_kwargs)
            samples, duration = asyncio.run(replay(cluster.base_url, model, workload.requests))
            result = summarize(name, rate, samples, duration)
            results.append(result)
            print(f"[{name}] {rate:g} req/s: TTFT p50 {result.ttft_p50_ms:.1f} ms, "
                  f"e2e p50 {result.e2e_p50_ms:.1f} ms, {result.output_tok_per_s:.1f} tok/s", flush=True)
        if args.client in ("vllm", "both"):
            root = cluster.base_url.removesuffix("/v1")  # vllm bench takes the server root
            results += vllm_bench_rows(name, root, model, model, rates, args)
        if overhead:
            extra = asyncio.run(router_overhead(cluster, args.overhead_samples))
    finally:
        cluster.stop()
    return results, extra


def vllm_bench_rows(name: str, base_url: str, served_model: str, model_dir: str, rates: list[float],
                    args: argparse.Namespace) -> list[RateResult]:
    """The same deployment measured by vLLM's own client (``vllm bench serve``, random prompts of
    ``--bench-input-len`` tokens, ``--bench-output-len`` out, ignore_eos, greedy), one row per rate."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.peers.vllm_bench_client import VllmBenchSpec, run_vllm_bench

    rows = []
    for index, rate in enumerate(rates):
        spec = VllmBenchSpec(base_url, served_model, model_dir, rate, args.bench_prompts, args.bench_input_len,
                             args.bench_output_len, seed=args.seed + index)  # new prompts per cell
        r = run_vllm_bench(spec)
        if not int(r["completed"]):
            raise RuntimeError(f"vllm bench serve: every request to {base_url} failed ({r.get('errors', [])[:1]})")
        latencies = {f"{ours}_{q}_ms": float(r[f"{q}_{theirs}_ms"])
                     for ours, theirs in (("ttft", "ttft"), ("itl", "itl"), ("e2e", "e2el")) for q in ("p50", "p99")}
        row = RateResult(f"{name} [vllm bench]", rate, int(r["completed"]) + int(r.get("failed", 0)),
                         int(r.get("failed", 0)), round(float(r["duration"]), 3),
                         output_tok_per_s=float(r["output_throughput"]), **latencies)
        rows.append(row)
        print(f"[{row.deployment}] {rate:g} req/s: TTFT p50 {row.ttft_p50_ms:.1f} ms, ITL p50 {row.itl_p50_ms:.1f} ms, "
              f"e2e p50 {row.e2e_p50_ms:.1f} ms", flush=True)
    return rows


def print_table(results: list[RateResult]) -> None:
    header = ("deployment", "req/s", "n", "fail", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
              "e2e p50", "e2e p99", "out tok/s")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in results:
        print(" | ".join([r.deployment, f"{r.rate_rps:g}", str(r.num_requests), str(r.num_failed),
                          *(f"{v:.1f}" for v in (r.ttft_p50_ms, r.ttft_p99_ms, r.itl_p50_ms, r.itl_p99_ms,
                                                 r.e2e_p50_ms, r.e2e_p99_ms)),
                          f"{r.output_tok_per_s:.1f}"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the built-in tiny model)")
    parser.add_argument("--quick", action="store_true", help="small workload and 2 rates (< ~2 min)")
    parser.add_argument("--rates", type=float, nargs="+", default=None, help="request rates (req/s)")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overhead-samples", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--log-dir", type=Path, default=None)
    parser.add_argument("--peer", choices=("vllm",), default=None,
                        help="also vLLM's CPU build (unified, and 1P1D via NixlConnector) on the 56M bench model")
    parser.add_argument("--client", choices=("ours", "vllm", "both"), default="ours",
                        help="load generator: ours (openai SDK, the chat workload), vllm (vLLM's own `vllm bench "
                             "serve` from the peer venv, random prompts) or both")
    parser.add_argument("--unified-only", action="store_true",
                        help="with --peer: only the unified deployments (splitserve --unified 1, vLLM's server)")
    parser.add_argument("--bench-input-len", type=int, default=256, help="vllm bench: prompt tokens")
    parser.add_argument("--bench-output-len", type=int, default=64, help="vllm bench: output tokens")
    parser.add_argument("--bench-prompts", type=int, default=None, help="vllm bench: requests per rate")
    args = parser.parse_args(argv)
    from splitserve.cli.up_command import resolve_model

    if args.peer and args.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from bench.bench_models import ensure_bench_model

        args.model = str(ensure_bench_model("float32"))  # vLLM's CPU attention needs head_dim 64+
    model = resolve_model(args.model)
    rates = args.rates or ([2.0, 8.0] if args.quick else [1.0, 2.0, 4.0, 8.0, 16.0])
    args.num_requests = args.num_requests or (16 if args.quick else 64)
    args.overhead_samples = args.overhead_samples or (10 if args.quick else 50)
    args.bench_prompts = args.bench_prompts or args.num_requests
    # Word counts sized for the byte-level tiny tokenizer (~5 tokens per word).
    workload_kwargs: dict[str, Any] = (
        dict(system_prompt_words=60, document_words=(150, 250), user_words=(8, 24),
             assistant_words=(8, 24), num_conversations=4, max_tokens=16) if args.quick else
        dict(system_prompt_words=120, document_words=(300, 500), user_words=(8, 32),
             assistant_words=(8, 32), num_conversations=8, max_tokens=32))
    results: list[RateResult] = []
    overhead = None
    startup: dict[str, float] = {}
    names = [n for n in (PEER_DEPLOYMENTS if args.peer else DEPLOYMENTS)
             if not (args.unified_only and "unified" not in n)]
    for name in names:
        rows, extra = run_deployment(name, args, model, rates, workload_kwargs, overhead="1P+1D" in name)
        results += rows
        overhead = overhead or extra
    if args.peer:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from bench.peers.serving_peer import run_vllm_deployments

        second = ((lambda name, url, served: vllm_bench_rows(name, url, served, model, rates, args))
                  if args.client in ("vllm", "both") else None)
        rows, startup = run_vllm_deployments(Path(model), rates, args.num_requests, args.seed, workload_kwargs,
                                             log_dir=args.log_dir, ours=args.client in ("ours", "both"),
                                             second_client=second, pd_pair=not args.unified_only)
        results += rows
    print(f"\nmodel {model}; workload {workload_kwargs}; {args.num_requests} requests per rate; "
          f"host {platform.machine()} {platform.processor() or ''}".rstrip())
    print_table(results)
    if args.peer:
        print("vLLM 1P1D: TTFT = prefill reply time (max_tokens=1); ITL = decode stream gaps; "
              f"vLLM startup s: {', '.join(f'{k} {v:.0f}' for k, v in startup.items())}")
    if overhead:
        print(f"\nrouter added latency (TTFT via router - direct Decode, p50 of {overhead['samples']}): "
              f"{overhead['router_added_ms_p50']:.2f} ms, p99 {overhead['router_added_ms_p99']:.2f} ms "
              f"(router {overhead['router_ttft_p50_ms']:.2f} ms, direct {overhead['direct_decode_ttft_p50_ms']:.2f} "
              f"ms; with the openai SDK as client {overhead['openai_sdk_added_ms_p50']:.2f} ms)")
    if args.json:
        write_json({"schema": "splitserve.bench.serving/v1", "model": model, "quick": args.quick,
                    "workload": workload_kwargs, "results": [asdict(r) for r in results],
                    "router_overhead": overhead,
                    "peer": args.peer, "peer_startup_s": startup}, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
