"""Scaling benchmark: KEDA push latency, scale-from-zero, requests lost while
pools scale and roll.

One ``splitserve up`` (in-process ``LocalCluster``: 1 prefill + 1 decode, the
router's KEDA external scaler on, every prompt disaggregated). This script
plays KEDA: it holds ``StreamIsActive`` streams open and scales the pools
through the launcher's controller.

1. **Push latency** (target < 100 ms): with the pool at 0, a request is sent
   and the time until the ``StreamIsActive`` push (``result: true``) reaches
   us is measured from the request's send (client side, an upper bound) and
   from its arrival in the router (the router's own log line). Decode at 0:
   the request queues; prefill at 0: it runs decode-only and still pushes.
2. **Scale from zero**: on the decode push the bench scales decode to 1;
   reported: pod ready (the launcher's /health probe, period 0.2 s) -> the
   queued request's first token, and send -> first token.
3. **Requests lost** (target 0) under a steady load of concurrent greedy and
   seeded streaming completions while decode goes 1 -> 2 -> 1, prefill and
   decode are rolled, prefill goes 0 -> 1: failures (any error, HTTP or
   mid-stream) plus outputs that differ from the quiet cluster's.

Model: the built-in tiny Llama (random weights) unless --model.

    python bench/scaling.py --quick --json bench/results/scaling.json
"""
from __future__ import annotations

import argparse
import asyncio
import platform
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import percentile  # noqa: E402
from workload import write_json  # noqa: E402

from splitserve.local.launcher import LocalCluster, LocalClusterConfig, free_port  # noqa: E402

PROMPTS = ("The river Danube flows through ten countries and four capitals. ",
           "Shipping log of the northern port, day 12: three barges, one tug. ",
           "Once upon a time a very small tokenizer met a random model. ")
# (prompt, max_tokens, temperature, seed): greedy and seeded streams.
SPECS = tuple((p, n, t, s) for i, p in enumerate(PROMPTS)
              for n, t, s in ((32, 0.0, None), (64, 0.9, 10 + i)))


@dataclass(frozen=True)
class Result:
    text: str
    logprobs: tuple[float, ...]
    error: str | None
    first_token_at: float | None


async def stream_one(client: Any, model: str, spec: tuple) -> Result:
    prompt, max_tokens, temperature, seed = spec
    text, logprobs, first = [], [], None
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature, seed=seed,
            stream=True, logprobs=1, extra_body={"ignore_eos": True})
        async for chunk in stream:
            for choice in chunk.choices:
                if first is None and choice.logprobs is not None and choice.logprobs.token_logprobs:
                    first = time.monotonic()
                text.append(choice.text)
                logprobs += (choice.logprobs.token_logprobs or []) if choice.logprobs else []
    except Exception as exc:  # noqa: BLE001 - counted as lost, not fatal
        return Result("", (), repr(exc)[:200], first)
    return Result("".join(text), tuple(logprobs), None, first)


def same(a: Result, b: Result) -> bool:
    return (a.text == b.text and len(a.logprobs) == len(b.logprobs)
            and all(abs(x - y) <= 1e-3 for x, y in zip(a.logprobs, b.logprobs)))


# -- 1 + 2: push latency, scale from zero ----------------------------------------------


def router_push_latencies(cluster: LocalCluster, pool: str) -> list[float]:
    text = (cluster.log_dir / "router.log").read_text(errors="replace")
    return [float(ms) for ms in re.findall(rf"scaler push: pool={pool} active=true latency_ms=([\d.]+)", text)]


async def push_cycle(cluster: LocalCluster, scaler_port: int, client: Any, model: str, pool: str,
                     scale_up: bool) -> dict[str, float]:
    """``pool`` is at 0: send one request, time the push; if ``scale_up``,
    scale the pool to 1 on the push and time the request's first token."""
    import grpc

    from splitserve.proto import externalscaler_pb2 as pb
    from splitserve.proto import externalscaler_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{scaler_port}") as channel:
        call = pb_grpc.ExternalScalerStub(channel).StreamIsActive(
            pb.ScaledObjectRef(name="bench", namespace="default", scalerMetadata={"pool": pool}))
        messages = call.__aiter__()
        await messages.__anext__()  # the state at once
        sent = time.monotonic()
        request = asyncio.create_task(stream_one(client, model, SPECS[0]))
        while not (await messages.__anext__()).result:
            pass
        pushed = time.monotonic()
        call.cancel()
    row = {"push_ms_from_send": (pushed - sent) * 1e3}
    if scale_up:
        cluster.scale(**{pool: 1})
    result = await request
    if result.error is not None or result.first_token_at is None:
        raise RuntimeError(f"the queued request failed: {result.error}")
    if scale_up:
        ready_at = max(p.ready_at or 0.0 for p in cluster.controller.pools[pool].pods)
        row["ready_to_first_token_ms"] = (result.first_token_at - ready_at) * 1e3
        row["send_to_first_token_s"] = result.first_token_at - sent
    return row


