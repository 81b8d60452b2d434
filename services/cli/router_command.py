"""``splitserve router``: the OpenAI front end over prefill/decode (or unified) pods."""
from __future__ import annotations

import argparse
import asyncio
import logging

from splitserve.router.policies import PREFILL_POLICIES


def _addresses(value: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in value.split(",") if a.strip())


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "router", help="run the OpenAI router in front of running pods",
        description=("Serve the OpenAI API (chat, completions, models) and route each request "
                     "to prefill + decode pods (or unified pods) over gRPC. The API key comes "
                     "from SPLITSERVE_API_KEY; unset, the API is open."))
    parser.add_argument("--model", required=True,
                        help="Hugging Face model folder (tokenizer, chat template, config.json)")
    parser.add_argument("--prefill", type=_addresses, default=(), metavar="HOST:PORT[,...]",
                        help="prefill pods' gRPC addresses")
    parser.add_argument("--decode", type=_addresses, default=(), metavar="HOST:PORT[,...]",
                        help="decode pods' gRPC addresses")
    parser.add_argument("--unified", type=_addresses, default=(), metavar="HOST:PORT[,...]",
                        help="unified pods' gRPC addresses (instead of --prefill/--decode)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--policy", default="kv_affinity", choices=PREFILL_POLICIES,
                        help="prefill (or unified) pod choice (default kv_affinity)")
    parser.add_argument("--load-factor", type=float, default=1.25,
                        help="bounded load: no pod takes more than this times the mean (default 1.25)")
    parser.add_argument("--pd-threshold-tokens", type=int, default=64,
                        help="disaggregate only when at least this many prompt tokens are missing "
                             "on the chosen decode pod; shorter ones are computed there (0: always)")
    parser.add_argument("--block-size", type=int, default=16, help="the pods' KV block size")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="model names clients may send (default: the --model value)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="longest prompt accepted (default: the model's max_position_embeddings)")
    parser.add_argument("--max-tokens-limit", type=int, default=None,
                        help="largest max_tokens accepted (default 4096)")
    parser.add_argument("--poll-interval", type=float, default=0.2,
                        help="seconds between load polls of each pod (default 0.2)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from splitserve.router.server import RouterConfig, serve

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = RouterConfig(
            model=args.model, prefill=args.prefill, decode=args.decode, unified=args.unified,
            host=args.host, port=args.port, policy=args.policy, load_factor=args.load_factor,
            pd_threshold_tokens=args.pd_threshold_tokens, block_size=args.block_size,
            served_model_names=tuple(args.served_model_name or ()),
            max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens_limit,
            poll_interval_s=args.poll_interval)
    except ValueError as exc:
        raise SystemExit(f"splitserve router: {exc}") from None
    try:
        asyncio.run(serve(config))
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise SystemExit(f"splitserve router: {exc}") from None
    return 0
