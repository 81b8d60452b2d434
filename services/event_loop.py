"""The event loop every long-running splitserve process (router, pods, sim
fleets) runs on.

uvloop (libuv) when it is installed and not switched off with
``SPLITSERVE_EVENT_LOOP=asyncio``: on the router's per-request path (HTTP
parse, SSE writes, gRPC callbacks) it takes about a fifth of the CPU off a
request. grpc.aio runs on it unchanged."""
from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "SPLITSERVE_EVENT_LOOP"
CHOICES = ("auto", "uvloop", "asyncio")


def loop_kind() -> str:
    """``uvloop`` or ``asyncio``: what ``run`` will use here."""
    wanted = os.environ.get(ENV, "auto")
    if wanted not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}, not {wanted!r}")
    if wanted == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if wanted == "uvloop":
            raise ValueError(f"{ENV}=uvloop but uvloop is not installed") from None
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop ``loop_kind`` names."""
    if loop_kind() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
