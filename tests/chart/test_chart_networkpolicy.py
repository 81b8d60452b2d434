"""The rendered NetworkPolicies, evaluated with netpol_model (a model of the
Kubernetes semantics; no CNI runs here): only the router reaches the pods'
gRPC port, prefill and decode reach each other on all TCP ports (or the
configured KV range), metrics only from the monitoring namespace, the router's
http port open, its scaler port only from KEDA's namespace."""
from __future__ import annotations

from typing import Any

import pytest

import chart_support as cs
from netpol_model import PodRef, allowed, selector_matches

NS_LABELS = {"kubernetes.io/metadata.name": cs.NAMESPACE}
KV_PORT = 43211  # a dynamic UCX port


def _pods(docs: list[dict[str, Any]]) -> dict[str, PodRef]:
    """One pod per rendered Deployment (by role), plus outsiders."""
    pods = {}
    for d in cs.by_kind(docs, "Deployment"):
        template = d["spec"]["template"]
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        role = template["metadata"]["labels"]["splitserve.io/role"]
        pods[role] = PodRef(role, cs.NAMESPACE, template["metadata"]["labels"], NS_LABELS, ports)
    pods["neighbour"] = PodRef("neighbour", cs.NAMESPACE, {"app": "other"}, NS_LABELS)
    pods["impostor"] = PodRef("impostor", "default", dict(pods["router"].labels),
                              {"kubernetes.io/metadata.name": "default"})
    pods["prometheus"] = PodRef("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"},
                                {"kubernetes.io/metadata.name": "monitoring"})
    pods["keda"] = PodRef("keda-operator", "keda", {"app": "keda-operator"}, {"kubernetes.io/metadata.name": "keda"})
    return pods


def _case(name: str) -> cs.Options:
    (case,) = [c for c in cs.MATRIX if c.name == name]
    return case.options


def _setup(options: cs.Options) -> tuple[list[dict[str, Any]], dict[str, PodRef]]:
    docs = cs.render(options)
    return cs.by_kind(docs, "NetworkPolicy"), _pods(docs)


def test_model_semantics() -> None:
    """The model itself: unselected pods are open, selection isolates, named ports resolve."""
    a = PodRef("a", "ns", {"x": "1"}, {}, {"grpc": 5000})
    b = PodRef("b", "ns", {"y": "1"})
    assert allowed([], b, a, 5000)
    policy = {"metadata": {"namespace": "ns"},
              "spec": {"podSelector": {"matchLabels": {"x": "1"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"y": "1"}}}],
                                    "ports": [{"port": "grpc"}]}]}}
    assert allowed([policy], b, a, 5000) and not allowed([policy], b, a, 5001)
    assert not allowed([policy], a, a, 5000)
    assert allowed([policy], a, b, 1), "b is not selected"
    assert selector_matches({"matchExpressions": [{"key": "y", "operator": "In", "values": ["1"]}]}, {"y": "1"})
    assert not selector_matches({"matchExpressions": [{"key": "y", "operator": "NotIn", "values": ["1"]}]}, {"y": "1"})


@pytest.mark.parametrize("profile", ["defaults", "profile-cpu", "profile-gpu", "networkpolicy-on"])
def test_disaggregated_matrix(profile: str) -> None:
    policies, pods = _setup(_case(profile))
    assert policies
    grpc, http = 50051, 8081
    for pool in ("prefill", "decode"):
        dest = pods[pool]
        assert allowed(policies, pods["router"], dest, grpc), f"router -> {pool} grpc"
        for other in ("neighbour", "impostor", "prometheus", "keda"):
            assert not allowed(policies, pods[other], dest, grpc), f"{other} -> {pool} grpc"
        assert not allowed(policies, pods["router"], dest, KV_PORT), f"router -> {pool} other ports"
        assert allowed(policies, pods["prometheus"], dest, http), f"monitoring -> {pool} metrics"
        for other in ("neighbour", "impostor", "router", "keda"):
            assert not allowed(policies, pods[other], dest, http), f"{other} -> {pool} metrics"
    for src, dst in (("prefill", "decode"), ("decode", "prefill")):
        assert allowed(policies, pods[src], pods[dst], grpc), f"{src} -> {dst} grpc (ClaimKV)"
        assert allowed(policies, pods[src], pods[dst], KV_PORT), f"{src} -> {dst} KV (dynamic UCX port)"
    for src in ("neighbour", "impostor", "prometheus", "prefill", "decode"):
        assert allowed(policies, pods[src], pods["router"], 8000), f"{src} -> router http"
    assert allowed(policies, pods["keda"], pods["router"], 9090), "keda -> router scaler"
    for src in ("neighbour", "impostor", "prometheus", "prefill"):
        assert not allowed(policies, pods[src], pods["router"], 9090), f"{src} -> router scaler"


def test_kv_port_range() -> None:
    policies, pods = _setup(_case("networkpolicy-kv-range"))
    p, d = pods["prefill"], pods["decode"]
    assert allowed(policies, d, p, 50051) and allowed(policies, d, p, 40050) and allowed(policies, p, d, 40100)
    assert not allowed(policies, d, p, 45000) and not allowed(policies, p, d, 39999)


def test_unified_matrix() -> None:
    policies, pods = _setup(cs.Options(values=("values-unified.yaml",)))
    u = pods["unified"]
    assert allowed(policies, pods["router"], u, 50051)
    assert not allowed(policies, pods["neighbour"], u, 50051)
    peer = PodRef("unified-2", cs.NAMESPACE, dict(u.labels), NS_LABELS, dict(u.ports))
    assert not allowed(policies, peer, u, KV_PORT), "unified pods exchange no KV"
    assert not [p for p in policies if p["metadata"]["name"].endswith("-kv")]


def test_monitoring_namespace_selector_is_configurable() -> None:
    options = cs.Options(sets=(("networkPolicy.monitoringNamespaceSelector.matchLabels.team", "obs"),))
    policies, pods = _setup(options)
    observer = PodRef("agent", "obs", {}, {"kubernetes.io/metadata.name": "monitoring", "team": "obs"})
    assert allowed(policies, observer, pods["decode"], 8081)
    assert not allowed(policies, pods["prometheus"], pods["decode"], 8081), "needs both labels now"


def test_networkpolicy_off_renders_none() -> None:
    assert not cs.by_kind(cs.render(_case("networkpolicy-off")), "NetworkPolicy")
