"""``splitserve serve prefill|decode|unified``: run one engine pod (``serve sim``: simulated pods)."""
from __future__ import annotations

import argparse

from splitserve.engine.engine_args import EngineArgs
from splitserve.grpc_tls import add_grpc_tls_args, grpc_tls_from_args
from splitserve.pod.config import PodConfig
from splitserve.pod.messages import Role
from splitserve.sim.cli_args import add_sim_args, run_sim


def register(subparsers: argparse._SubParsersAction) -> None:
    d = PodConfig(Role.UNIFIED)
    p = subparsers.add_parser("serve", help="run one engine pod (prefill, decode or unified)",
                              description="Serve the splitserve.v1.Engine gRPC API plus /health and /metrics.")
    p.add_argument("role", choices=[r.value for r in Role] + ["sim"])
    p.add_argument("--host", default=d.host,
                   help="bind address of gRPC and HTTP (default 127.0.0.1; on Kubernetes the pod IP; "
                        "0.0.0.0 only when every interface should answer)")
    p.add_argument("--port", type=int, default=d.port, help="gRPC port")
    p.add_argument("--http-port", type=int, default=d.http_port, help="HTTP port (/health, /metrics)")
    p.add_argument("--advertise-address", default=None,
                   help="host:port decoders dial back for ClaimKV/ReleaseKV; default HOST:PORT")
    p.add_argument("--agent-name", default=None, help="NIXL agent name (stable per pod); default ROLE@ADDRESS")
    p.add_argument("--kv-lease-seconds", type=float, default=d.kv_lease_seconds,
                   help="prefill: free leased KV blocks nobody pulled after this long")
    p.add_argument("--kv-claim-timeout", type=float, default=d.kv_claim_timeout_s,
                   help="prefill: how long a claimed (being read) lease may live")
    p.add_argument("--kv-transfer-timeout", type=float, default=d.kv_transfer_timeout_s,
                   help="decode: READ timeout before recomputing the prompt (< --kv-claim-timeout)")
    p.add_argument("--ucx-tls", default=None, help="UCX_TLS for this pod's NIXL agent, e.g. tcp")
    p.add_argument("--nixl-progress-thread", action="store_true",
                   help="run NIXL's UCX progress thread (busy: one core per pod; helps KV over TCP)")
    p.add_argument("--shutdown-grace-seconds", type=float, default=d.shutdown_grace_seconds,
                   help="on SIGTERM, let running requests finish this long before aborting them")
    add_grpc_tls_args(p, "this pod's server, and a decode pod's calls to prefill pods")
    EngineArgs.add_cli_args(p)
    add_sim_args(p)
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    if args.role == "sim":
        return run_sim(args)
    from splitserve.pod.server import serve

    try:
        config = PodConfig(
            Role(args.role), host=args.host, port=args.port, http_port=args.http_port,
            advertise_address=args.advertise_address, agent_name=args.agent_name,
            kv_lease_seconds=args.kv_lease_seconds, kv_claim_timeout_s=args.kv_claim_timeout,
            kv_transfer_timeout_s=args.kv_transfer_timeout, ucx_tls=args.ucx_tls,
            nixl_progress_thread=args.nixl_progress_thread,
            shutdown_grace_seconds=args.shutdown_grace_seconds, grpc_tls=grpc_tls_from_args(args))
        engine_args = EngineArgs.from_cli_args(args)
    except ValueError as exc:
        raise SystemExit(f"splitserve serve: {exc}") from None
    if not engine_args.model:
        raise SystemExit("splitserve serve: --model is required (a Hugging Face model folder)")
    return serve(config, engine_args)
