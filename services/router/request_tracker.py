"""The router's open HTTP requests, so that shutdown can wait for them and
cut what is left after the grace period."""
from __future__ import annotations

import asyncio
import time
from typing import Any


class RequestTracker:
    """ASGI middleware in front of the app: every HTTP request runs as a task
    it knows. ``wait_idle`` waits for them; ``cut`` cancels the rest (their
    generators abort the pods' work; the client sees its connection end).
    Call from the server's event loop."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._tasks: set[asyncio.Task[None]] = set()
        self._cutting = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        task = asyncio.ensure_future(self.app(scope, receive, send))
        self._tasks.add(task)
        try:
            await task
        except asyncio.CancelledError:
            if not (self._cutting and task.cancelled()):
                raise  # our own caller was cancelled
        finally:
            self._tasks.discard(task)

    @property
    def open(self) -> int:
        return len(self._tasks)

    async def wait_idle(self, timeout_s: float, poll_s: float = 0.05) -> bool:
        """True once no request is open, False when ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        while self._tasks:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    async def cut(self) -> int:
        """Cancel the open requests; return how many were cut."""
        self._cutting = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)
