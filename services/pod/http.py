"""A pod's HTTP side: ``/health`` (readiness), ``/live`` (liveness) and
``/metrics`` for Prometheus."""
from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def create_pod_http_app(health: Callable[[], str], registry: CollectorRegistry) -> FastAPI:
    """``health()`` returns "ok" when serving, anything else (e.g. "starting",
    "draining") answers 503 on ``/health`` so readiness probes take the pod
    out of rotation. ``/live`` answers 200 whenever this server runs, also
    while draining, so a liveness probe never kills a pod that is finishing
    its streams and leases."""
    app = FastAPI(title="splitserve pod", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    def get_health() -> JSONResponse:
        status = health()
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)

    @app.get("/live")
    def get_live() -> JSONResponse:
        return JSONResponse({"status": health()}, status_code=200)

    @app.get("/metrics")
    def get_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
