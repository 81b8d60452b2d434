"""``splitserve scale POOL=N ...``: resize pools of a running ``splitserve up``
(``kubectl scale`` for the local cluster). Without POOL=N it prints the pools."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from splitserve.local.control_client import add_control_args

    parser = subparsers.add_parser(
        "scale", help="resize pools of a running `splitserve up` (e.g. decode=3, prefill=0)",
        description=("Set the replica count of pools of a running `splitserve up`: new pods start, "
                     "surplus ones drain (not-ready first, then newest) and stop. A pool may go to 0 "
                     "(the router queues its requests until it is back). Without POOL=N: print the pools."))
    parser.add_argument("replicas", nargs="*", metavar="POOL=N", help="e.g. decode=3 prefill=0")
    add_control_args(parser)
    parser.add_argument("--wait", action="store_true", help="return once the pools are scaled and ready")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits (default 300)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from splitserve.local.control_client import ControlClient, ControlClientError, format_status, parse_replicas

    try:
        replicas = parse_replicas(args.replicas)
        client = ControlClient.from_args(args)
        if not replicas:
            print(format_status(client.status()))
            return 0
        status = client.scale(replicas)
        if args.wait:
            status = client.wait_converged(list(replicas), args.timeout)
    except (ValueError, ControlClientError) as exc:
        raise SystemExit(f"splitserve scale: {exc}") from None
    print(format_status(status))
    return 0
