"""The ``ServicerContext`` one request of a shared stream runs with.

A Prefill handler ends a refused request with ``context.abort(code,
details)``, which on its own call sends that status. On ``PrefillStream``
many requests share one call, so one request's refusal must not end the
others: here ``abort`` raises ``StartAborted`` with the status instead, and
the stream answers that request alone with it. Everything else is the
stream's own context (peer, metadata, deadline).
"""
from __future__ import annotations

from typing import Any, NoReturn

import grpc


class StartAborted(Exception):
    """What ``abort`` was called with, for the stream to answer."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class StartContext:
    """Wraps the stream's ``context``; ``abort`` raises ``StartAborted``."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        raise StartAborted(code, details)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)
