"""Client of a running ``splitserve up``'s control endpoint, used by
``splitserve scale``, ``rollout`` and ``status``: finds the up (``--control
URL``, or ``control.json`` in the state dir of the up's ``--port``), sends
the request, waits for a pool to converge, prints pools and pods."""
from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from splitserve.local.state_dir import ControlInfo, default_state_dir


class ControlClientError(RuntimeError):
    """No up to talk to, or it refused the request (the message says why)."""


def add_control_args(parser: argparse.ArgumentParser) -> None:
    """The flags every control command shares."""
    parser.add_argument("--port", type=int, default=8000,
                        help="the router port of the `splitserve up` to control (default 8000)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="the up's state folder (default: the one of --port)")
    parser.add_argument("--control", default=None, metavar="URL",
                        help="the up's control endpoint URL (overrides --port/--state-dir)")


class ControlClient:
    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ControlClient:
        if args.control:
            return cls(args.control)
        state_dir = args.state_dir or default_state_dir(args.port)
        info = ControlInfo.read(state_dir)
        if info is None:
            raise ControlClientError(f"no running `splitserve up` on port {args.port} (nothing live in "
                                     f"{state_dir}); start one, or pass --port, --state-dir or --control")
        return cls(info.url)

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/v1/status")

    def scale(self, replicas: dict[str, int]) -> dict[str, Any]:
        return self._call("POST", "/v1/scale", {"replicas": replicas})

    def rollout_restart(self, pool: str) -> dict[str, Any]:
        return self._call("POST", "/v1/rollout/restart", {"pool": pool})

    def wait_converged(self, pools: list[str] | None, timeout_s: float, poll_s: float = 0.3) -> dict[str, Any]:
        """Poll until every pool in ``pools`` (all if None) is converged;
        ``ControlClientError`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            names = pools or list(status["pools"])
            if all(status["pools"][p]["converged"] for p in names if p in status["pools"]):
                return status
            if time.monotonic() > deadline:
                raise ControlClientError(f"not converged after {timeout_s:.0f}s:\n{format_status(status)}")
            time.sleep(poll_s)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError):
                message = exc.reason
            raise ControlClientError(str(message)) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ControlClientError(f"cannot reach the up's control endpoint {self.url}: {exc}") from None


def parse_replicas(items: list[str]) -> dict[str, int]:
    """``["decode=3", "prefill=0"]`` -> ``{"decode": 3, "prefill": 0}`` (``ValueError`` if malformed)."""
    out: dict[str, int] = {}
    for item in items:
        pool, sep, count = item.partition("=")
        if not sep or not pool or not count.strip().isdigit():
            raise ValueError(f"{item!r}: write POOL=N, e.g. decode=3")
        out[pool.strip()] = int(count)
    return out


def format_status(status: dict[str, Any]) -> str:
    """Pools and pods as two small tables (what ``splitserve status`` prints)."""
    lines = [f"{'POOL':<9}{'READY':>7}{'DESIRED':>9}{'REVISION':>10}{'RESTARTS':>10}  NOTE"]
    for role, pool in status["pools"].items():
        note = "" if pool["converged"] else "progressing"
        if pool.get("backoff_s"):
            note = f"crash back-off {pool['backoff_s']:.1f}s"
        lines.append(f"{role:<9}{pool['ready']:>7}{pool['replicas']:>9}{pool['revision']:>10}"
                     f"{pool['restarts']:>10}  {note}")
    lines.append("")
    lines.append(f"{'NAME':<12}{'STATE':<10}{'REV':>4}  {'ADDRESS':<22}{'HTTP':>6}{'PID':>9}{'AGE':>8}")
    for pool in status["pools"].values():
        for pod in pool["pods"]:
            lines.append(f"{pod['name']:<12}{pod['state']:<10}{pod['revision']:>4}  {pod['address']:<22}"
                         f"{pod['http_port']:>6}{pod['pid'] or '-':>9}{pod['age_s']:>7.0f}s")
    router = status.get("router")
    if router:
        seen = ", ".join(f"{pool} {counts}" for pool, counts in router.get("pods", {}).items())
        lines.append("")
        lines.append(f"router {router['url']} (pid {router.get('pid')}); it sees: {seen or 'no pods yet'}")
    return "\n".join(lines)