async def scale_from_zero(cluster: LocalCluster, scaler_port: int, model: str, cycles: int) -> dict[str, Any]:
    import openai

    rows: dict[str, list[dict[str, float]]] = {"decode": [], "prefill": []}
    async with openai.AsyncOpenAI(base_url=cluster.base_url, api_key="bench", max_retries=0, timeout=600) as client:
        await stream_one(client, model, SPECS[0])  # warm the path
        for pool, n, scale_up in (("decode", cycles, True), ("prefill", 3 * cycles, False)):
            await asyncio.to_thread(cluster.scale, **{pool: 0})
            await asyncio.to_thread(cluster.wait_converged, [pool])
            for i in range(n):
                rows[pool].append(await push_cycle(cluster, scaler_port, client, model, pool, scale_up))
                print(f"  {pool} at 0, cycle {i + 1}: {rows[pool][-1]}", flush=True)
                if scale_up and i + 1 < n:
                    await asyncio.to_thread(cluster.wait_converged, [pool])
                    await asyncio.to_thread(cluster.scale, **{pool: 0})
                    await asyncio.to_thread(cluster.wait_converged, [pool])
            await asyncio.to_thread(cluster.scale, **{pool: 1})
            await asyncio.to_thread(cluster.wait_converged, [pool])
    out: dict[str, Any] = {}
    for pool, samples in rows.items():
        router_side = router_push_latencies(cluster, pool)[-len(samples):]
        out[pool] = {"samples": samples, "push_ms_from_arrival": router_side,
                     "push_ms_from_send_p50": percentile([s["push_ms_from_send"] for s in samples], 50),
                     "push_ms_from_send_max": max(s["push_ms_from_send"] for s in samples),
                     "push_ms_from_arrival_max": max(router_side) if router_side else None}
        if samples and "ready_to_first_token_ms" in samples[0]:
            out[pool]["ready_to_first_token_ms_p50"] = percentile([s["ready_to_first_token_ms"] for s in samples], 50)
            out[pool]["send_to_first_token_s_p50"] = percentile([s["send_to_first_token_s"] for s in samples], 50)
    return out


# -- 3: requests lost during scale and rollout -----------------------------------------


class Load:
    """``concurrency`` workers streaming SPECS back to back on their own thread."""

    def __init__(self, cluster: LocalCluster, model: str, concurrency: int,
                 reference: dict[int, Result]) -> None:
        self.cluster, self.model, self.concurrency, self.reference = cluster, model, concurrency, reference
        self.done: list[tuple[int, Result]] = []
        self._stop = threading.Event()

    async def _main(self) -> None:
        import openai

        async with openai.AsyncOpenAI(base_url=self.cluster.base_url, api_key="bench", max_retries=0,
                                      timeout=600) as client:
            async def worker(i: int) -> None:
                while not self._stop.is_set():
                    self.done.append((i % len(SPECS), await stream_one(client, self.model, SPECS[i % len(SPECS)])))
                    i += 1

            await asyncio.gather(*(worker(w) for w in range(self.concurrency)))

    def run_during(self, step: Any) -> dict[str, Any]:
        self.done.clear()
        self._stop.clear()
        thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        start = time.monotonic()
        thread.start()
        try:
            step()
        finally:
            self._stop.set()
            thread.join()
        wall = time.monotonic() - start
        failed = [r for _, r in self.done if r.error]
        wrong = [i for i, r in self.done if not r.error and not same(r, self.reference[i])]
        return {"requests": len(self.done), "failed": len(failed), "mismatched": len(wrong),
                "lost": len(failed) + len(wrong), "seconds": round(wall, 1),
                "req_per_s": round(len(self.done) / wall, 2), "errors": [r.error for r in failed][:3]}


