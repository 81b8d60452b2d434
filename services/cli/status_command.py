"""``splitserve status``: pools and pods of a running ``splitserve up``."""
from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    from splitserve.local.control_client import add_control_args

    parser = subparsers.add_parser("status", help="pools and pods of a running `splitserve up`",
                                   description="Print the pools (ready/desired, revision, restarts) and "
                                               "pods (state, address, pid) of a running `splitserve up`.")
    add_control_args(parser)
    parser.add_argument("--json", action="store_true", help="print the raw JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from splitserve.local.control_client import ControlClient, ControlClientError, format_status

    try:
        status = ControlClient.from_args(args).status()
    except ControlClientError as exc:
        raise SystemExit(f"splitserve status: {exc}") from None
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return 0
