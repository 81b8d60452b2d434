"""The sim process: a ``SimFleet`` plus its HTTP port, until SIGTERM/SIGINT,
then every pod drains as a real pod would (``--shutdown-grace-seconds``)."""
from __future__ import annotations

import asyncio
import logging
import resource
import signal
import sys

from splitserve import event_loop
from splitserve.http_server import EmbeddedHTTPServer
from splitserve.sim.config import SimConfig
from splitserve.sim.control_http import create_control_app
from splitserve.sim.memory import process_rss_bytes
from splitserve.sim.sim_fleet import SimFleet, role_counts
from splitserve.startup_heap import freeze_startup_heap

logger = logging.getLogger("splitserve.sim")


def raise_fd_limit() -> None:
    """Hundreds of pods and their peers' connections need more than the
    usual 1024 descriptors: take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))


async def run_fleet(config: SimConfig, stop: asyncio.Event | None = None) -> int:
    raise_fd_limit()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    state = {"status": "starting"}
    fleet = SimFleet(config)
    http = None
    if config.http_port:
        http = EmbeddedHTTPServer(create_control_app(fleet, lambda: state["status"]), config.host, config.http_port)
        await http.start()
    rss_before = process_rss_bytes()
    try:
        await fleet.start()
        pods = list(fleet.pods.values())
        per_pod = (process_rss_bytes() - rss_before) / max(len(pods), 1)
        freeze_startup_heap()
        logger.info("sim fleet serving %s on gRPC ports %d-%d, HTTP %s; %d KV blocks of %d tokens per pod; "
                    "~%.2f MiB RSS per pod", role_counts(pods), pods[0].port, pods[-1].port,
                    config.http_port or "off", config.num_blocks, config.block_size, per_pod / 2**20)
        state["status"] = "ok"
        await stop.wait()
        state["status"] = "draining"
        logger.info("draining %d pods (grace %.1fs)", len(fleet.pods), config.shutdown_grace_seconds)
    finally:
        await fleet.close(config.shutdown_grace_seconds if state["status"] == "draining" else 0.0)
        if http is not None:
            await http.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    logger.info("stopped")
    return 0


def serve_fleet(config: SimConfig) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return event_loop.run(run_fleet(config))
