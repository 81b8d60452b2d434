"""A pod's HTTP side: ``/health`` for probes and ``/metrics`` for Prometheus."""
from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def create_pod_http_app(health: Callable[[], str], registry: CollectorRegistry) -> FastAPI:
    """``health()`` returns "ok" when serving, anything else (e.g. "starting",
    "draining") answers 503 so readiness probes take the pod out of rotation."""
    app = FastAPI(title="splitserve pod", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    def get_health() -> JSONResponse:
        status = health()
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    def get_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
