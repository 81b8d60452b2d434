"""A model of Kubernetes NetworkPolicy ingress semantics (a test double for a
CNI that enforces policies; no cluster runs here), used to evaluate the
chart's rendered policies.

Rules modelled (networking.k8s.io/v1): a pod is isolated for ingress when a
policy in its namespace selects it with ``Ingress`` in ``policyTypes``; an
isolated pod accepts a connection when some selecting policy has a rule whose
``from`` matches the source (absent = any source; a ``podSelector`` alone means
the policy's namespace; a ``namespaceSelector`` alone means every pod of the
matching namespaces; both means both) and whose ``ports`` match (absent = every
port; a named port resolves against the destination's container ports;
``endPort`` makes a range; protocol defaults to TCP). Policies are additive.
``ipBlock`` peers never match a pod source here. Egress is not modelled (the
chart renders ingress policies only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PodRef:
    """A pod as policies see it: labels, namespace (and its labels), named ports."""

    name: str
    namespace: str
    labels: dict[str, str]
    namespace_labels: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector; ``{}`` matches everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"unknown selector operator {op!r}")
    return True


def _selects(policy: dict[str, Any], pod: PodRef) -> bool:
    spec = policy["spec"]
    return (policy["metadata"].get("namespace") == pod.namespace
            and "Ingress" in spec.get("policyTypes", ["Ingress"])
            and selector_matches(spec.get("podSelector"), pod.labels))


def _peer_matches(peer: dict[str, Any], policy_ns: str, source: PodRef) -> bool:
    if "ipBlock" in peer:
        return False
    pod_sel, ns_sel = peer.get("podSelector"), peer.get("namespaceSelector")
    if ns_sel is None:
        ns_ok = source.namespace == policy_ns
    else:
        ns_ok = selector_matches(ns_sel, source.namespace_labels)
    pod_ok = pod_sel is None or selector_matches(pod_sel, source.labels)
    return ns_ok and pod_ok


def _port_matches(entry: dict[str, Any], dest: PodRef, port: int, protocol: str) -> bool:
    if entry.get("protocol", "TCP") != protocol:
        return False
    if "port" not in entry:
        return True
    first = entry["port"]
    if isinstance(first, str):
        if first not in dest.ports:
            return False
        first = dest.ports[first]
    last = entry.get("endPort", first)
    return first <= port <= last


def allowed(policies: list[dict[str, Any]], source: PodRef, dest: PodRef, port: int,
            protocol: str = "TCP") -> bool:
    """Would ``dest`` accept a connection from ``source`` on ``port``?"""
    selecting = [p for p in policies if _selects(p, dest)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            peers = rule.get("from")
            if peers and not any(_peer_matches(peer, policy["metadata"]["namespace"], source) for peer in peers):
                continue
            ports = rule.get("ports")
            if ports and not any(_port_matches(entry, dest, port, protocol) for entry in ports):
                continue
            return True
    return False
