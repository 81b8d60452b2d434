"""Flags of ``splitserve serve sim`` (added to the ``serve`` parser) and the
``SimConfig`` they make. Imports nothing heavy at module level: ``splitserve
--help`` must not load torch.

    splitserve serve sim --sim-role prefill --num-pods 8 --sim-role decode --num-pods 8 \\
        --base-port 52000 --http-port 8090 [--latency-model FILE] [--decode-base-ms 12 ...] \\
        [--fault-rpc-error-rate 0.02 ...] [--num-gpu-blocks-override 2048] [--model DIR]

``--sim-role``/``--num-pods`` pair up in order (one ``--num-pods`` applies to
every role). Without ``--model`` the pods take the built-in tiny Llama's
shape (vocabulary, end tokens, KV layout); ``--max-model-len`` raises its
context limit. KV blocks per pod: ``--num-gpu-blocks-override``, else
``--kv-cache-memory`` / block bytes, else 2048.
"""
from __future__ import annotations

import argparse
from typing import Any

DEFAULT_SIM_BLOCKS = 2048
_MS = 1e-3


def add_sim_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("simulated pods (role sim only)")
    g.add_argument("--sim-role", action="append", choices=("prefill", "decode", "unified"), default=None,
                   help="role of a group of simulated pods (repeat for several groups)")
    g.add_argument("--num-pods", action="append", type=int, default=None,
                   help="pods in the matching --sim-role group (one value applies to every group)")
    g.add_argument("--base-port", type=int, default=None,
                   help="gRPC port of the first sim pod; pod i listens on BASE+i (default --port)")
    g.add_argument("--latency-model", default=None, metavar="FILE",
                   help="latency parameters fitted from our benchmark JSON (python bench/fleet.py fit)")
    g.add_argument("--prefill-overhead-ms", type=float, default=None, help="fixed cost of a step with prompt work")
    g.add_argument("--prefill-per-token-ms", type=float, default=None, help="cost per uncached prompt token")
    g.add_argument("--decode-base-ms", type=float, default=None, help="fixed cost of a decode-only step")
    g.add_argument("--decode-per-seq-ms", type=float, default=None, help="cost per sequence in a decode batch")
    g.add_argument("--kv-overhead-ms", type=float, default=None, help="fixed cost of one KV READ")
    g.add_argument("--kv-bandwidth-gbps", type=float, default=None, help="KV READ bandwidth, GB/s (1e9 bytes/s)")
    g.add_argument("--jitter", type=float, default=None, help="each time x uniform[1-J, 1+J] (default 0.05)")
    g.add_argument("--fault-rpc-error-rate", type=float, default=0.0,
                   help="chance an RPC of --fault-rpcs answers UNAVAILABLE")
    g.add_argument("--fault-rpcs", default="Prefill,Decode,ClaimKV",
                   help="RPCs --fault-rpc-error-rate applies to (comma-separated)")
    g.add_argument("--fault-decode-break-rate", type=float, default=0.0,
                   help="chance a Decode stream breaks (UNAVAILABLE) after its first chunk")
    g.add_argument("--fault-kv-failure-rate", type=float, default=0.0, help="chance a KV READ fails")
    g.add_argument("--fault-prefill-death-rate", type=float, default=0.0,
                   help="chance a prefill pod is gone when its lease is claimed (mid-handoff)")
    g.add_argument("--fault-lease-expiry-rate", type=float, default=0.0,
                   help="chance a KV lease expires as soon as it is granted")
    g.add_argument("--slow-pods", type=int, default=0, help="this many pods (seeded pick) run slower")
    g.add_argument("--slow-factor", type=float, default=4.0, help="how much slower a slow pod is")
    g.add_argument("--discovery-file", default=None, metavar="PATH",
                   help="keep a file-discovery JSON of the sim pods here (splitserve router --discovery file)")


def sim_config_from_args(args: argparse.Namespace) -> Any:
    """Build and validate the ``SimConfig``; ``ValueError`` says what is wrong."""
    from splitserve.pod.messages import Role
    from splitserve.sim.config import PodGroup, SimConfig, SimModel
    from splitserve.sim.faults import FaultConfig
    from splitserve.sim.latency_model import LatencyParams

    roles = args.sim_role or []
    counts = args.num_pods or []
    if not roles:
        raise ValueError("serve sim needs --sim-role prefill|decode|unified (and --num-pods N)")
    if len(counts) == 1:
        counts = counts * len(roles)
    if len(counts) != len(roles):
        raise ValueError(f"{len(roles)} --sim-role groups but {len(counts)} --num-pods values")
    model = SimModel.from_model_dir(args.model) if args.model else SimModel.tiny()
    block_size = args.block_size
    if args.num_gpu_blocks_override:
        num_blocks = args.num_gpu_blocks_override
    elif args.kv_cache_memory:
        num_blocks = max(1, args.kv_cache_memory // model.layout(1, block_size).block_bytes)
    else:
        num_blocks = DEFAULT_SIM_BLOCKS
    params = LatencyParams.from_json(args.latency_model) if args.latency_model else LatencyParams()
    params = params.with_overrides(
        prefill_overhead_s=_seconds(args.prefill_overhead_ms), prefill_per_token_s=_seconds(args.prefill_per_token_ms),
        decode_base_s=_seconds(args.decode_base_ms), decode_per_seq_s=_seconds(args.decode_per_seq_ms),
        kv_overhead_s=_seconds(args.kv_overhead_ms),
        kv_bandwidth_bytes_per_s=args.kv_bandwidth_gbps * 1e9 if args.kv_bandwidth_gbps is not None else None,
        jitter=args.jitter)
    faults = FaultConfig(rpc_error_rate=args.fault_rpc_error_rate,
                         rpcs=tuple(r.strip() for r in args.fault_rpcs.split(",") if r.strip()),
                         decode_break_rate=args.fault_decode_break_rate, kv_failure_rate=args.fault_kv_failure_rate,
                         prefill_death_rate=args.fault_prefill_death_rate,
                         lease_expiry_rate=args.fault_lease_expiry_rate)
    advertise = args.advertise_address.rpartition(":")[0] or args.advertise_address \
        if args.advertise_address else None
    return SimConfig(
        groups=tuple(PodGroup(Role(r), c) for r, c in zip(roles, counts)), model=model, host=args.host,
        base_port=args.base_port if args.base_port is not None else args.port, http_port=args.http_port,
        advertise_host=advertise, block_size=block_size, num_blocks=num_blocks, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching, kv_lease_seconds=args.kv_lease_seconds,
        kv_claim_timeout_s=args.kv_claim_timeout, kv_transfer_timeout_s=args.kv_transfer_timeout,
        shutdown_grace_seconds=args.shutdown_grace_seconds, latency=params, faults=faults,
        slow_pods=args.slow_pods, slow_factor=args.slow_factor, seed=args.seed, discovery_file=args.discovery_file)


def run_sim(args: argparse.Namespace) -> int:
    """Handler of ``splitserve serve sim``."""
    try:
        config = sim_config_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"splitserve serve sim: {exc}") from None
    from splitserve.sim.server import serve_fleet

    return serve_fleet(config)


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms * _MS
