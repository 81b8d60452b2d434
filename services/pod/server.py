"""One engine pod process: engine + KV transport + gRPC + HTTP, and its
lifetime (ready only once serving; graceful drain on SIGTERM/SIGINT)."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import grpc

from splitserve import event_loop
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.engine_args import EngineArgs
from splitserve.grpc_limits import MAX_MESSAGE_BYTES
from splitserve.grpc_tls import add_port
from splitserve.http_server import EmbeddedHTTPServer
from splitserve.pod.model_fingerprint import model_fingerprint
from splitserve.pod.config import PodConfig
from splitserve.pod.core import PodCore
from splitserve.pod.kv_event_hub import KVEventHub
from splitserve.startup_heap import freeze_startup_heap
from splitserve.pod.http import create_pod_http_app
from splitserve.pod.messages import Role
from splitserve.pod.servicer import PodServicer
from splitserve.proto import splitserve_v1_pb2_grpc as pb_grpc

logger = logging.getLogger("splitserve.pod")


class PodServer:
    """``run()`` serves until SIGTERM/SIGINT (or ``request_stop``), then
    drains by role (``PodCore.drain``): /health says "draining" at once (503,
    /live stays 200), new Prefill/Decode get UNAVAILABLE, running calls get
    ``shutdown_grace_seconds`` and the rest end with UNAVAILABLE; a prefill pod
    keeps serving the leases it granted until released or expired. Then the
    gRPC server stops, the engine thread stops, NIXL is closed; exit code 0."""

    def __init__(self, config: PodConfig, engine_args: EngineArgs) -> None:
        self.config = config
        self.engine_args = engine_args
        self.status = "starting"
        self._stop = asyncio.Event()
        self.core: PodCore | None = None

    def request_stop(self) -> None:
        self._stop.set()

    def health(self) -> str:
        return self.status

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        core = self.core = await asyncio.to_thread(self._build_core)
        await core.start()
        # Accept the router's keepalive pings (pd_client: every 5 s, with or without calls),
        # and its messages up to its own limit (a long prompt's Decode; 4 MiB by default).
        server = grpc.aio.server(options=[("grpc.keepalive_permit_without_calls", 1),
                                          ("grpc.http2.min_recv_ping_interval_without_data_ms", 4_000),
                                          ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                          ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        pb_grpc.add_EngineServicer_to_server(PodServicer(core), server)
        bound = add_port(server, f"{self.config.host}:{self.config.port}", self.config.grpc_tls)
        if bound == 0:
            raise OSError(f"cannot bind gRPC on {self.config.host}:{self.config.port}")
        await server.start()
        http = EmbeddedHTTPServer(create_pod_http_app(self.health, core.metrics.registry),
                                  self.config.host, self.config.http_port)
        await http.start()
        stats = core.engine.stats()
        freeze_startup_heap()
        logger.info("%s pod serving gRPC%s %s:%d, HTTP %d; %d KV blocks of %d tokens; incarnation %s",
                    self.config.role.value, _tls_note(self.config), self.config.host, self.config.port,
                    self.config.http_port,
                    stats.scheduler.num_total_blocks, stats.block_size, core.incarnation_id)
        self.status = "ok"
        await self._stop.wait()
        self.status = "draining"
        logger.info("draining (grace %.1fs)", self.config.shutdown_grace_seconds)
        await core.drain(self.config.shutdown_grace_seconds)
        await server.stop(1.0)
        await core.close()
        await http.stop()
        logger.info("stopped")
        return 0

    def _build_core(self) -> PodCore:
        kv_events = KVEventHub()
        engine = AsyncEngine.from_engine_args(self.engine_args, after_step=[kv_events.after_step])
        transport = None
        client = None
        if self.config.role is not Role.UNIFIED:
            from splitserve.kvtransfer.fault_hook import TransferFaults
            from splitserve.kvtransfer.nixl_transport import NixlTransport

            faults = TransferFaults.from_env(os.environ)
            if faults is not None:
                logger.warning("TEST FAULT HOOK ON: KV READs are failed or stalled (%s)", faults)
            kv_cache = engine.core.runner.kv_cache  # type: ignore[attr-defined]
            dtype = str(kv_cache.dtype).removeprefix("torch.")
            transport = NixlTransport(
                self.config.transfer_agent_name, kv_cache,
                model_fingerprint=model_fingerprint(self.engine_args.model, dtype),
                ucx_tls=self.config.ucx_tls, default_timeout_s=self.config.kv_transfer_timeout_s,
                progress_thread=self.config.nixl_progress_thread, faults=faults)
        if self.config.role is Role.DECODE:
            from splitserve.decode.peer_client import GrpcPeerClient

            client = GrpcPeerClient(tls=self.config.grpc_tls)
        return PodCore(self.config, engine, transport, client, kv_events)


def _tls_note(config: PodConfig) -> str:
    tls = config.grpc_tls
    if tls is None:
        return ""
    return " (mutual TLS)" if tls.ca_certs else " (TLS)"


def serve(config: PodConfig, engine_args: EngineArgs) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return event_loop.run(PodServer(config, engine_args).run())
