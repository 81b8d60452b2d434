"""``splitserve model``: model-folder utilities (``model tiny --out DIR``)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model", help="model folder utilities",
                                   description="Model folder utilities.")
    actions = parser.add_subparsers(dest="model_action", metavar="ACTION", required=True)
    tiny = actions.add_parser(
        "tiny",
        help="write the built-in tiny Llama checkpoint (random weights, byte-level tokenizer)",
        description="Write the deterministic tiny Llama checkpoint (Hugging Face format) to --out.",
    )
    tiny.add_argument("--out", type=Path, required=True, help="folder to write (replaced if it exists)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.set_defaults(handler=run_tiny)


def run_tiny(args: argparse.Namespace) -> int:
    from splitserve.engine.tiny_model import TinyModelSpec, write_tiny_model

    out = write_tiny_model(args.out, TinyModelSpec(seed=args.seed))
    print(out)
    return 0
