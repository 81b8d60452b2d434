"""Soak: thousands of mixed requests through 1 prefill + 2 decode pods, with
clients that hang up, and the memory and file descriptors of every process
sampled throughout.

One ``splitserve up`` (in-process ``LocalCluster``, every prompt
disaggregated). ``--requests`` requests (default 5,000) at ``--concurrency``,
each drawn from a seeded generator: completions or chat, streaming or not,
``n`` 1-3, 0-2 stop strings, greedy or seeded sampling, 4-48 tokens, and
10% of clients hanging up (a stream after a few chunks, a plain request after
a short random wait). Reported:

- **lost** (target 0): requests that neither completed (every choice with a
  finish reason) nor were cancelled by their own client;
- **held at the end** (target 0): KV blocks used, leased, and requests on
  every pod once the load stops (GetLoad and /metrics);
- **RSS drift** (target within 10% after warm-up): per process, the last
  sample against the first one after the warm-up (the first 10% of requests),
  and the peak after warm-up; open file descriptors likewise.

Not in ``make test``. Model: the built-in tiny Llama unless --model.

    python bench/soak.py --json bench/results/soak.json            # 5,000 requests
    python bench/soak.py --requests 1000 --json bench/results/soak.json
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import write_json  # noqa: E402

from splitserve.local.launcher import LocalCluster, LocalClusterConfig, free_port  # noqa: E402
from splitserve.router.pd_client import PodClient  # noqa: E402

WORDS = ("river", "barge", "harbour", "lock", "tug", "crane", "fog", "dawn", "log", "port", "north", "tide")
STOPS = ("e", "th", "\n", "an", "o ", "s.")


@dataclass(frozen=True)
class SoakRequest:
    chat: bool
    stream: bool
    prompt: str
    n: int
    max_tokens: int
    stop: tuple[str, ...]
    temperature: float
    seed: int | None
    ignore_eos: bool
    hang_up_after_chunks: int | None  # streaming clients that go away
    hang_up_after_s: float | None     # plain clients that go away


def draw(rng: random.Random, hang_up_rate: float) -> SoakRequest:
    stream = rng.random() < 0.5
    hang = rng.random() < hang_up_rate
    sampled = rng.random() < 0.5
    return SoakRequest(
        chat=rng.random() < 0.3, stream=stream,
        prompt=" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40))),
        n=rng.choice((1, 1, 2, 3)), max_tokens=rng.randint(4, 48),
        stop=tuple(rng.sample(STOPS, rng.randint(0, 2))),
        temperature=0.8 if sampled else 0.0, seed=rng.randrange(1 << 31) if sampled else None,
        ignore_eos=rng.random() < 0.7,
        hang_up_after_chunks=rng.randint(1, 4) if hang and stream else None,
        hang_up_after_s=rng.uniform(0.005, 0.2) if hang and not stream else None)


async def run_one(client: Any, model: str, req: SoakRequest) -> str:
    """'completed', 'cancelled' (by this client) or 'lost: <why>'."""
    kwargs: dict[str, Any] = dict(model=model, n=req.n, max_tokens=req.max_tokens, temperature=req.temperature,
                                  seed=req.seed, stop=list(req.stop) or None, stream=req.stream,
                                  extra_body={"ignore_eos": req.ignore_eos})
    create = client.chat.completions.create if req.chat else client.completions.create
    if req.chat:
        kwargs["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        kwargs["prompt"] = req.prompt

    async def call() -> str:
        finished: set[int] = set()
        if not req.stream:
            response = await create(**kwargs)
            finished = {c.index for c in response.choices if c.finish_reason}
        else:
            stream = await create(**kwargs)
            chunks = 0
            async for chunk in stream:
                chunks += 1
                finished |= {c.index for c in chunk.choices if c.finish_reason}
                if req.hang_up_after_chunks is not None and chunks >= req.hang_up_after_chunks:
                    await stream.close()
                    return "cancelled"
        return "completed" if finished == set(range(req.n)) else f"lost: finished {sorted(finished)} of {req.n}"

    try:
        if req.hang_up_after_s is not None:
            try:
                return await asyncio.wait_for(call(), req.hang_up_after_s)
            except asyncio.TimeoutError:
                return "cancelled"
        return await call()
    except Exception as exc:  # noqa: BLE001 - a lost request is a result, not a crash
        return f"lost: {type(exc).__name__}: {str(exc)[:160]}"


@dataclass
class Sampler:
    """RSS (KiB, /proc/PID/status VmRSS) and open fds of each named pid, every ``period_s``."""

    pids: dict[str, int]
    period_s: float = 2.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    done_requests: list[int] = field(default_factory=lambda: [0])
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def sample(self) -> None:
        row: dict[str, Any] = {"t": time.monotonic(), "requests_done": self.done_requests[0]}
        for name, pid in self.pids.items():
            row[name] = {"rss_kib": _rss_kib(pid), "fds": _fds(pid)}
        self.samples.append(row)


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def drift(samples: list[dict[str, Any]], name: str, key: str, warm_requests: int, total: int) -> dict[str, Any]:
    """First sample at or after ``warm_requests`` done vs the last, the peak in
    between, and the same over the second half of the run (a leak keeps
    growing there; a cache that fills up does not)."""
    series = [(s["requests_done"], s[name][key]) for s in samples if s[name][key] is not None]

    def pct(a: float, b: float) -> float | None:
        return round(100.0 * (b - a) / a, 2) if a else None

    after = [v for done, v in series if done >= warm_requests] or [v for _, v in series]
    half = [v for done, v in series if done >= total // 2] or after
    base, last, peak = after[0], after[-1], max(after)
    return {"start": series[0][1], "after_warmup": base, "end": last, "peak_after_warmup": peak,
            "drift_pct": pct(base, last), "peak_pct": pct(base, peak),
            "half_way": half[0], "second_half_drift_pct": pct(half[0], last),
            "second_half_peak_pct": pct(half[0], max(half))}


async def pod_state(address: str) -> dict[str, int]:
    client = PodClient(address)
    try:
        load = await client.get_load(timeout=5)
    finally:
        await client.close()
    return {"used_blocks": load.num_used_blocks, "leased_blocks": load.num_leased_blocks,
            "requests": load.load.num_requests}


async def wait_pods_idle(addresses: dict[str, str], timeout: float = 60.0) -> dict[str, dict[str, int]]:
    deadline = time.monotonic() + timeout
    while True:
        states = {name: await pod_state(addr) for name, addr in addresses.items()}
        if all(not any(s.values()) for s in states.values()) or time.monotonic() > deadline:
            return states
        await asyncio.sleep(0.5)


async def soak(base_url: str, model: str, requests: list[SoakRequest], concurrency: int,
               done: list[int], progress_every: int) -> list[str]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    results: list[str] = [""] * len(requests)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)
    started = time.monotonic()

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            results[i] = await run_one(client, model, requests[i])
            done[0] += 1
            if done[0] % progress_every == 0:
                rate = done[0] / (time.monotonic() - started)
                print(f"  {done[0]}/{len(requests)} requests ({rate:.1f}/s)", flush=True)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return results


def print_tables(result: dict[str, Any]) -> None:
    out = result["outcomes"]
    print("\n| requests | completed | cancelled by client | lost | blocks held at end | leases held at end |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    held = result["held_at_end"]
    print(f"| {result['requests']} | {out.get('completed', 0)} | {out.get('cancelled', 0)} | {result['lost']} | "
          f"{sum(s['used_blocks'] for s in held.values())} | {sum(s['leased_blocks'] for s in held.values())} |")
    print(f"\nRSS in MiB; warm-up: the first {result['warmup_requests']} requests; second half: from request "
          f"{result['requests'] // 2}")
    print("| process | RSS start | after warm-up | half-way | end | drift after warm-up (peak) "
          "| drift over 2nd half (peak) | fds after warm-up -> end |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, d in result["processes"].items():
        rss, fds = d["rss_kib"], d["fds"]
        print(f"| {name} | {rss['start'] / 1024:.0f} | {rss['after_warmup'] / 1024:.0f} | {rss['half_way'] / 1024:.0f} "
              f"| {rss['end'] / 1024:.0f} | {rss['drift_pct']:+.1f}% ({rss['peak_pct']:+.1f}%) "
              f"| {rss['second_half_drift_pct']:+.1f}% ({rss['second_half_peak_pct']:+.1f}%) "
              f"| {fds['after_warmup']} -> {fds['end']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the built-in tiny model)")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--hang-up-rate", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-seconds", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    from splitserve.cli.up_command import resolve_model

    model = resolve_model(args.model)
    rng = random.Random(args.seed)
    requests = [draw(rng, args.hang_up_rate) for _ in range(args.requests)]
    config = LocalClusterConfig(
        model=model, port=free_port(), log_dir=args.log_dir, num_prefill=1, num_decode=2,
        engine_args=["--kv-cache-memory", str(64 << 20), "--max-model-len", "1024", "--kv-lease-seconds", "10"],
        router_args=["--pd-threshold-tokens", "0"])
    cluster = LocalCluster(config, log=lambda line: None)
    print("starting 1 prefill + 2 decode ...", flush=True)
    cluster.start()
    try:
        status = cluster.status()
        pods = [pod for pool in status["pools"].values() for pod in pool["pods"]]
        pids = {"router": status["router"]["pid"], **{p["name"]: p["pid"] for p in pods},
                "bench (launcher + clients)": os.getpid()}
        sampler = Sampler(pids, args.sample_seconds)
        sampler.start()
        t0 = time.monotonic()
        results = asyncio.run(soak(cluster.base_url, model, requests, args.concurrency, sampler.done_requests,
                                   max(1, args.requests // 20)))
        wall = time.monotonic() - t0
        held = asyncio.run(wait_pods_idle({p["name"]: p["address"] for p in pods}))
        sampler.stop()
        alive = {name: _rss_kib(pid) is not None for name, pid in pids.items()}
    finally:
        cluster.stop()
    outcomes = Counter(r if not r.startswith("lost") else "lost" for r in results)
    lost = [r for r in results if r.startswith("lost")]
    warm = args.requests // 10
    result = {
        "schema": "splitserve.bench.soak/v1", "model": model, "requests": args.requests,
        "concurrency": args.concurrency, "hang_up_rate": args.hang_up_rate, "seed": args.seed,
        "host": f"{platform.machine()} {platform.processor()}".strip(), "cpus": os.cpu_count(),
        "wall_s": round(wall, 1), "requests_per_s": round(args.requests / wall, 2),
        "mix": {"streaming": sum(r.stream for r in requests), "chat": sum(r.chat for r in requests),
                "n>1": sum(r.n > 1 for r in requests), "with_stop": sum(bool(r.stop) for r in requests),
                "seeded": sum(r.seed is not None for r in requests),
                "hang_ups": sum(r.hang_up_after_chunks is not None or r.hang_up_after_s is not None
                                for r in requests)},
        "outcomes": dict(outcomes), "lost": len(lost), "lost_examples": lost[:10],
        "held_at_end": held, "processes_alive_at_end": alive, "warmup_requests": warm,
        "processes": {name: {"rss_kib": drift(sampler.samples, name, "rss_kib", warm, args.requests),
                             "fds": drift(sampler.samples, name, "fds", warm, args.requests)} for name in pids},
        "samples": sampler.samples,
    }
    print(f"\nmodel {model}; {result['host']}, {result['cpus']} CPUs; {args.requests} requests, "
          f"{args.concurrency} concurrent, {wall:.0f} s ({result['requests_per_s']} req/s); mix {result['mix']}")
    print_tables(result)
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0 if not lost and not any(any(s.values()) for s in held.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
