"""``splitserve up``: the one-command local cluster."""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_TINY_MODEL_DIR = Path.home() / ".cache" / "splitserve" / "tiny-llama"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "up",
        help="run router + prefill + decode pods locally",
        description=(
            "Start a router and prefill/decode (or unified) pods as local processes, print the "
            "OpenAI base URL, and stop everything on Ctrl-C. Each pool is kept at its size like a "
            "Kubernetes Deployment: a pod that dies is replaced (with back-off) while the router "
            "routes around it; `splitserve scale`, `splitserve rollout restart` and `splitserve "
            "status` change and show the pools while it runs. Extra flags for the pods go after "
            "`--`, e.g. `splitserve up -- --max-num-seqs 64 --shutdown-grace-seconds 5`."
        ),
    )
    parser.add_argument("--model", default=None,
                        help="Hugging Face model folder; default: the built-in tiny model")
    parser.add_argument("--prefill", type=int, default=1, help="number of prefill pods (may be 0)")
    parser.add_argument("--decode", type=int, default=1, help="number of decode pods (may be 0)")
    parser.add_argument("--unified", type=int, default=0,
                        help="run K unified pods instead (the colocated baseline)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="router (OpenAI API) port")
    parser.add_argument("--policy", default=None, help="router policy (default kv_affinity)")
    parser.add_argument("--router-arg", action="append", default=[], metavar="FLAG",
                        help="pass one flag to the router, e.g. --router-arg=--max-queued-requests=8 "
                             "(repeatable)")
    parser.add_argument("--log-dir", type=Path, default=None)
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where pods.json and control.json live (default: one folder per --port "
                             "under the temp dir; `splitserve scale --port` finds it)")
    parser.add_argument("--discovery", choices=["file", "static"], default="file",
                        help="how the router follows the pods: file (pods.json; pools scale, roll and "
                             "heal; default) or static (a fixed address list)")
    parser.add_argument("--drain-notice", type=float, default=0.5,
                        help="seconds a leaving pod is listed draining (the router stops routing to it) "
                             "before it gets SIGTERM, like a preStop sleep (default 0.5)")
    parser.add_argument("--termination-grace", type=float, default=120.0,
                        help="seconds a draining pod may take after SIGTERM before SIGKILL (default 120)")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("pod_args", nargs=argparse.REMAINDER,
                        help="after `--`: flags passed to every pod (engine knobs)")
    parser.set_defaults(handler=run)


def resolve_model(model: str | None) -> str:
    """The given folder, or the built-in tiny model (written on first use)."""
    if model is not None:
        if not Path(model).is_dir():
            raise SystemExit(f"--model {model}: not a folder (expected a Hugging Face model folder)")
        return model
    from splitserve.engine.tiny_model import write_tiny_model

    if not (DEFAULT_TINY_MODEL_DIR / "config.json").exists():
        write_tiny_model(DEFAULT_TINY_MODEL_DIR)
    return str(DEFAULT_TINY_MODEL_DIR)


def run(args: argparse.Namespace) -> int:
    from splitserve.local.launcher import LocalCluster, LocalClusterConfig, run_until_interrupted

    pod_args = [a for a in args.pod_args if a != "--"]
    try:
        config = LocalClusterConfig(
            model=resolve_model(args.model),
            num_prefill=args.prefill,
            num_decode=args.decode,
            num_unified=args.unified,
            host=args.host,
            port=args.port,
            policy=args.policy,
            engine_args=pod_args,
            router_args=list(args.router_arg),
            log_dir=args.log_dir,
            state_dir=args.state_dir,
            discovery=args.discovery,
            drain_notice_seconds=args.drain_notice,
            termination_grace_seconds=args.termination_grace,
            ready_timeout_seconds=args.ready_timeout,
        )
    except ValueError as exc:
        raise SystemExit(f"splitserve up: {exc}") from None
    return run_until_interrupted(LocalCluster(config))
