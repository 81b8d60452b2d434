"""The sim process's one HTTP port: every pod's health and metrics, and the
fleet's control API for benches and tests (a test double's control plane:
never part of a real pod).

    GET  /health                      200 while the fleet serves (503 starting/stopping)
    GET  /live                        200 whenever this server runs
    GET  /metrics                     every pod's metrics, each sample labelled pod="<name>"
    GET  /pods                        the pods: name, role, address, status, incarnation, calls
    POST /pods {"role": R}            add a pod (next index and port); its description
    GET  /pods/{name}/health          that pod's readiness (200 ready / 503 otherwise)
    GET  /pods/{name}/metrics         that pod's metrics, as a real pod's /metrics
    POST /pods/{name}/stop?grace_seconds=G   drain (as on SIGTERM) and stop; returns when stopped
    POST /pods/{name}/start           start a stopped pod (a new incarnation, cold cache)
    POST /pods/{name}/crash           stop at once, no drain
    DELETE /pods/{name}?grace_seconds=G      drain, stop and forget the pod
    POST /pods/{name}/slow {"factor": F}     make a pod F times slower (1 = normal)
    POST /fleet/restart               restart every pod (cold caches) and reset observations
    POST /fleet/reset                 reset observations (oracle records, load samples, call counts)
    GET|PUT /fleet/faults             the fault settings (``FaultConfig`` fields)
    GET  /fleet/oracle                the prefix oracle's records (``prefix_oracle``)
    GET  /fleet/load                  per pod: role, time-averaged running / in-flight sequences
    GET  /fleet/held                  per pod: requests, blocks and leases held; "idle" when all are 0
    GET  /fleet/memory                RSS of this process and per pod

Routes only convert and call ``SimFleet``; unknown pods answer 404, bad
values 400, a pod in the wrong state 409.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from splitserve.pod.messages import Role
from splitserve.sim.faults import FaultConfig
from splitserve.sim.memory import process_rss_bytes
from splitserve.sim.sim_fleet import SimFleet, UnknownPodError


class _FleetCollector(Collector):
    """Every pod registry's samples with a ``pod`` label added."""

    def __init__(self, fleet: SimFleet) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for pod in list(self._fleet.pods.values()):
            if pod.core is None:
                continue
            for family in pod.core.metrics.registry.collect():
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for s in family.samples:
                    out.add_sample(s.name, {**s.labels, "pod": pod.name}, s.value, s.timestamp, s.exemplar)
        yield from merged.values()


def create_control_app(fleet: SimFleet, status: Callable[[], str]) -> FastAPI:
    app = FastAPI(title="splitserve sim fleet", docs_url=None, redoc_url=None, openapi_url=None)
    registry = CollectorRegistry()
    registry.register(_FleetCollector(fleet))

    @app.exception_handler(UnknownPodError)
    async def unknown_pod(_request: Request, exc: UnknownPodError) -> JSONResponse:
        return JSONResponse({"error": str(exc.args[0])}, status_code=404)

    @app.exception_handler(ValueError)
    async def bad_value(_request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(RuntimeError)
    async def wrong_state(_request: Request, exc: RuntimeError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=409)

    @app.get("/health")
    def health() -> JSONResponse:
        state = status()
        counts: dict[str, int] = {}
        for pod in fleet.pods.values():
            counts[pod.status.value] = counts.get(pod.status.value, 0) + 1
        return JSONResponse({"status": state, "pods": counts}, status_code=200 if state == "ok" else 503)

    @app.get("/live")
    def live() -> JSONResponse:
        return JSONResponse({"status": status()})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/pods")
    def pods() -> list[dict[str, Any]]:
        return fleet.describe()

    @app.post("/pods")
    async def add_pod(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        pod = await fleet.add_pod(Role(str(body.get("role", ""))))
        return next(d for d in fleet.describe() if d["name"] == pod.name)

    @app.get("/pods/{name}/health")
    def pod_health(name: str) -> JSONResponse:
        pod = fleet.pod(name)
        return JSONResponse({"status": pod.status.value}, status_code=200 if pod.serving else 503)

    @app.get("/pods/{name}/metrics")
    def pod_metrics(name: str) -> Response:
        pod = fleet.pod(name)
        if pod.core is None:
            return Response("pod is stopped\n", status_code=503)
        return Response(generate_latest(pod.core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/pods/{name}/stop")
    async def stop_pod(name: str, grace_seconds: float | None = None) -> dict[str, str]:
        await fleet.stop_pod(name, grace_seconds)
        return {"status": fleet.pod(name).status.value}

    @app.post("/pods/{name}/start")
    async def start_pod(name: str) -> dict[str, str]:
        await fleet.start_pod(name)
        return {"status": fleet.pod(name).status.value, "incarnation_id": fleet.pod(name).incarnation_id()}

    @app.post("/pods/{name}/crash")
    async def crash_pod(name: str) -> dict[str, str]:
        await fleet.crash_pod(name)
        return {"status": fleet.pod(name).status.value}

    @app.delete("/pods/{name}")
    async def remove_pod(name: str, grace_seconds: float | None = None) -> dict[str, str]:
        await fleet.remove_pod(name, grace_seconds)
        return {"removed": name}

    @app.post("/pods/{name}/slow")
    def slow_pod(name: str, body: dict[str, Any] = Body(...)) -> dict[str, float]:
        fleet.set_slow(name, float(body.get("factor", 1.0)))
        return {"slow_factor": fleet.pod(name).latency.slow_factor}

    @app.post("/fleet/restart")
    async def restart() -> dict[str, int]:
        await fleet.restart_all()
        return {"pods": len(fleet.pods)}

    @app.post("/fleet/reset")
    def reset() -> dict[str, bool]:
        fleet.reset_observations()
        return {"reset": True}

    @app.get("/fleet/faults")
    def get_faults() -> dict[str, Any]:
        return fleet.faults.to_dict()

    @app.put("/fleet/faults")
    def put_faults(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        fleet.set_faults(FaultConfig.from_dict(body))
        return fleet.faults.to_dict()

    @app.get("/fleet/oracle")
    def oracle() -> list[dict[str, object]]:
        return [r.to_dict() for r in fleet.oracle.records()]

    @app.get("/fleet/load")
    def load() -> dict[str, dict[str, Any]]:
        roles = {p.name: p.role.value for p in fleet.pods.values()}
        return {name: {"role": roles.get(name, ""), **avg} for name, avg in fleet.sampler.report().items()}

    @app.get("/fleet/held")
    def held() -> dict[str, Any]:
        report = fleet.held_report()
        return {"idle": all(not any(s.values()) for s in report.values()), "pods": report}

    @app.get("/fleet/memory")
    def memory() -> dict[str, Any]:
        rss = process_rss_bytes()
        return {"rss_bytes": rss, "pods": len(fleet.pods), "serving": len(fleet.serving_pods())}

    return app
