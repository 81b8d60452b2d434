"""The router process: tokenizer, settings, PodRouter, orchestrator, pod
watcher and the OpenAI app, served by an embedded uvicorn until asked to stop."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from splitserve.http_server import EmbeddedHTTPServer
from splitserve.router.app import create_app
from splitserve.router.metrics import RouterMetrics
from splitserve.router.orchestrator import Orchestrator, OrchestratorConfig
from splitserve.router.pd_client import PodClient
from splitserve.router.pod_state import PodPool
from splitserve.router.pod_watcher import PodWatcher, WatcherConfig
from splitserve.router.policies import DecodePolicy, make_policy
from splitserve.router.routing import PodRouter
from splitserve.router.serving import OpenAIServing
from splitserve.router.settings import settings_from_env

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    """Everything ``splitserve router`` takes. Either ``prefill`` and
    ``decode`` (host:port lists) or ``unified``. ``served_model_names``
    default to ``(model,)`` as in vLLM; ``max_prompt_tokens`` to the model's
    ``max_position_embeddings``. ``block_size`` must equal the pods'."""

    model: str
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    unified: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "kv_affinity"
    load_factor: float = 1.25
    pd_threshold_tokens: int = 64
    block_size: int = 16
    served_model_names: tuple[str, ...] = ()
    max_prompt_tokens: int | None = None
    max_tokens_limit: int | None = None
    poll_interval_s: float = 0.2
    settings_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.unified and (self.prefill or self.decode):
            raise ValueError("give either --unified or --prefill and --decode, not both")
        if not self.unified and not (self.prefill and self.decode):
            raise ValueError("need at least one --prefill and one --decode address, or --unified addresses")
        pods = self.prefill + self.decode + self.unified
        if len(set(pods)) != len(pods):
            raise ValueError(f"a pod address is listed twice: {', '.join(pods)}")
        for address in pods:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"pod address {address!r} is not HOST:PORT")


@dataclass
class RouterParts:
    """The built router, not yet serving (tests drive ``app`` directly)."""

    app: FastAPI
    serving: OpenAIServing
    orchestrator: Orchestrator
    watcher: PodWatcher
    metrics: RouterMetrics


def build_router(config: RouterConfig, tokenizer: Any = None) -> RouterParts:
    """Load the tokenizer (unless given) and wire everything; no I/O besides
    reading the model folder, no tasks started."""
    from splitserve.engine.tokenizer import eos_token_ids, load_tokenizer

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    overrides: dict[str, Any] = {
        "served_model_names": config.served_model_names or (config.model,),
        "block_size": config.block_size,
        "max_prompt_tokens": config.max_prompt_tokens or _max_positions(config.model) or 32768,
    }
    if config.max_tokens_limit is not None:
        overrides["max_tokens_limit"] = config.max_tokens_limit
    settings = settings_from_env(**{**overrides, **config.settings_overrides})
    metrics = RouterMetrics()
    if config.unified:
        prefill_ids, decode_ids = list(config.unified), []
    else:
        prefill_ids, decode_ids = list(config.prefill), list(config.decode)
    router = PodRouter(make_policy(config.policy, config.block_size, config.load_factor),
                       DecodePolicy(config.block_size, config.load_factor),
                       PodPool(prefill_ids), PodPool(decode_ids), metrics)
    clients = {address: PodClient(address) for address in prefill_ids + decode_ids}
    orchestrator = Orchestrator(router, clients, OrchestratorConfig(
        block_size=config.block_size, unified=bool(config.unified),
        pd_threshold_tokens=config.pd_threshold_tokens,
        eos_token_ids=eos_token_ids(config.model, tokenizer)), metrics)
    roles = {**{a: "prefill" for a in prefill_ids}, **{a: "decode" for a in decode_ids}}
    watcher = PodWatcher(router, clients, roles, WatcherConfig(poll_interval_s=config.poll_interval_s))
    serving = OpenAIServing(orchestrator, tokenizer, settings, metrics)
    app = create_app(serving, settings, ready=watcher.ready)
    return RouterParts(app, serving, orchestrator, watcher, metrics)


def _max_positions(model: str) -> int | None:
    path = Path(model) / "config.json"
    if not path.exists():
        return None
    value = json.loads(path.read_text()).get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 1 else None


async def serve(config: RouterConfig, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set or SIGINT/SIGTERM arrives, then stop
    accepting, let uvicorn finish open responses, and close pod channels."""
    parts = build_router(config)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    parts.watcher.start()
    http = EmbeddedHTTPServer(parts.app, config.host, config.port)
    await http.start()
    mode = (f"unified {','.join(config.unified)}" if config.unified
            else f"prefill {','.join(config.prefill)} / decode {','.join(config.decode)}")
    logger.info("router on http://%s:%d/v1 (%s, policy %s)", config.host, config.port, mode, config.policy)
    try:
        await stop.wait()
        logger.info("stopping: draining open requests")
    finally:
        await http.stop()
        await parts.watcher.stop()
        await parts.orchestrator.aclose()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
