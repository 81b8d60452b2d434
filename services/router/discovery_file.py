"""``--discovery file``: the JSON pod list ``splitserve up`` rewrites.

Format (replaced atomically by its writer: write a temporary file, then
``os.replace``)::

    {"version": 1, "pods": [{"role": "prefill", "address": "127.0.0.1:50051",
                             "state": "ready"}, ...]}

``state`` ``ready`` (the default) or ``draining``; a pod absent from the file
is removed. Unknown keys are ignored.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from splitserve.router.discovery import DiscoveryFeed
from splitserve.router.membership import DiscoveredPod, Snapshot

FILE_VERSION = 1


def parse_discovery_file(text: str) -> Snapshot:
    """Parse the file's text; ``ValueError`` says what is wrong with it."""
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("the top level must be a JSON object")
    if data.get("version") != FILE_VERSION:
        raise ValueError(f"version must be {FILE_VERSION}, got {data.get('version')!r}")
    pods = data.get("pods")
    if not isinstance(pods, list):
        raise ValueError('"pods" must be a list')
    out = []
    for i, entry in enumerate(pods):
        if not isinstance(entry, dict):
            raise ValueError(f"pods[{i}] must be an object")
        role, address, state = entry.get("role"), entry.get("address"), entry.get("state", "ready")
        if not all(isinstance(v, str) for v in (role, address, state)):
            raise ValueError(f"pods[{i}]: role, address and state must be strings")
        try:
            out.append(DiscoveredPod(role, address, state))
        except ValueError as exc:
            raise ValueError(f"pods[{i}]: {exc}") from None
    return Snapshot.of(out)


class FileDiscovery:
    """Re-reads ``path`` when its (inode, size, mtime) changes, checked every
    ``poll_s``, and unconditionally every ``reconcile_s`` (a rewrite within
    the file system's timestamp granularity at the same size would otherwise
    go unseen). A missing, half-written or garbage file keeps the last good
    view; the next change is read again."""

    name = "file"

    def __init__(self, path: str, poll_s: float = 0.2, reconcile_s: float = 30.0) -> None:
        self.path = Path(path)
        self.poll_s = poll_s
        self.reconcile_s = reconcile_s

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def read_once(self, feed: DiscoveryFeed, origin: str = "watch") -> bool:
        """Read and publish the file now; False (and counted) when it is unusable."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            feed.failed(f"cannot read {self.path}: {exc.__class__.__name__}: {exc}")
            return False
        try:
            snapshot = parse_discovery_file(text)
        except ValueError as exc:
            feed.failed(f"{self.path}: {exc}")
            return False
        feed.publish(snapshot, origin)
        return True

    async def run(self, feed: DiscoveryFeed) -> None:
        seen: tuple[int, int, int] | None | str = "unread"
        last_reconcile = time.monotonic()
        while True:
            signature = self._signature()
            now = time.monotonic()
            if signature != seen:
                seen = signature
                if signature is None:
                    feed.failed(f"{self.path} does not exist")
                else:
                    self.read_once(feed)
            elif now - last_reconcile >= self.reconcile_s:
                last_reconcile = now
                if signature is not None:
                    self.read_once(feed, origin="reconcile")
            await asyncio.sleep(self.poll_s)
