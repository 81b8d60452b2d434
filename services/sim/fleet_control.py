"""Client of a sim process's control API (``control_http``), for benches and
tests that run the fleet as its own process. Every call raises
``httpx.HTTPStatusError`` on a refusal (404 unknown pod, 400, 409)."""
from __future__ import annotations

import asyncio
from typing import Any

import httpx


class FleetControl:
    def __init__(self, base_url: str, timeout_s: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _get(self, path: str) -> Any:
        response = await self._client.get(path)
        response.raise_for_status()
        return response.json()

    async def _send(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        response = await self._client.request(method, path, json=body,
                                              params={k: v for k, v in params.items() if v is not None})
        response.raise_for_status()
        return response.json()

    async def pods(self) -> list[dict[str, Any]]:
        return await self._get("/pods")

    async def addresses(self, role: str, status: str = "ready") -> list[str]:
        return [p["address"] for p in await self.pods() if p["role"] == role and p["status"] == status]

    async def add_pod(self, role: str) -> dict[str, Any]:
        return await self._send("POST", "/pods", {"role": role})

    async def stop_pod(self, name: str, grace_seconds: float | None = None) -> None:
        await self._send("POST", f"/pods/{name}/stop", grace_seconds=grace_seconds)

    async def start_pod(self, name: str) -> None:
        await self._send("POST", f"/pods/{name}/start")

    async def crash_pod(self, name: str) -> None:
        await self._send("POST", f"/pods/{name}/crash")

    async def remove_pod(self, name: str, grace_seconds: float | None = None) -> None:
        await self._send("DELETE", f"/pods/{name}", grace_seconds=grace_seconds)

    async def set_slow(self, name: str, factor: float) -> None:
        await self._send("POST", f"/pods/{name}/slow", {"factor": factor})

    async def restart(self) -> None:
        await self._send("POST", "/fleet/restart")

    async def reset(self) -> None:
        await self._send("POST", "/fleet/reset")

    async def set_faults(self, **faults: Any) -> dict[str, Any]:
        return await self._send("PUT", "/fleet/faults", faults)

    async def oracle(self) -> list[dict[str, Any]]:
        return await self._get("/fleet/oracle")

    async def load(self) -> dict[str, dict[str, Any]]:
        return await self._get("/fleet/load")

    async def held(self) -> dict[str, Any]:
        return await self._get("/fleet/held")

    async def memory(self) -> dict[str, Any]:
        return await self._get("/fleet/memory")

    async def metrics(self) -> str:
        response = await self._client.get("/metrics")
        response.raise_for_status()
        return response.text

    async def wait_idle(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Until no pod holds a request, a used block or a lease; returns the
        last ``/fleet/held`` answer (check its ``idle``)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            held = await self.held()
            if held["idle"] or asyncio.get_running_loop().time() >= deadline:
                return held
            await asyncio.sleep(0.2)
