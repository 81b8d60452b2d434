"""Kubernetes EndpointSlices (``discovery.k8s.io/v1``, as JSON dicts) to the
router's pods. Pure; used by the ``kubernetes`` discovery source.

Endpoint conditions, as the API defines them (a missing ``ready`` or
``serving`` means unknown, read as true; a missing ``terminating`` as false):

- ready (and not terminating)          -> ``ready`` (a candidate; routed once GetLoad answers)
- terminating and serving              -> ``draining`` (no new work, running streams finish)
- not ready, or terminating and not serving -> not a candidate (absent: removed)
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from splitserve.router.membership import DiscoveredPod

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def service_selector(service: str) -> str:
    return f"{SERVICE_NAME_LABEL}={service}"


def endpoint_state(conditions: Mapping[str, Any] | None) -> str | None:
    """``ready``, ``draining`` or None (not a candidate)."""
    conditions = conditions or {}
    ready = conditions.get("ready")
    ready = True if ready is None else bool(ready)
    serving = conditions.get("serving")
    serving = ready if serving is None else bool(serving)
    if conditions.get("terminating"):
        return "draining" if serving else None
    return "ready" if ready else None


def slice_pods(role: str, endpoint_slice: Mapping[str, Any], port_name: str) -> list[DiscoveredPod]:
    """The candidate pods of one slice: each endpoint's first address (the
    API calls them fungible) with the slice's port named ``port_name``.
    A slice without that port names no pod. ``ValueError`` for a malformed
    slice (the caller keeps its last good view)."""
    if not isinstance(endpoint_slice, Mapping):
        raise ValueError("an EndpointSlice must be an object")
    address_type = endpoint_slice.get("addressType")
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise ValueError(f"EndpointSlice addressType {address_type!r} is not IPv4, IPv6 or FQDN")
    port = next((p.get("port") for p in endpoint_slice.get("ports") or []
                 if isinstance(p, Mapping) and (p.get("name") or "") == port_name), None)
    if port is None:
        return []
    if not isinstance(port, int):
        raise ValueError(f"EndpointSlice port {port_name!r} is not a number: {port!r}")
    pods = []
    for endpoint in endpoint_slice.get("endpoints") or []:
        if not isinstance(endpoint, Mapping):
            raise ValueError("an EndpointSlice endpoint must be an object")
        state = endpoint_state(endpoint.get("conditions"))
        addresses = endpoint.get("addresses") or []
        if state is None or not addresses:
            continue
        host = str(addresses[0])
        host = f"[{host}]" if address_type == "IPv6" else host
        pods.append(DiscoveredPod(role, f"{host}:{port}", state))
    return pods


def merge_pods(pods: Iterable[DiscoveredPod]) -> list[DiscoveredPod]:
    """One entry per address: a pod listed by two slices at once (the
    controller moving it between slices) counts as ready if either says so."""
    out: dict[str, DiscoveredPod] = {}
    for pod in pods:
        seen = out.get(pod.address)
        if seen is None or (seen.role == pod.role and seen.state == "draining"):
            out[pod.address] = pod
    return list(out.values())
