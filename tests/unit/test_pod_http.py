from __future__ import annotations

import asyncio

import httpx
from prometheus_client import CollectorRegistry, Counter

from splitserve.http_server import EmbeddedHTTPServer
from splitserve.local.launcher import free_port
from splitserve.pod.http import create_pod_http_app


def test_health_live_and_metrics_over_a_real_socket() -> None:
    registry = CollectorRegistry()
    Counter("splitserve:test_things", "things", registry=registry).inc(3)
    state = {"status": "starting"}
    app = create_pod_http_app(lambda: state["status"], registry)

    async def scenario() -> None:
        port = free_port()
        server = EmbeddedHTTPServer(app, "127.0.0.1", port)
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                assert (await client.get("/health")).status_code == 503
                assert (await client.get("/live")).status_code == 200
                state["status"] = "ok"
                response = await client.get("/health")
                assert response.status_code == 200 and response.json() == {"status": "ok"}
                metrics = (await client.get("/metrics")).text
                assert "splitserve:test_things_total 3.0" in metrics
                state["status"] = "draining"  # readiness fails, liveness does not
                assert (await client.get("/health")).status_code == 503
                live = await client.get("/live")
                assert live.status_code == 200 and live.json() == {"status": "draining"}
        finally:
            await server.stop()
        # The port is free again: the server really stopped.
        again = EmbeddedHTTPServer(app, "127.0.0.1", port)
        await again.start()
        await again.stop()

    asyncio.run(scenario())
