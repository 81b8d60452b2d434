"""``splitserve router``: the OpenAI front end over prefill/decode (or unified) pods."""
from __future__ import annotations

import argparse
import logging
import ssl
from typing import TYPE_CHECKING

from splitserve import event_loop
from splitserve.grpc_tls import add_grpc_tls_args, grpc_tls_from_args
from splitserve.router.discovery import DISCOVERY_KINDS
from splitserve.router.policies import PREFILL_POLICIES

if TYPE_CHECKING:
    from splitserve.http_server import HTTPTLS


def _addresses(value: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in value.split(",") if a.strip())


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "router", help="run the OpenAI router in front of running pods",
        description=("Serve the OpenAI API (chat, completions, models) and route each request "
                     "to prefill + decode pods (or unified pods) over gRPC. Pods come from one "
                     "discovery source and may join and leave while it serves. The API key comes "
                     "from SPLITSERVE_API_KEY; unset, the API is open."))
    parser.add_argument("--model", required=True,
                        help="Hugging Face model folder (tokenizer, chat template, config.json)")
    pods = parser.add_argument_group("pods (discovery)")
    pods.add_argument("--discovery", default="static", choices=DISCOVERY_KINDS,
                      help="where pods come from: static (the address flags), file (--discovery-file), "
                           "dns (headless Service names), kubernetes (EndpointSlices); default static")
    pods.add_argument("--prefill", type=_addresses, default=(), metavar="HOST:PORT[,...]",
                      help="static: prefill pods' gRPC addresses")
    pods.add_argument("--decode", type=_addresses, default=(), metavar="HOST:PORT[,...]",
                      help="static: decode pods' gRPC addresses")
    pods.add_argument("--unified", type=_addresses, default=(), metavar="HOST:PORT[,...]",
                      help="static: unified pods' gRPC addresses (instead of --prefill/--decode)")
    pods.add_argument("--discovery-file", default=None, metavar="PATH",
                      help='file: JSON {"version": 1, "pods": [{"role", "address", "state"}]}, '
                           "re-read on change (polled every 0.2 s)")
    for role in ("prefill", "decode", "unified"):
        pods.add_argument(f"--{role}-service", default=None, metavar="NAME",
                          help=f"kubernetes: the {role} pods' headless Service; dns: its HOST:PORT")
    pods.add_argument("--namespace", default=None,
                      help="kubernetes: the Services' namespace (default: the router pod's own, else default)")
    pods.add_argument("--grpc-port-name", default="grpc",
                      help="kubernetes: the EndpointSlice port of the pods' gRPC (default grpc)")
    pods.add_argument("--reconcile-seconds", type=float, default=30.0,
                      help="full re-list (kubernetes) or re-read (file) period, so a missed change "
                           "cannot leave a ghost pod (default 30)")
    scale = parser.add_argument_group("scaling and shutdown")
    scale.add_argument("--scaler-port", type=int, default=0,
                       help="serve KEDA's external scaler gRPC on this port (0: off, the default)")
    scale.add_argument("--max-queued-requests", type=int, default=256,
                       help="requests held while no pod can take them, e.g. a pool at zero (default 256; "
                            "more get 503 with Retry-After)")
    scale.add_argument("--queue-timeout-seconds", type=float, default=60.0,
                       help="longest a request waits in that queue before a 503 (default 60)")
    scale.add_argument("--shutdown-grace-seconds", type=float, default=30.0,
                       help="on SIGTERM, how long open streams may run before they are cut (default 30)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address of the API and the KEDA scaler, or a comma-separated list "
                             "(default 127.0.0.1; on Kubernetes the pod IP and 127.0.0.1; 0.0.0.0 only when "
                             "every interface should answer)")
    tls = parser.add_argument_group("TLS on the OpenAI API (vLLM's flags)")
    tls.add_argument("--ssl-keyfile", default=None, metavar="PEM", help="the server's private key (HTTPS)")
    tls.add_argument("--ssl-certfile", default=None, metavar="PEM", help="the server's certificate chain")
    tls.add_argument("--ssl-ca-certs", default=None, metavar="PEM", help="CA bundle of client certificates")
    tls.add_argument("--ssl-cert-reqs", type=int, default=int(ssl.CERT_NONE),
                     help="client certificates: 0 not asked (default), 1 optional, 2 required (ssl.CERT_*)")
    add_grpc_tls_args(parser, "the router's channels to the pods")
    parser.add_argument("--enable-log-requests", action="store_true",
                        help="log each request's prompt, parameters and output text (off: logs never "
                             "carry prompt or output text)")
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
    api = parser.add_argument_group("OpenAI surface (vLLM's flags)")
    api.add_argument("--enable-auto-tool-choice", action="store_true",
                     help='serve tool_choice "auto" (needs --tool-call-parser)')
    api.add_argument("--tool-call-parser", choices=["hermes"], default=None,
                     help="how tool calls are read from free text under tool_choice auto (Qwen2.5: hermes)")
    api.add_argument("--enable-prompt-tokens-details", action="store_true",
                     help="report usage.prompt_tokens_details.cached_tokens")
    parser.add_argument("--poll-interval", type=float, default=0.2,
                        help="seconds between load polls of each pod, and at most how often a pod streams a "
                             "changed load (default 0.2)")
    parser.add_argument("--load-heartbeat", type=float, default=1.0,
                        help="pods stream their load on the KV-event stream at least this often (seconds) and "
                             "are not polled while they do; 0: poll GetLoad only (default 1.0)")
    parser.add_argument("--kv-event-interval", type=float, default=0.02,
                        help="pods send their prefix-cache events at most this often (seconds), merged; the "
                             "router knows its own assignments at once either way; 0: every engine step's "
                             "events at once (default 0.02)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(handler=run)


def _surface_settings(args: argparse.Namespace) -> dict[str, object]:
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    return {"tool_call_parser": args.tool_call_parser if args.enable_auto_tool_choice else None,
            "enable_prompt_tokens_details": args.enable_prompt_tokens_details}


def _http_tls(args: argparse.Namespace) -> HTTPTLS | None:
    from splitserve.http_server import HTTPTLS

    if args.ssl_keyfile is None and args.ssl_certfile is None:
        if args.ssl_ca_certs or args.ssl_cert_reqs:
            raise ValueError("--ssl-ca-certs/--ssl-cert-reqs need --ssl-keyfile and --ssl-certfile")
        return None
    if args.ssl_keyfile is None or args.ssl_certfile is None:
        raise ValueError("give both --ssl-keyfile and --ssl-certfile")
    return HTTPTLS(args.ssl_keyfile, args.ssl_certfile, args.ssl_ca_certs, args.ssl_cert_reqs)


def run(args: argparse.Namespace) -> int:
    from splitserve.router.discovery import DiscoveryConfig
    from splitserve.router.server import RouterConfig, serve

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        discovery = DiscoveryConfig(
            kind=args.discovery, prefill=args.prefill, decode=args.decode, unified=args.unified,
            file=args.discovery_file, prefill_service=args.prefill_service,
            decode_service=args.decode_service, unified_service=args.unified_service,
            namespace=args.namespace, grpc_port_name=args.grpc_port_name,
            reconcile_s=args.reconcile_seconds)
        config = RouterConfig(
            model=args.model, discovery=discovery,
            host=args.host, port=args.port, policy=args.policy, load_factor=args.load_factor,
            pd_threshold_tokens=args.pd_threshold_tokens, block_size=args.block_size,
            served_model_names=tuple(args.served_model_name or ()),
            max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens_limit,
            poll_interval_s=args.poll_interval, load_heartbeat_s=args.load_heartbeat,
            kv_event_interval_s=args.kv_event_interval, scaler_port=args.scaler_port,
            max_queued_requests=args.max_queued_requests, queue_timeout_s=args.queue_timeout_seconds,
            shutdown_grace_s=args.shutdown_grace_seconds, http_tls=_http_tls(args),
            grpc_tls=grpc_tls_from_args(args),
            settings_overrides={**_surface_settings(args), "enable_log_requests": args.enable_log_requests})
    except ValueError as exc:
        raise SystemExit(f"splitserve router: {exc}") from None
    try:
        event_loop.run(serve(config))
    except (OSError, ValueError, RuntimeError) as exc:  # bad model dir, port taken, no cluster config
        raise SystemExit(f"splitserve router: {exc}") from None
    return 0
