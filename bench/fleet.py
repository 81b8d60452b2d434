"""Fleet benchmark: the real router in front of 16, 64 and 256 simulated pods.

    python bench/fleet.py [--quick] [--sizes 16 64 256] [--json bench/results/fleet.json]
    python bench/fleet.py fit --from bench/results/fleet_fit/engine_*.json [--kv-json kv_transfer.json]
                          --out bench/results/sim_latency.json

Fleet: one ``splitserve serve sim`` process per size, P:D = ``--pd-ratio``
(1:1), every pod the real pod code (scheduler, block pool, prefix cache,
leases, KV events, gRPC) with a latency model for the model
(``--latency-model FILE`` from ``fit``, else the ``PRESET`` below, an
8B-class accelerator pod) and 2048 KV blocks of 16 tokens per pod. Router:
``splitserve router`` processes (file discovery following the fleet's
discovery file when the router has it, else static lists), ``--poll-interval
1``, ``--pd-threshold-tokens 0`` (every prompt goes through a prefill pod,
so the prefill policy alone decides prefix reuse).

Workload (``splitserve.sim.workload``, seeded): hundreds of tenants with
system prompts of 1-4k tokens and Zipf(1.1) popularity, multi-turn sessions
(1-6 turns, history resent) arriving as a Poisson process, 4-8 output tokens
(ignore_eos), replayed with the same seed against each policy
(kv_affinity, consistent_hash, least_loaded, round_robin), with 1 and 3
router replicas (requests spread over the replicas in turn; replicas share
nothing). Caches start cold for every run (all pods restarted).

Per run: prefix-cache hit rate in tokens and the ORACLE's. The oracle, per
prompt computation: the longest cached prefix (whole blocks, at most prompt
- 1 tokens) that any serving pod of the role held when the prompt reached
its pod, read from an exact mirror of every pod's block pool (kept from its
KV events on its engine thread); never less than what the chosen pod really
served. ``vs oracle`` = hit tokens / oracle tokens: the share of the reuse
available at each decision that the policy got (``fleet_report``). Load
imbalance: max/mean over prefill pods of time-averaged sequences in flight
(sampled every 0.1 s) and of requests served. TTFT / ITL p50/p99 as the
client saw them (simulated model time + every real hop). Router CPU per
request (user+sys of the router processes during the replay, minus their
idle rate, / requests). Router added latency (1 replica): TTFT through the
router of a fresh 256-token prompt minus a direct Prefill RPC of another
fresh 256-token prompt to a prefill pod, sequential probes, p50/p99, with
the lean client (``splitserve.sim.lean_http``: what the router adds) and
with httpx (what a typical Python client also pays, ~1 ms more). Requests/s
one router sustains: closed loop of 32 lean clients (workload prompts, 2
output tokens) for ``--sat-seconds`` against pods running 1000x faster than
the latency model (the router must be what runs out); also per router
CPU-second (its rate on a full core). Churn run: 10% of the pods replaced per minute
(drained with 2 s grace, new pods join through the discovery file). Fault
run: injected faults (RPC errors, broken decode streams, failed KV reads,
prefill deaths mid-handoff, leases expiring at once, one pod 4x slower).
Lost = a request whose stream did not end normally with all its tokens;
every stream is also checked token by token against the simulated model.

Targets (reported, never asserted): kv_affinity hit rate >= 0.9 x oracle at
256 pods with max/mean load <= 1.25; 3 replicas within 5% of 1 replica's
hit rate; churn and fault runs lose 0 requests and leak no block or lease.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitserve.engine.sim_runner import sim_tokens  # noqa: E402
from splitserve.sim.fleet_control import FleetControl  # noqa: E402
from splitserve.sim.fleet_launch import (FleetSpec, Proc, RouterSpec, free_port,  # noqa: E402
                                         router_supports_file_discovery, start_fleet, start_router,
                                         wait_router_pods, write_json)
from splitserve.sim.lean_http import LeanConnection  # noqa: E402
from splitserve.sim.fleet_report import hit_rates, latency_summary, load_imbalance, percentile  # noqa: E402
from splitserve.sim.replay_client import RequestResult, replay_sessions, stream_completion  # noqa: E402
from splitserve.sim.workload import Turn, WorkloadSpec, build_sessions, num_requests  # noqa: E402

POLICIES = ("kv_affinity", "consistent_hash", "least_loaded", "round_robin")
# An 8B-class accelerator pod, in round numbers: 12.5k prompt tok/s, 15 ms
# decode steps, KV at 20 GB/s (the tiny model's KV layout: 64 KiB per block).
PRESET = ("--prefill-overhead-ms", "8", "--prefill-per-token-ms", "0.08", "--decode-base-ms", "15",
          "--decode-per-seq-ms", "0.1", "--kv-overhead-ms", "1", "--kv-bandwidth-gbps", "20", "--jitter", "0.05")
SATURATION_SPEEDUP = 1000.0
FAULTS = {"rpc_error_rate": 0.02, "rpcs": ["Prefill", "Decode", "ClaimKV"], "decode_break_rate": 0.02,
          "kv_failure_rate": 0.05, "prefill_death_rate": 0.02, "lease_expiry_rate": 0.02}


def _model_dir() -> str:
    from splitserve.cli.up_command import resolve_model

    return str(resolve_model(None))


def _workload(args: argparse.Namespace, seed: int, duration: float) -> WorkloadSpec:
    spec = WorkloadSpec(num_tenants=args.tenants, sessions_per_s=args.rate / WorkloadSpec().mean_turns,
                        duration_s=duration, seed=seed)
    return spec


class Fleet:
    """One sim process, its control client and the routers of one run."""

    def __init__(self, args: argparse.Namespace, size: int, model: str, log_dir: Path | None) -> None:
        num_prefill = round(size * args.prefill_share)
        self.args, self.size, self.model, self.log_dir = args, size, model, log_dir
        self.file_mode = router_supports_file_discovery() and not args.static
        self.discovery = str((log_dir or Path("/tmp")) / f"fleet-{size}-{os.getpid()}.json") if self.file_mode else None
        latency = ("--latency-model", args.latency_model) if args.latency_model else PRESET
        self.spec = FleetSpec(num_prefill, size - num_prefill, base_port=0, http_port=free_port(),
                              num_blocks=args.blocks, discovery_file=self.discovery,
                              extra_args=(*latency, "--kv-lease-seconds", "30"))
        self.proc: Proc = start_fleet(self.spec, log_dir, f"sim-fleet-{size}")
        self.control = FleetControl(f"http://127.0.0.1:{self.spec.http_port}")

    async def routers(self, policy: str, replicas: int, tag: str) -> list[tuple[Proc, RouterSpec]]:
        pods = await self.control.pods()
        specs = [RouterSpec(self.model, free_port(), policy, discovery_file=self.discovery,
                            prefill=tuple(p["address"] for p in pods if p["role"] == "prefill"),
                            decode=tuple(p["address"] for p in pods if p["role"] == "decode"),
                            poll_interval_s=1.0) for _ in range(replicas)]
        started = await asyncio.gather(*(asyncio.to_thread(start_router, s, self.log_dir, f"router-{tag}-{i}")
                                         for i, s in enumerate(specs)))
        ready = sum(p["status"] == "ready" for p in pods)
        await asyncio.gather(*(asyncio.to_thread(wait_router_pods, s.port, ready, 60.0) for s in specs))
        return list(zip(started, specs))

    async def close(self) -> None:
        await self.control.aclose()
        self.proc.stop(120.0)


def _expected(tokenizer: Any):
    vocab = len(tokenizer)

    def expected(turn: Turn) -> list[str]:
        return [tokenizer.decode([t]) for t in sim_tokens(turn.prompt, turn.max_tokens, vocab)]
    return expected


async def _added_latency(fleet: Fleet, url: str, samples: int) -> dict[str, float]:
    """TTFT via the router minus a direct Prefill RPC (fresh prompts each).
    The router's TTFT is taken with the lean client (what the router adds)
    and with httpx (what a typical Python client sees: its own ~1 ms more)."""
    # The pods run SATURATION_SPEEDUP times faster meanwhile: the difference
    # is then the router's own time, not that plus the latency model's jitter
    # (5% of a ~30 ms prefill: two p50s of 20 draws differ by ~0.5 ms by chance).
    pods = await fleet.control.pods()
    for p in pods:
        await fleet.control.set_slow(p["name"], 1.0 / SATURATION_SPEEDUP)
    try:
        return await _probe(fleet, url, samples)
    finally:
        for p in pods:
            await fleet.control.set_slow(p["name"], 1.0)


async def _probe(fleet: Fleet, url: str, samples: int) -> dict[str, float]:
    import httpx

    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.router.pd_client import PodClient

    prefill = (await fleet.control.addresses("prefill"))[0]
    pod = PodClient(prefill)
    lean = LeanConnection(url)
    rng = random.Random(f"probe:{fleet.size}")
    via, via_httpx, direct = [], [], []

    def fresh() -> tuple[int, ...]:
        return tuple(rng.randrange(16, 256) for _ in range(256))

    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(samples):
            result = RequestResult(-1, i, 0, 256, 1)
            await lean.stream_completion(fleet.model, fresh(), 1, result)
            if result.ok and result.ttft_s is not None:
                via.append(result.ttft_s)
            result = RequestResult(-1, i, 0, 256, 1)
            await stream_completion(client, url, fleet.model, fresh(), 1, result)
            if result.ok and result.ttft_s is not None:
                via_httpx.append(result.ttft_s)
            start = time.perf_counter()
            await pod.prefill(f"probe-{fleet.size}-{i}-{time.time_ns()}", fresh(),
                              SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
            direct.append(time.perf_counter() - start)
    await lean.close()
    await pod.close()
    ms = 1000.0
    return {"samples": samples, "pod_speedup": SATURATION_SPEEDUP,
            "router_ttft_p50_ms": percentile(via, 50) * ms,
            "direct_prefill_p50_ms": percentile(direct, 50) * ms,
            "added_p50_ms": (percentile(via, 50) - percentile(direct, 50)) * ms,
            "added_p99_ms": (percentile(via, 99) - percentile(direct, 99)) * ms,
            "added_p50_ms_httpx": (percentile(via_httpx, 50) - percentile(direct, 50)) * ms,
            "added_p99_ms_httpx": (percentile(via_httpx, 99) - percentile(direct, 99)) * ms}


async def _churn(fleet: Fleet, duration: float) -> list[str]:
    """Replace 10% of the pods per minute, evenly spread (at least one per
    role), while the replay runs: drain one (2 s grace), add one of its role."""
    pods = [p for p in await fleet.control.pods() if p["status"] == "ready"]
    count = max(2, math.ceil(0.1 * len(pods) * duration / 60))
    rng = random.Random(f"churn:{fleet.size}")
    per_role = {role: [p for p in pods if p["role"] == role] for role in ("prefill", "decode")}
    count = min(count, 2 * min(len(group) for group in per_role.values()))  # a tiny fleet: each pod once
    by_role = {role: rng.sample(group, math.ceil(count / 2)) for role, group in per_role.items()}
    victims = [by_role[("prefill", "decode")[i % 2]][i // 2] for i in range(count)]  # roles in turn
    events = []
    for i, victim in enumerate(victims):
        await asyncio.sleep(duration * 0.8 / count)
        if fleet.file_mode:
            await asyncio.gather(fleet.control.remove_pod(victim["name"], grace_seconds=2.0),
                                 fleet.control.add_pod(victim["role"]))
            events.append(f"replaced {victim['name']}")
        else:  # static discovery: the same address comes back as a new incarnation
            await fleet.control.stop_pod(victim["name"], grace_seconds=2.0)
            await fleet.control.start_pod(victim["name"])
            events.append(f"restarted {victim['name']}")
    return events


async def run_one(fleet: Fleet, policy: str, replicas: int, args: argparse.Namespace, expected: Any,
                  kind: str = "policy") -> dict[str, Any]:
    """One replay on a cold fleet; returns the row of the table."""
    duration = args.duration
    await fleet.control.restart()
    routers = await fleet.routers(policy, replicas, f"{fleet.size}-{policy}-{replicas}-{kind}")
    urls = [f"http://127.0.0.1:{spec.port}" for _, spec in routers]
    try:
        await asyncio.sleep(2.0)
        idle0 = [p.cpu_seconds() for p, _ in routers]
        await asyncio.sleep(3.0)
        idle_rate = (sum(p.cpu_seconds() for p, _ in routers) - sum(idle0)) / 3.0
        await fleet.control.reset()
        sessions = build_sessions(_workload(args, args.seed, duration))
        cpu0 = sum(p.cpu_seconds() for p, _ in routers)
        replay = replay_sessions(sessions, urls, fleet.model, expected=expected)
        if kind == "churn":
            (results, wall), events = await asyncio.gather(replay, _churn(fleet, duration))
        else:
            (results, wall), events = await replay, []
        router_cpu = sum(p.cpu_seconds() for p, _ in routers) - cpu0
        records, load, pods = await fleet.control.oracle(), await fleet.control.load(), await fleet.control.pods()
        probe = await _added_latency(fleet, urls[0], args.probes) if replicas == 1 and kind == "policy" else None
        held = await fleet.control.wait_idle(60.0)
    finally:
        for proc, _ in routers:
            proc.stop(60.0)
    n = len(results)
    lost = [r for r in results if not r.ok]
    row = {"size": fleet.size, "policy": policy, "replicas": replicas, "kind": kind, "requests": n,
           "lost": len(lost), "lost_examples": [r.error for r in lost[:3]],
           "wrong_tokens": sum(r.exact is False for r in results), "wall_s": wall, "req_per_s": n / wall,
           **hit_rates(records), **{f"prefill_{k}": v for k, v in load_imbalance(load, pods, "prefill").items()},
           **{f"decode_{k}": v for k, v in load_imbalance(load, pods, "decode").items()},
           **latency_summary(results),
           "router_cpu_ms_per_request": (router_cpu - idle_rate * wall) / n * 1000 if n else float("nan"),
           "router_cpu_ms_per_request_raw": router_cpu / n * 1000 if n else float("nan"),
           "router_idle_cpu_per_s": idle_rate, "added_latency": probe, "events": events,
           "leaked": not held["idle"], "held": {k: v for k, v in held["pods"].items() if any(v.values())},
           "faults": {p["name"]: p["faults"] for p in pods if any(p["faults"].values())} if kind == "fault" else {}}
    print(f"  {fleet.size:4d} pods {policy:16s} x{replicas} {kind:6s}: {n} req, lost {len(lost)}, "
          f"hit {row['hit_rate']:.3f} / oracle {row['oracle_rate']:.3f} ({row['vs_oracle']:.2f}), "
          f"prefill load max/mean {row['prefill_in_flight_max_over_mean']:.2f}, "
          f"TTFT p50 {row['ttft_p50_ms']:.0f} ms, router {row['router_cpu_ms_per_request']:.2f} ms CPU/req"
          + (f", added p50 {probe['added_p50_ms']:.2f} ms" if probe else ""), flush=True)
    return row


async def saturation(fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    """Requests/s of one router, closed loop of 32 lean clients (one
    keep-alive connection each), 2 output tokens, against pods made
    ``SATURATION_SPEEDUP`` times faster than the latency model so that the
    router, not the simulated accelerators, is what runs out."""
    await fleet.control.restart()
    for pod in await fleet.control.pods():
        await fleet.control.set_slow(pod["name"], 1.0 / SATURATION_SPEEDUP)
    [(proc, spec)] = await fleet.routers("kv_affinity", 1, f"{fleet.size}-saturation")
    url = f"http://127.0.0.1:{spec.port}"
    turns = [t for s in build_sessions(_workload(args, args.seed + 7, 30.0)) for t in s.turns]
    if args.sat_prompt_tokens:  # the workload's prompts cut to one length (their prefixes still shared)
        turns = [replace(t, prompt=t.prompt[:args.sat_prompt_tokens]) for t in turns]
    done, failed, stop_at = 0, 0, 0.0
    try:
        connections = [LeanConnection(url) for _ in range(32)]
        counter = iter(range(10**9))

        async def worker(connection: LeanConnection) -> None:
            nonlocal done, failed
            while time.perf_counter() < stop_at:
                turn = turns[next(counter) % len(turns)]
                result = RequestResult(turn.session_id, turn.turn, 0, len(turn.prompt), 2)
                await connection.stream_completion(fleet.model, turn.prompt, 2, result)
                done += result.ok
                failed += not result.ok

        stop_at = time.perf_counter() + 3.0  # warm up
        await asyncio.gather(*(worker(c) for c in connections))
        done = failed = 0
        cpu0, start = proc.cpu_seconds(), time.perf_counter()
        stop_at = start + args.sat_seconds
        await asyncio.gather(*(worker(c) for c in connections))
        wall, cpu = time.perf_counter() - start, proc.cpu_seconds() - cpu0
        for connection in connections:
            await connection.close()
    finally:
        proc.stop(60.0)
    row = {"size": fleet.size, "prompt_tokens": args.sat_prompt_tokens or "workload", "requests": done,
           "failed": failed, "wall_s": wall, "req_per_s": done / wall, "router_cpu_share": cpu / wall, "req_per_router_cpu_s": done / cpu if cpu else float("nan")}
    print(f"  {fleet.size:4d} pods saturation: {row['req_per_s']:.0f} req/s with the router at "
          f"{row['router_cpu_share']:.0%} of a core ({row['req_per_router_cpu_s']:.0f} req per router CPU-s)",
          flush=True)
    return row


async def run_size(size: int, args: argparse.Namespace, model: str, expected: Any) -> dict[str, Any]:
    fleet = await asyncio.to_thread(Fleet, args, size, model, args.log_dir)
    out: dict[str, Any] = {"size": size, "discovery": "file" if fleet.file_mode else "static", "runs": []}
    try:
        memory = await fleet.control.memory()
        out["fleet_rss_bytes_start"] = memory["rss_bytes"]
        for policy in args.policies:
            for replicas in args.replicas:
                if replicas > 1 and policy != "kv_affinity" and args.quick:
                    continue
                out["runs"].append(await run_one(fleet, policy, replicas, args, expected))
        if size in args.churn_sizes:
            out["runs"].append(await run_one(fleet, "kv_affinity", 1, args, expected, kind="churn"))
        if size in args.fault_sizes:
            pods = await fleet.control.pods()
            await fleet.control.set_faults(**FAULTS)
            await fleet.control.set_slow(pods[0]["name"], 4.0)
            try:
                out["runs"].append(await run_one(fleet, "kv_affinity", 1, args, expected, kind="fault"))
            finally:
                await fleet.control.set_faults()
        if args.sat_seconds > 0:
            out["saturation"] = await saturation(fleet, args)
        out["fleet_rss_bytes_end"] = (await fleet.control.memory())["rss_bytes"]
    finally:
        await fleet.close()
    return out


def print_table(sizes: list[dict[str, Any]]) -> None:
    header = ("pods", "policy", "routers", "run", "req", "lost", "hit", "oracle", "vs oracle", "P max/mean",
              "D max/mean", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "router ms CPU/req", "added p50/p99 ms")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for size in sizes:
        for r in size["runs"]:
            added = r["added_latency"]
            print(" | ".join([str(r["size"]), r["policy"], str(r["replicas"]), r["kind"], str(r["requests"]),
                              str(r["lost"]), f"{r['hit_rate']:.3f}", f"{r['oracle_rate']:.3f}",
                              f"{r['vs_oracle']:.2f}", f"{r['prefill_in_flight_max_over_mean']:.2f}",
                              f"{r['decode_in_flight_max_over_mean']:.2f}", f"{r['ttft_p50_ms']:.0f}",
                              f"{r['ttft_p99_ms']:.0f}", f"{r['itl_p50_ms']:.1f}", f"{r['itl_p99_ms']:.1f}",
                              f"{r['router_cpu_ms_per_request']:.2f}",
                              f"{added['added_p50_ms']:.2f} / {added['added_p99_ms']:.2f}" if added else "-"]))


def targets(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    runs = [r for s in sizes for r in s["runs"]]
    largest = max(s["size"] for s in sizes)
    one = next((r for r in runs if r["size"] == largest and r["policy"] == "kv_affinity" and r["replicas"] == 1
                and r["kind"] == "policy"), None)
    three = next((r for r in runs if r["size"] == largest and r["policy"] == "kv_affinity" and r["replicas"] == 3),
                 None)
    special = [r for r in runs if r["kind"] in ("churn", "fault")]
    return {
        "pods": largest,
        "kv_affinity_vs_oracle": one and one["vs_oracle"], "kv_affinity_vs_oracle_target": 0.9,
        "kv_affinity_prefill_max_over_mean": one and one["prefill_in_flight_max_over_mean"],
        "max_over_mean_target": 1.25,
        "replicas3_vs_1_hit_rate": (three["hit_rate"] / one["hit_rate"]) if one and three else None,
        "replicas3_target": ">= 0.95",
        "churn_fault_lost": sum(r["lost"] for r in special), "churn_fault_leaked": any(r["leaked"] for r in special),
        "all_lost": sum(r["lost"] for r in runs), "all_wrong_tokens": sum(r["wrong_tokens"] for r in runs),
    }


def run(args: argparse.Namespace) -> int:
    from splitserve.engine.tokenizer import load_tokenizer

    model = args.model or _model_dir()
    expected = _expected(load_tokenizer(model))
    spec = _workload(args, args.seed, args.duration)
    print(f"workload: {spec.num_tenants} tenants, ~{args.rate:g} req/s for {args.duration:g} s "
          f"(~{num_requests(build_sessions(spec))} requests), sizes {args.sizes}, policies {list(args.policies)}, "
          f"replicas {args.replicas}", flush=True)
    started = time.monotonic()
    sizes = [asyncio.run(run_size(size, args, model, expected)) for size in args.sizes]
    print(f"\nmachine: {os.cpu_count()} cores, {platform.machine()}, shared; "
          f"{(time.monotonic() - started) / 60:.1f} min")
    print_table(sizes)
    for s in sizes:
        if "saturation" in s:
            sat = s["saturation"]
            print(f"{s['size']} pods: one router {sat['req_per_s']:.0f} req/s at {sat['router_cpu_share']:.0%} "
                  f"CPU, {sat['req_per_router_cpu_s']:.0f} req per router CPU-second")
        print(f"{s['size']} pods: sim process RSS {s['fleet_rss_bytes_start'] / 2**20:.0f} MiB at start, "
              f"{s['fleet_rss_bytes_end'] / 2**20:.0f} MiB at the end ({s['discovery']} discovery)")
    if len(sizes) > 1:
        a, b = sizes[0], sizes[-1]
        per_pod = (b["fleet_rss_bytes_start"] - a["fleet_rss_bytes_start"]) / (b["size"] - a["size"])
        print(f"RSS per sim pod (slope {a['size']} -> {b['size']} pods, at start): {per_pod / 2**20:.2f} MiB")
    result_targets = targets(sizes)
    print(f"targets: {json.dumps(result_targets)}")
    if args.json:
        write_json(args.json, {"benchmark": "fleet", "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                               "model": model, "latency": args.latency_model or list(PRESET),
                               "workload": asdict(spec), "args": {k: str(v) for k, v in vars(args).items()},
                               "sizes": sizes, "targets": result_targets})
        print(f"wrote {args.json}")
    return 0


# -- fit: the latency model from our own benchmark JSON ------------------------------

def _replay_engine_json(path: Path) -> tuple[str, Any, dict[str, Any]]:
    """The replayed trace of one ``bench/engine_throughput.py`` JSON (its
    workload rebuilt from name/seed/sizes, the same warm-up) and its
    splitserve result."""
    from bench.workload import engine_workload

    from splitserve.sim.latency_fit import ReplayRequest, replay

    data = json.loads(path.read_text())
    if data.get("benchmark") != "engine_throughput":
        raise SystemExit(f"{path}: not a bench/engine_throughput.py result")
    w = data["workload"]
    workload = engine_workload(data["model"]["vocab_size"], quick=w["name"] == "engine-quick", seed=w["seed"],
                               num_requests=w["num_requests"], max_tokens=w["max_tokens"])
    if workload.num_prompt_tokens != w["prompt_tokens"]:
        raise SystemExit(f"{path}: rebuilt workload has {workload.num_prompt_tokens} prompt tokens, "
                         f"the file says {w['prompt_tokens']}")
    requests = [ReplayRequest(r.request_id, r.prompt_token_ids, r.max_tokens) for r in workload.requests]
    warm = [ReplayRequest(f"warm-{i}", r.prompt_token_ids[:64], 4) for i, r in enumerate(workload.requests[:4])]
    trace = replay(requests, warm, vocab_size=data["model"]["vocab_size"])
    result = next(r for r in data["results"] if r["system"] == "splitserve")
    return f"{path.stem}({w['num_requests']}x{w['max_tokens']})", trace, result


def _kv_samples(path: Path, mode: str, layout: str) -> list[tuple[int, float]]:
    data = json.loads(path.read_text())
    rows = [r for r in data.get("results", []) if r.get("mode") == mode and r.get("layout") == layout]
    if not rows:
        raise SystemExit(f"{path}: no rows of mode {mode!r} and layout {layout!r}")
    return [(int(r["bytes"]), float(r["p50_ms"]) / 1000) for r in rows]


def main_fit(argv: list[str]) -> int:
    from splitserve.sim.latency_fit import fit_steps, fit_transfer, latency_observations, params_from_fit

    parser = argparse.ArgumentParser(prog="bench/fleet.py fit",
                                     description="Fit the sim latency model to our engine benchmark JSON.")
    parser.add_argument("--from", dest="sources", type=Path, nargs="+", required=True,
                        help="bench/engine_throughput.py --json files (several batch sizes / lengths)")
    parser.add_argument("--kv-json", type=Path, default=None, help="bench/kv_transfer.py --json (KV time fit)")
    parser.add_argument("--kv-mode", default="nixl-shm")
    parser.add_argument("--kv-layout", default="llama-56m-fp32")
    parser.add_argument("--out", type=Path, default=Path("bench/results/sim_latency.json"))
    args = parser.parse_args(argv)
    observations, traces = [], []
    for path in args.sources:
        name, trace, result = _replay_engine_json(path)
        traces.append((name, trace))
        observations += latency_observations(name, trace, result["wall_s"], result["latency_p50_s"],
                                             result["latency_p90_s"], result["latency_max_s"])
    steps = fit_steps(observations)
    transfer = fit_transfer(_kv_samples(args.kv_json, args.kv_mode, args.kv_layout)) if args.kv_json else None
    params = params_from_fit(steps, transfer)
    print(f"fitted from {len(observations)} measured figures of {len(args.sources)} runs "
          f"(rms relative error {steps.rms_relative_error:.1%}):")
    for name, value in steps.values.items():
        print(f"  {name:22s} {value * 1000:10.4f} ms")
    if transfer:
        print(f"  kv_overhead_s          {transfer[0] * 1000:10.4f} ms\n  kv_bandwidth           {transfer[1] / 1e9:10.2f} GB/s")
    print("\nfigure | measured s | sim s | error")
    print("--- | --- | --- | ---")
    for label, measured, predicted in steps.rows:
        print(f"{label} | {measured:.3f} | {predicted:.3f} | {(predicted - measured) / measured:+.1%}")
    from splitserve.engine.sim_runner import StepShape

    print("\nsim step times: " + ", ".join(
        f"{label} {params.mean_step_seconds(shape) * 1000:.1f} ms" for label, shape in (
            ("decode x1", StepShape(0, 0, 1)), ("decode x16", StepShape(0, 0, 16)),
            ("decode x64", StepShape(0, 0, 64)), ("prefill 256 tok", StepShape(256, 1, 0)),
            ("prefill 2048 tok", StepShape(2048, 8, 0)))))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    params.to_json(args.out, extra={"fit": {
        "sources": [str(p) for p in args.sources], "kv_source": str(args.kv_json) if args.kv_json else None,
        "rms_relative_error": steps.rms_relative_error,
        "rows": [{"figure": label, "measured_s": m, "sim_s": p} for label, m, p in steps.rows],
        "steps_per_run": {name: len(trace.shapes) for name, trace in traces}}})
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:
        return main_fit(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 and 256 pods, 20 s runs, fewer combinations")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--prefill-share", type=float, default=0.5, help="share of prefill pods (P:D 1:1)")
    parser.add_argument("--rate", type=float, default=None, help="requests/s offered (default 20, quick 15)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of arrivals per run")
    parser.add_argument("--tenants", type=int, default=None, help="default 300 (quick 200)")
    parser.add_argument("--blocks", type=int, default=2048, help="KV blocks per sim pod")
    parser.add_argument("--latency-model", default=None, help="fitted latency file (default: PRESET)")
    parser.add_argument("--probes", type=int, default=None, help="router added-latency probes per run")
    parser.add_argument("--sat-seconds", type=float, default=None, help="saturation run length (0: none)")
    parser.add_argument("--sat-prompt-tokens", type=int, default=0,
                        help="saturation run: cut every prompt to this many tokens (0: the workload's)")
    parser.add_argument("--churn-sizes", type=int, nargs="*", default=None)
    parser.add_argument("--fault-sizes", type=int, nargs="*", default=None)
    parser.add_argument("--static", action="store_true", help="static discovery even if the router has file")
    parser.add_argument("--model", default=None, help="router model folder (default: the built-in tiny model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    q = args.quick
    args.sizes = args.sizes or ([16, 256] if q else [16, 64, 256])
    args.rate = args.rate or (15.0 if q else 20.0)
    args.duration = args.duration or (20.0 if q else 60.0)
    args.tenants = args.tenants or (200 if q else 300)
    args.probes = args.probes if args.probes is not None else (20 if q else 50)
    args.sat_seconds = args.sat_seconds if args.sat_seconds is not None else (8.0 if q else 20.0)
    args.churn_sizes = args.churn_sizes if args.churn_sizes is not None else [min(args.sizes, key=lambda s: abs(s - 64))]
    args.fault_sizes = args.fault_sizes if args.fault_sizes is not None else [min(args.sizes, key=lambda s: abs(s - 64))]
    if args.log_dir is None:
        args.log_dir = Path("bench/results/fleet-logs")
    return run(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
