"""``splitserve rollout restart|status POOL``: rolling restart of a pool of a
running ``splitserve up`` (``kubectl rollout``), one pod at a time with no
capacity lost (maxSurge 1, maxUnavailable 0)."""
from __future__ import annotations

import argparse

POOLS = ("prefill", "decode", "unified")


def register(subparsers: argparse._SubParsersAction) -> None:
    from splitserve.local.control_client import add_control_args

    parser = subparsers.add_parser(
        "rollout", help="rolling restart of a pool of a running `splitserve up`",
        description=("restart: replace every pod of POOL one by one: start a new pod, wait until it "
                     "is ready, drain an old one, wait until it exited, repeat. status: wait until "
                     "POOL's rollout is complete."))
    parser.add_argument("action", choices=["restart", "status"])
    parser.add_argument("pool", choices=POOLS)
    add_control_args(parser)
    parser.add_argument("--wait", action="store_true", help="restart: return once the rollout is complete")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from splitserve.local.control_client import ControlClient, ControlClientError, format_status

    try:
        client = ControlClient.from_args(args)
        if args.action == "restart":
            status = client.rollout_restart(args.pool)
            print(f"{args.pool} restarted (revision {status['pools'][args.pool]['revision']})", flush=True)
            if not args.wait:
                return 0
        status = client.wait_converged([args.pool], args.timeout)
    except ControlClientError as exc:
        raise SystemExit(f"splitserve rollout: {exc}") from None
    print(format_status(status))
    print(f"{args.pool}: rollout complete")
    return 0
