"""The ``splitserve`` command line (also ``python -m splitserve``).

Each command lives in its own module with ``register(subparsers)``, which adds
a subparser whose ``handler`` default takes the parsed args and returns an
exit code.
"""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

from splitserve import __version__

# Modules providing ``register(subparsers)``; imported lazily so that
# ``splitserve --help`` does not load torch.
COMMAND_MODULES = (
    "splitserve.cli.up_command",
    "splitserve.cli.model_command",
    "splitserve.cli.router_command",
    "splitserve.cli.serve_command",
    "splitserve.cli.kernels_command",
    "splitserve.cli.scale_command",
    "splitserve.cli.rollout_command",
    "splitserve.cli.status_command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description="Disaggregated prefill/decode LLM serving.")
    parser.add_argument("--version", action="version", version=f"splitserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.handler(args) or 0)