def lost_during_changes(cluster: LocalCluster, model: str, concurrency: int) -> dict[str, Any]:
    import openai

    async def quiet() -> dict[int, Result]:
        async with openai.AsyncOpenAI(base_url=cluster.base_url, api_key="bench", max_retries=0) as client:
            return {i: await stream_one(client, model, spec) for i, spec in enumerate(SPECS)}

    reference = asyncio.run(quiet())
    load = Load(cluster, model, concurrency, reference)

    def scale(**replicas: int) -> None:
        cluster.scale(**replicas)
        cluster.wait_converged(list(replicas), timeout=600)

    def roll(pool: str) -> None:
        cluster.rollout_restart(pool)
        cluster.wait_converged([pool], timeout=600)

    steps = {"scale decode 1->2->1": lambda: (scale(decode=2), time.sleep(2), scale(decode=1)),
             "rollout restart prefill": lambda: roll("prefill"),
             "rollout restart decode": lambda: roll("decode"),
             "scale prefill 1->0->1": lambda: (scale(prefill=0), time.sleep(2), scale(prefill=1))}
    out = {}
    for name, step in steps.items():
        out[name] = load.run_during(step)
        print(f"  {name}: {out[name]}", flush=True)
    return out


def print_tables(pushes: dict[str, Any], lost: dict[str, Any]) -> None:
    print("\npool at 0 | push p50 (send) ms | push max (send) ms | push max (arrival) ms | "
          "ready -> 1st token p50 ms | send -> 1st token p50 s")
    print("--- | --- | --- | --- | --- | ---")
    for pool, r in pushes.items():
        arrival, ready, first = (r["push_ms_from_arrival_max"], r.get("ready_to_first_token_ms_p50"),
                                 r.get("send_to_first_token_s_p50"))
        cells = [f"{r['push_ms_from_send_p50']:.1f}", f"{r['push_ms_from_send_max']:.1f}",
                 "-" if arrival is None else f"{arrival:.1f}",
                 "- (served decode-only)" if ready is None else f"{ready:.0f}",
                 "-" if first is None else f"{first:.1f}"]
        print(" | ".join([pool, *cells]))
    print("\nstep under load | requests | req/s | failed | mismatched | lost")
    print("--- | --- | --- | --- | --- | ---")
    for name, r in lost.items():
        print(f"{name} | {r['requests']} | {r['req_per_s']} | {r['failed']} | {r['mismatched']} | {r['lost']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the built-in tiny model)")
    parser.add_argument("--quick", action="store_true", help="2 scale-from-zero cycles (a few minutes)")
    parser.add_argument("--cycles", type=int, default=None, help="scale-from-zero cycles (default 5; quick 2)")
    parser.add_argument("--concurrency", type=int, default=3, help="concurrent streams of the steady load")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    from splitserve.cli.up_command import resolve_model

    model = resolve_model(args.model)
    cycles = args.cycles or (2 if args.quick else 5)
    scaler_port = free_port()
    config = LocalClusterConfig(
        model=model, port=free_port(), log_dir=args.log_dir,
        engine_args=["--kv-cache-memory", str(64 << 20), "--max-model-len", "1024",
                     "--shutdown-grace-seconds", "5", "--kv-lease-seconds", "10"],
        router_args=["--scaler-port", str(scaler_port), "--pd-threshold-tokens", "0",
                     "--max-queued-requests", "64"])
    cluster = LocalCluster(config, log=lambda line: None)
    print("starting 1 prefill + 1 decode ...", flush=True)
    cluster.start()
    try:
        print("scale from zero:", flush=True)
        pushes = asyncio.run(scale_from_zero(cluster, scaler_port, model, cycles))
        print(f"requests lost, {args.concurrency} concurrent streams:", flush=True)
        lost = lost_during_changes(cluster, model, args.concurrency)
    finally:
        cluster.stop()
    print(f"\nmodel {model}; host {platform.machine()} {platform.processor() or ''}; "
          f"{args.concurrency} concurrent streams (greedy + seeded, 32/64 tokens)".rstrip())
    print_tables(pushes, lost)
    if args.json:
        write_json({"schema": "splitserve.bench.scaling/v1", "model": model, "quick": args.quick,
                    "cycles": cycles, "concurrency": args.concurrency, "push": pushes, "lost": lost}, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
