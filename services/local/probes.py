"""Local ports and HTTP probes used by ``splitserve up`` (what a kubelet's
readiness probe and the scheduler's port allocation do on Kubernetes), and a
read of the router's view of its pods."""
from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def is_healthy(host: str, port: int, timeout: float = 1.0, path: str = "/health") -> bool:
    """True when ``http://host:port/path`` answers 2xx within ``timeout``."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


_ROUTER_PODS = re.compile(r'^splitserve:router_pods\{([^}]*)\}\s+(\S+)$', re.MULTILINE)


def router_pod_states(host: str, port: int) -> dict[str, dict[str, int]] | None:
    """The router's ``splitserve:router_pods{pool,state}`` gauge as
    {pool: {state: count}}; None if unreachable or it has no such metric."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    out: dict[str, dict[str, int]] = {}
    for labels, value in _ROUTER_PODS.findall(text):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if "pool" in fields and "state" in fields:
            out.setdefault(fields["pool"], {})[fields["state"]] = int(float(value))
    return out or None
