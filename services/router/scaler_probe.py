"""Measure the scaler's activation push from outside, as KEDA sees it: open
``StreamIsActive`` for a pool with no ready pod, send one request to the
router, time the ``true`` that comes back. For bench/scaling.py and tests.

The router also logs each push (``scaler push: pool=... latency_ms=...
wall=<unix time>``), measured from the request's arrival to the push.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import grpc
import httpx

from splitserve.proto import externalscaler_pb2 as pb
from splitserve.proto import externalscaler_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class PushTiming:
    """``latency_s``: request sent -> ``true`` received (monotonic clock).
    ``status_code``: the HTTP answer, once it came (None: still running when
    the probe stopped waiting)."""

    latency_s: float
    sent_at: float
    received_at: float
    status_code: int | None


async def measure_push_latency(scaler_address: str, router_url: str, pool: str,
                               body: dict[str, Any], path: str = "/v1/completions",
                               headers: dict[str, str] | None = None, timeout_s: float = 30.0,
                               wait_for_response: bool = False) -> PushTiming:
    """Push latency for one request; ``scaler_address`` is ``host:port``.
    Raises ``TimeoutError`` if no ``true`` arrives within ``timeout_s``.
    Without ``wait_for_response`` the request is abandoned once the push
    arrived (it was only the trigger); with it, its status is reported."""
    ref = pb.ScaledObjectRef(name="probe", namespace="bench", scalerMetadata={"pool": pool})
    async with grpc.aio.insecure_channel(scaler_address) as channel, \
            httpx.AsyncClient(base_url=router_url, timeout=timeout_s) as client:
        stream = pb_grpc.ExternalScalerStub(channel).StreamIsActive(ref)
        first = await asyncio.wait_for(stream.read(), timeout_s)  # the current state
        if first is grpc.aio.EOF:
            raise RuntimeError("StreamIsActive ended before its first message")
        sent = time.monotonic()
        request = asyncio.create_task(client.post(path, json=body, headers=headers))
        try:
            while True:
                message = await asyncio.wait_for(stream.read(), timeout_s - (time.monotonic() - sent))
                if message is grpc.aio.EOF:
                    raise RuntimeError("StreamIsActive ended before pushing true")
                if message.result:
                    received = time.monotonic()
                    break
            status = None
            if wait_for_response:
                status = (await request).status_code
            return PushTiming(received - sent, sent, received, status)
        finally:
            stream.cancel()
            if not request.done():
                request.cancel()
                await asyncio.gather(request, return_exceptions=True)
