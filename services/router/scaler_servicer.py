"""KEDA's ``externalscaler.ExternalScaler`` gRPC service on ``--scaler-port``:
thin over ``ScalerCore`` (convert, delegate; bad metadata -> INVALID_ARGUMENT)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from splitserve.proto import externalscaler_pb2 as pb
from splitserve.proto import externalscaler_pb2_grpc as pb_grpc
from splitserve.router.scaler_core import PoolQuery, ScalerCore

logger = logging.getLogger(__name__)


class ExternalScalerServicer(pb_grpc.ExternalScalerServicer):
    """Each RPC validates the ``ScaledObjectRef`` and asks the core."""

    def __init__(self, core: ScalerCore) -> None:
        self.core = core

    async def _query(self, ref: pb.ScaledObjectRef, context: grpc.aio.ServicerContext) -> PoolQuery:
        try:
            return self.core.query(dict(ref.scalerMetadata))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"ScaledObject {ref.namespace}/{ref.name}: {exc}")
            raise  # abort raises; this keeps type checkers informed

    async def IsActive(self, request: pb.ScaledObjectRef,
                       context: grpc.aio.ServicerContext) -> pb.IsActiveResponse:
        query = await self._query(request, context)
        return pb.IsActiveResponse(result=self.core.is_active(query.pool))

    async def StreamIsActive(self, request: pb.ScaledObjectRef,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.IsActiveResponse]:
        query = await self._query(request, context)
        async for push in self.core.activity(query.pool):
            if push.arrival is not None and push.pushed is not None:
                # bench/scaling.py reads this line: push latency from the request's arrival.
                logger.info("scaler push: pool=%s active=true latency_ms=%.3f wall=%.6f",
                            query.pool, (push.pushed - push.arrival) * 1e3, time.time())
            yield pb.IsActiveResponse(result=push.active)

    def _specs(self, query: PoolQuery) -> pb.GetMetricSpecResponse:
        return pb.GetMetricSpecResponse(metricSpecs=[pb.MetricSpec(
            metricName=query.metric_name, targetSize=max(1, round(query.target)),
            targetSizeFloat=query.target)])

    async def GetMetricSpec(self, request: pb.ScaledObjectRef,
                            context: grpc.aio.ServicerContext) -> pb.GetMetricSpecResponse:
        return self._specs(await self._query(request, context))

    async def StreamMetricSpec(self, request: pb.ScaledObjectRef,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GetMetricSpecResponse]:
        yield self._specs(await self._query(request, context))
        await asyncio.Event().wait()  # the specs never change: hold the stream until KEDA ends it

    async def GetMetrics(self, request: pb.GetMetricsRequest,
                         context: grpc.aio.ServicerContext) -> pb.GetMetricsResponse:
        query = await self._query(request.scaledObjectRef, context)
        if request.metricName and request.metricName != query.metric_name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"metric {request.metricName!r} is not {query.metric_name!r} "
                                f"(scalerMetadata.pool {query.pool})")
        value = self.core.metric_value(query.pool)
        return pb.GetMetricsResponse(metricValues=[pb.MetricValue(
            metricName=query.metric_name, metricValue=round(value), metricValueFloat=value)])


class ScalerServer:
    """The grpc.aio server for ``ExternalScalerServicer`` on ``host:port``
    (``host``: one address or a comma-separated list; port 0 picks a free
    one; ``port`` then holds it after ``start``)."""

    def __init__(self, core: ScalerCore, host: str, port: int) -> None:
        self.core = core
        self.host = host
        self.port = port
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server()
        pb_grpc.add_ExternalScalerServicer_to_server(ExternalScalerServicer(self.core), server)
        for host in (h.strip() for h in self.host.split(",") if h.strip()):
            bound = server.add_insecure_port(f"{host}:{self.port}")
            if bound == 0:
                raise OSError(f"cannot bind the scaler's gRPC port {host}:{self.port}")
            self.port = bound  # the next host binds the same port
        await server.start()
        self._server = server

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
