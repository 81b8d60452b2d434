"""The router's gRPC channels to its pods, opened and closed as pods join and
leave, each kept open while a request still uses it."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from splitserve.router.pd_client import PodClient

logger = logging.getLogger(__name__)


class PodChannels(Mapping[str, PodClient]):
    """address -> ``PodClient`` of the pods the router currently knows.

    ``open`` when a pod joins; ``retire`` when it leaves: it disappears from
    the mapping at once (no new request finds it) and its channel closes once
    the last ``hold`` on it ends, so a running stream or lease finishes on the
    old channel. A pod re-joining under the same address gets a new channel.
    Call from the event loop.
    """

    def __init__(self, factory: Callable[[str], PodClient] = PodClient) -> None:
        self._factory = factory
        self._live: dict[str, PodClient] = {}
        self._holds: dict[int, int] = {}
        self._retiring: dict[int, PodClient] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def __getitem__(self, address: str) -> PodClient:
        return self._live[address]

    def __iter__(self) -> Iterator[str]:
        return iter(self._live)

    def __len__(self) -> int:
        return len(self._live)

    def open(self, address: str) -> PodClient:
        client = self._live.get(address)
        if client is None:
            client = self._live[address] = self._factory(address)
        return client

    def retire(self, address: str) -> None:
        client = self._live.pop(address, None)
        if client is None:
            return
        if self._holds.get(id(client), 0):
            self._retiring[id(client)] = client
            logger.info("pod %s left; its channel closes when its running requests end", address)
        else:
            self._close_later(client)

    @contextmanager
    def hold(self, address: str) -> Iterator[PodClient]:
        """The pod's client, kept open until the block ends. ``KeyError`` when
        the pod is not (or no longer) known."""
        client = self._live[address]
        key = id(client)
        self._holds[key] = self._holds.get(key, 0) + 1
        try:
            yield client
        finally:
            left = self._holds[key] - 1
            if left:
                self._holds[key] = left
            else:
                del self._holds[key]
                retired = self._retiring.pop(key, None)
                if retired is not None:
                    self._close_later(retired)

    def num_held(self, address: str) -> int:
        client = self._live.get(address)
        return self._holds.get(id(client), 0) if client is not None else 0

    @property
    def num_retiring(self) -> int:
        """Channels of departed pods still open for their running requests."""
        return len(self._retiring)

    def _close_later(self, client: PodClient) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (tests building parts only): nothing was ever connected
        task = loop.create_task(client.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Close every channel, held or not (the router is stopping)."""
        clients = list(self._live.values()) + list(self._retiring.values())
        self._live.clear()
        self._retiring.clear()
        await asyncio.gather(*(c.close() for c in clients), *self._closing, return_exceptions=True)
